"""What a parse produces: a class-id map plus part and person instances.

Instance masks are stored cropped to their bounding box, so a result's memory grows
with what was found, not with (queries x full-resolution pixels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Mask:
    """A binary mask cropped to its tight bounding box, placed at (x0, y0), stored
    bit-packed along rows (a 12-megapixel person mask costs 1.5 MB, not 12)."""

    x0: int
    y0: int
    width: int
    height: int
    packed: np.ndarray  # (height, ceil(width / 8)) uint8
    area: int

    @classmethod
    def from_crop(cls, x0: int, y0: int, bits: np.ndarray) -> "Mask":
        h, w = bits.shape
        return cls(x0, y0, w, h, np.packbits(bits, axis=1), int(np.count_nonzero(bits)))

    @classmethod
    def from_full(cls, full: np.ndarray) -> "Mask":
        rows, cols = np.flatnonzero(full.any(1)), np.flatnonzero(full.any(0))
        if rows.size == 0:
            return cls.from_crop(0, 0, np.zeros((0, 0), dtype=bool))
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        return cls.from_crop(int(x0), int(y0), full[y0:y1, x0:x1])

    @property
    def bits(self) -> np.ndarray:
        return np.unpackbits(self.packed, axis=1, count=self.width).astype(bool)

    @property
    def bbox_xywh(self) -> tuple[int, int, int, int]:
        return (self.x0, self.y0, self.width, self.height)

    def full(self, height: int, width: int) -> np.ndarray:
        out = np.zeros((height, width), dtype=bool)
        out[self.y0:self.y0 + self.height, self.x0:self.x0 + self.width] = self.bits
        return out

    def intersection(self, other: "Mask", bits: np.ndarray | None = None,
                     other_bits: np.ndarray | None = None) -> int:
        """Pixels set in both masks, computed only over the overlap of the boxes.
        `bits`/`other_bits`: the masks already unpacked, when a caller compares many."""
        x0, y0 = max(self.x0, other.x0), max(self.y0, other.y0)
        x1 = min(self.x0 + self.width, other.x0 + other.width)
        y1 = min(self.y0 + self.height, other.y0 + other.height)
        if x1 <= x0 or y1 <= y0:
            return 0
        a = (self.bits if bits is None else bits)[y0 - self.y0:y1 - self.y0, x0 - self.x0:x1 - self.x0]
        b = (other.bits if other_bits is None else other_bits)[
            y0 - other.y0:y1 - other.y0, x0 - other.x0:x1 - other.x0]
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
