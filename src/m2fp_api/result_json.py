"""The ParseResult JSON (`parts.json`), shared by the HTTP API and the CLI."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, Field

from . import coco_rle
from .engine import ModelInfo
from .engine.result import ParseResult


class MaskFormat(str, Enum):
    """How `parts.json` carries each part's and person's mask: not at all (the Task's
    result as it is), or as COCO RLE under `mask`."""

    none = "none"
    rle = "rle"


class ImageSize(BaseModel):
    width: int
    height: int


class ModelRef(BaseModel):
    id: str
    pretrained: bool = Field(description="false for a stand-in with random weights")
    backend: str

    @classmethod
    def of(cls, info: ModelInfo) -> "ModelRef":
        return cls(id=info.id, pretrained=info.pretrained, backend=info.backend)


class PartOut(BaseModel):
    label_id: int
    label: str
    score: float
    area: int = Field(description="pixels of this instance's mask")
    area_ratio: float = Field(description="area / (width * height)")
    bbox: list[int] = Field(description="[x, y, w, h] in photo pixels", min_length=4, max_length=4)
    person_id: int | None = Field(description="the person this part belongs to; null if none")


class PersonOut(BaseModel):
    person_id: int
    score: float
    bbox: list[int] = Field(min_length=4, max_length=4)
    area: int
    parts: list[str] = Field(description="labels of the parts assigned to this person")


class ParseResultOut(BaseModel):
    image: ImageSize
    model: ModelRef
    parts: list[PartOut]
    persons: list[PersonOut] = Field(description="empty for single-person models")
    timings_ms: dict[str, float]

    @classmethod
    def build(cls, result: ParseResult, model: ModelRef) -> "ParseResultOut":
        total = result.width * result.height
        parts = [
            PartOut(label_id=p.label_id, label=p.label, score=round(p.score, 6),
                    area=p.mask.area, area_ratio=round(p.mask.area / total, 6),
                    bbox=list(p.mask.bbox_xywh), person_id=p.person_id)
            for p in result.parts
        ]
        persons = [
            PersonOut(person_id=p.person_id, score=round(p.score, 6), bbox=list(p.mask.bbox_xywh),
                      area=p.mask.area, parts=[result.parts[i].label for i in p.part_indices])
            for p in result.persons
        ]
        return cls(image=ImageSize(width=result.width, height=result.height), model=model,
                   parts=parts, persons=persons,
                   timings_ms={k: round(v, 2) for k, v in result.timings_ms.items()})


def with_masks(document: dict, result: ParseResult) -> dict:
    """The ParseResult JSON with each part's and person's mask as COCO RLE (`mask`), at
    the photo's size. Only `parts.json` carries them: the Task's result, sent on every
    poll and event, stays as it is."""
    height, width = result.height, result.width
    parts = [{**out, "mask": coco_rle.encode(part.mask, height, width)}
             for out, part in zip(document["parts"], result.parts)]
    persons = [{**out, "mask": coco_rle.encode(person.mask, height, width)}
               for out, person in zip(document["persons"], result.persons)]
    return {**document, "parts": parts, "persons": persons}
