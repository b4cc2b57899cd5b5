"""The M2FP network in plain PyTorch: no I/O, no pre- or post-processing."""

from .config import M2FPConfig
from .m2fp import M2FP, InferenceVariant, NetworkOutput

__all__ = ["M2FP", "InferenceVariant", "M2FPConfig", "NetworkOutput"]
