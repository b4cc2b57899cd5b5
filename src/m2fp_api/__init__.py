"""m2fp-api: multi-person human parsing with M2FP, natively in PyTorch.

    from m2fp_api import HumanParser
    parser = HumanParser.from_pretrained("damo/cv_resnet101_image-multiple-human-parsing")
    out = parser("photo.jpg")  # {"masks": [...], "labels": [...], "scores": [...]}
"""

from .engine import HumanParser, ParseResult

__all__ = ["HumanParser", "ParseResult"]
__version__ = "0.1.0"
