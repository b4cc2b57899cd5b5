"""m2fp-api: multi-person human parsing with M2FP, natively in PyTorch.

    from m2fp_api import HumanParser
    parser = HumanParser.from_pretrained("damo/cv_resnet101_image-multiple-human-parsing")
    out = parser("photo.jpg")  # {"masks": [...], "labels": [...], "scores": [...]}
"""

import os

# torch's allocations of 2 MB and more on transparent huge pages, where the kernel grants
# them on request: the network's activations, when freed back to the OS (engine.memory),
# cost an eighth of the page faults when they are touched again (exact at 960x540: 280k
# -> 33k a parse, 10-16 % faster, same peak). torch reads this at its first allocation,
# hence here, before anything imports torch; THP_MEM_ALLOC_ENABLE=0 opts out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .engine import HumanParser, ParseResult  # noqa: E402 (after the allocator's setting)

__all__ = ["HumanParser", "ParseResult"]
__version__ = "0.1.0"
