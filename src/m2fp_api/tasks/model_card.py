"""What the service knows of the model, wherever the model runs: one value.

The in-process executor takes it from the HumanParser it loaded; each Celery worker
process publishes its own to Redis, and API processes read it from there. Routes and
admission use only this: the model's info (`/v1/model`, the content key), its
configuration (labels, network input sizes) and the photo limits.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import TypeAdapter

from ..engine import HumanParser, ModelInfo
from ..engine.images import ImageLimits
from ..model import M2FPConfig


@dataclass(frozen=True)
class ModelCard:
    info: ModelInfo
    config: M2FPConfig
    limits: ImageLimits

    @classmethod
    def of(cls, parser: HumanParser) -> "ModelCard":
        return cls(info=parser.info, config=parser.config, limits=parser.limits)

    def to_json(self) -> bytes:
        return _JSON.dump_json(self)

    @classmethod
    def from_json(cls, raw: bytes | str) -> "ModelCard":
        return _JSON.validate_json(raw)


# pydantic reads and writes the nested frozen dataclasses (tuples included) as they are
_JSON = TypeAdapter(ModelCard)
