"""COCO run-length encoding of the engine's masks (`{"size": [h, w], "counts": "..."}`,
the compressed string form pycocotools' `mask.decode` reads).

Encoded from the mask's crop (engine/result.py `Mask`), never from a full-size array:
the runs are found column by column inside the box, then placed in the photo's
column-major pixel order. Both steps are whole-array numpy operations.
"""

from __future__ import annotations

import numpy as np

from .engine.result import Mask

# an int64 run length needs at most 13 five-bit groups
_MAX_GROUPS = 13


def run_lengths(mask: Mask, height: int, width: int) -> np.ndarray:
    """COCO's counts for `mask` in a height x width photo: alternating runs of 0s and
    1s in column-major order, starting with 0s (perhaps none), with no trailing empty run
    (as pycocotools' `encode` gives them)."""
    total = height * width
    if mask.area == 0:
        return np.array([total], dtype=np.int64)
    # one column of the crop per row, framed by a 0 on each side: a change marks where
    # a run starts (0 -> 1) or where it has ended (1 -> 0)
    framed = np.zeros((mask.width, mask.height + 2), dtype=bool)
    framed[:, 1:-1] = mask.bits.T
    column, row = np.nonzero(framed[:, 1:] != framed[:, :-1])
    # nonzero walks column after column, so the boundaries come out in pixel order
    boundaries = (column.astype(np.int64) + mask.x0) * height + mask.y0 + row
    # a run that reaches the bottom of a column and one that starts at the top of the
    # next are one run in column-major order: drop the end and the start that meet
    meeting = boundaries[1:] == boundaries[:-1]
    if meeting.any():
        drop = np.zeros(boundaries.size, dtype=bool)
        drop[1:] |= meeting
        drop[:-1] |= meeting
        boundaries = boundaries[~drop]
    counts = np.diff(boundaries, prepend=0, append=total)
    return counts[:-1] if counts[-1] == 0 else counts


def counts_string(counts: np.ndarray) -> str:
    """pycocotools' `rleToString`: each count (from the third on, as the difference
    from the count two before) in signed 5-bit groups, low first, 0x20 marking that
    another group follows, offset by 48 into printable ASCII."""
    values = counts.astype(np.int64)
    values[3:] -= counts[1:-2]
    groups, emitted = [], []
    emitting = np.ones(values.size, dtype=bool)
    for _ in range(_MAX_GROUPS):
        group = values & 0x1F
        values = values >> 5  # arithmetic: negative deltas keep their sign
        more = np.where(group & 0x10, values != -1, values != 0)
        groups.append(group | (more.astype(np.int64) << 5))
        emitted.append(emitting)
        emitting = emitting & more
        if not emitting.any():
            break
    # value by value, its groups in order: columns of the (value, group) grid
    chars = np.stack(groups, axis=1)[np.stack(emitted, axis=1)] + 48
    return chars.astype(np.uint8).tobytes().decode("ascii")


def encode(mask: Mask, height: int, width: int) -> dict:
    return {"size": [height, width], "counts": counts_string(run_lengths(mask, height, width))}
