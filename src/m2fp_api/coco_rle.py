"""COCO run-length encoding of the engine's masks (`{"size": [h, w], "counts": "..."}`,
the compressed string form pycocotools' `mask.decode` reads).

Encoded from the mask's packed crop (engine/result.py `Mask`), never from a full-size
array: the runs' ends are found inside the box, then placed in the photo's column-major
pixel order. Both steps are whole-array numpy operations.
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
    # the crop framed by an empty row above and below; a pixel that differs from the one
    # above it is where a run (down its column) starts (0 -> 1) or has ended (1 -> 0).
    # Compared on the packed rows, eight pixels a byte, then unpacked once.
    framed = np.zeros((mask.height + 2, mask.packed.shape[1]), dtype=np.uint8)
    framed[1:-1] = mask.packed
    changes = np.unpackbits(framed[1:] ^ framed[:-1], axis=1, count=mask.width).view(bool)
    # flatnonzero of a flat boolean array is an order of magnitude faster than 2-D nonzero
    row, column = np.divmod(np.flatnonzero(changes), mask.width)
    # into the photo's column-major pixel order (a sort of the run boundaries only)
    boundaries = np.sort((column.astype(np.int64) + mask.x0) * height + mask.y0 + row)
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
