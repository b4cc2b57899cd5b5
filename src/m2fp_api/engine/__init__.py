"""Checkpoint loading, pre/post-processing and backends around the network."""

from .parser import HumanParser, ModelInfo
from .result import Mask, ParseResult, Part, Person

__all__ = ["HumanParser", "Mask", "ModelInfo", "ParseResult", "Part", "Person"]
