"""What a parse produces: a class-id map plus part and person instances.

Instance masks are stored cropped to their bounding box, so a result's memory grows
with what was found, not with (queries x full-resolution pixels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np


@dataclass
class Mask:
    """A binary mask cropped to its tight bounding box, placed at (x0, y0)."""

    x0: int
    y0: int
    bits: np.ndarray  # (h, w) bool

    @classmethod
    def from_full(cls, full: np.ndarray) -> "Mask":
        rows, cols = np.flatnonzero(full.any(1)), np.flatnonzero(full.any(0))
        if rows.size == 0:
            return cls(0, 0, np.zeros((0, 0), dtype=bool))
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        return cls(int(x0), int(y0), np.ascontiguousarray(full[y0:y1, x0:x1]))

    @cached_property
    def area(self) -> int:
        return int(np.count_nonzero(self.bits))

    @property
    def bbox_xywh(self) -> tuple[int, int, int, int]:
        h, w = self.bits.shape
        return (self.x0, self.y0, w, h)

    def full(self, height: int, width: int) -> np.ndarray:
        out = np.zeros((height, width), dtype=bool)
        h, w = self.bits.shape
        out[self.y0:self.y0 + h, self.x0:self.x0 + w] = self.bits
        return out

    def intersection(self, other: "Mask") -> int:
        """Pixels set in both masks, computed only over the overlap of the boxes."""
        (ax, ay, aw, ah), (bx, by, bw, bh) = self.bbox_xywh, other.bbox_xywh
        x0, y0 = max(ax, bx), max(ay, by)
        x1, y1 = min(ax + aw, bx + bw), min(ay + ah, by + bh)
        if x1 <= x0 or y1 <= y0:
            return 0
        a = self.bits[y0 - ay:y1 - ay, x0 - ax:x1 - ax]
        b = other.bits[y0 - by:y1 - by, x0 - bx:x1 - bx]
        return int(np.count_nonzero(a & b))


@dataclass
class Part:
    label_id: int
    label: str
    score: float
    mask: Mask
    person_id: int | None = None


@dataclass
class Person:
    person_id: int
    score: float
    mask: Mask
    part_indices: list[int] = field(default_factory=list)


@dataclass
class ParseResult:
    width: int
    height: int
    class_map: np.ndarray  # (H, W) uint8, value = class id (0 = background)
    class_names: tuple[str, ...]  # index = class id of the map
    parts: list[Part]  # body-part / garment instances (no background)
    persons: list[Person]  # empty for single-human models
    single_human: bool
    # single-human models: ModelScope's per-class score for every class in the map,
    # background included, which the drop-in output reports
    class_scores: dict[int, float] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_modelscope(self) -> dict:
        """The dict ModelScope's `pipeline(Tasks.image_segmentation, model)(image)` returns:
        `masks` (full-size 0/1 arrays), `labels` (class names), `scores`."""
        masks, labels, scores = [], [], []
        if self.single_human:
            for class_id in np.unique(self.class_map):
                masks.append((self.class_map == class_id).astype(np.float64))
                labels.append(self.class_names[class_id])
                scores.append(self.class_scores[int(class_id)])
        else:
            human = [(p.score, "Human", p.mask) for p in self.persons]
            for score, label, mask in [(p.score, p.label, p.mask) for p in self.parts] + human:
                masks.append(mask.full(self.height, self.width).astype(np.float32))
                labels.append(label)
                scores.append(score)
        return {"masks": masks, "labels": labels, "scores": scores}
