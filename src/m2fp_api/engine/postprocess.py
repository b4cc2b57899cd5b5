"""Network output -> ParseResult, with ModelScope's numbers but bounded memory.

ModelScope upsamples all 100 query masks to the photo's full resolution at once (and
keeps float64 copies), which is what pushes its pipeline past 6 GB at 1080p. Here
queries are upsampled a few at a time within a byte budget, only queries that can
still reach an output threshold are upsampled at all, and masks are kept cropped to
their bounding boxes. The arithmetic per pixel is the same as the reference's, except
under `fast`, whose resizing runs as bf16 matrix products on each query's window
(`_Bf16Products`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.config import M2FPConfig
from ..model.m2fp import NetworkOutput
from .preprocess import NetworkInput
from .result import Mask, ParseResult, Part, Person

# ModelScope keeps the 100 best (query, class) pairs per image
TOP_K = 100
# parts are reported from this score up, persons above it (ModelScope's thresholds)
MIN_OUTPUT_SCORE = 0.1
DEFAULT_CHUNK_BYTES = 32 * 2**20


def _photo_region(inp: NetworkInput) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the part of the (padded) network input that the photo became,
    the whole input or the single-human crop box within it."""
    ih, iw = inp.input_size
    if inp.crop_box is None:
        return 0, ih, 0, iw
    x0, y0, x1, y1 = inp.crop_box
    return y0, min(y1, ih), x0, min(x1, iw)


def _upsample(mask_logits: torch.Tensor, padded: tuple[int, int], inp: NetworkInput) -> torch.Tensor:
    """(n, h/4, w/4) mask logits -> (n, H, W) at the photo's size, as the reference does:
    to the padded input size, crop the padding (and the single-human crop box), then to
    the photo size, bilinear without corner alignment both times."""
    m = F.interpolate(mask_logits[None], size=padded, mode="bilinear", align_corners=False)[0]
    y0, y1, x0, x1 = _photo_region(inp)
    return F.interpolate(m[None, :, y0:y1, x0:x1], size=inp.output_size, mode="bilinear", align_corners=False)[0]


def _reach(first: int, last: int, in_size: int, out_size: int) -> tuple[int, int]:
    """The output rows (or columns) [start, stop) of a bilinear resize (align_corners=False)
    that read any of the input rows first..last, with a margin of 2 for rounding."""
    scale = in_size / out_size
    start = int((first - 0.5) / scale - 0.5) - 2
    stop = int((last + 1.5) / scale - 0.5) + 3
    return max(0, start), min(out_size, stop)


def _support(mask_logits: torch.Tensor, padded: tuple[int, int],
             inp: NetworkInput) -> list[tuple[int, int, int, int] | None]:
    """Per query, a window (y0, y1, x0, x1) of the full-resolution map outside which its
    upsampled logits cannot be positive, or None when they are nowhere positive.

    Bilinear interpolation weighs its input with non-negative weights, so an output
    pixel whose inputs are all <= 0 is <= 0 in floating point too: the positive pixels
    at full size lie where the low-resolution positive ones reach through both resizes.
    """
    positive = (mask_logits > 0).view(torch.uint8)
    any_rows, any_cols = positive.amax(2), positive.amax(1)
    h, w = mask_logits.shape[-2:]
    cy, y_end, cx, x_end = _photo_region(inp)
    mid_h, mid_w = y_end - cy, x_end - cx
    out_h, out_w = inp.output_size
    windows: list[tuple[int, int, int, int] | None] = []
    for rows, cols in zip(any_rows, any_cols):
        r, c = torch.nonzero(rows).flatten(), torch.nonzero(cols).flatten()
        if r.numel() == 0:
            windows.append(None)
            continue
        # low resolution -> padded input -> (crop) -> photo
        y0, y1 = _reach(int(r[0]), int(r[-1]), h, padded[0])
        x0, x1 = _reach(int(c[0]), int(c[-1]), w, padded[1])
        y0, y1 = max(0, y0 - cy), min(mid_h, y1 - cy)
        x0, x1 = max(0, x0 - cx), min(mid_w, x1 - cx)
        if y0 >= y1 or x0 >= x1:
            windows.append(None)
            continue
        y0, y1 = _reach(y0, y1 - 1, mid_h, out_h)
        x0, x1 = _reach(x0, x1 - 1, mid_w, out_w)
        windows.append((y0, y1, x0, x1))
    return windows


def _chunk_size(output_size: tuple[int, int], chunk_bytes: int) -> int:
    h, w = output_size
    return max(1, chunk_bytes // (4 * h * w))


def _crop_box(positive: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) of the True pixels of an (H, W) mask, None if there are none."""
    # amax over the bytes is many times faster than any() on bool
    as_bytes = positive.view(torch.uint8)
    rows = torch.nonzero(as_bytes.amax(1)).flatten()
    if rows.numel() == 0:
        return None
    cols = torch.nonzero(as_bytes[rows[0]:rows[-1] + 1].amax(0)).flatten()
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


@dataclass
class _Entry:
    """One of the top-k (query, class) pairs."""

    query: int
    label: int
    class_score: float
    score: float = 0.0  # class score x mask score, once the mask is known


class _TwoResizes:
    """Full-resolution logits of queries within their windows: ModelScope's two resizes
    of whole maps, a budget-sized chunk of queries at a time."""

    def __init__(self, mask_logits: torch.Tensor, padded: tuple[int, int], inp: NetworkInput,
                 windows: list, chunk_bytes: int) -> None:
        self.mask_logits, self.padded, self.inp = mask_logits, padded, inp
        self.windows, self.chunk_bytes = windows, chunk_bytes

    def __call__(self, queries: list[int]) -> Iterator[tuple[int, torch.Tensor | None]]:
        """Yield (query, its fp32 logits within its window, or None if it has none)."""
        step = _chunk_size(self.inp.output_size, self.chunk_bytes)
        for start in range(0, len(queries), step):
            chunk = queries[start:start + step]
            full = _upsample(self.mask_logits[chunk], self.padded, self.inp)
            for j, q in enumerate(chunk):
                window = self.windows[q]
                yield q, None if window is None else full[j, window[0]:window[1], window[2]:window[3]]
            del full


def _axis_resize(low: int, padded: int, kept: tuple[int, int], photo: int) -> torch.Tensor:
    """The two bilinear resizes along one axis (low -> padded, keep [kept), -> photo) as
    one (photo, low) matrix: the resizes themselves applied to the identity."""
    identity = torch.eye(low)[None, :, :, None]
    m = F.interpolate(identity, size=(padded, 1), mode="bilinear", align_corners=False)
    m = F.interpolate(m[:, :, kept[0]:kept[1]], size=(photo, 1), mode="bilinear", align_corners=False)
    return m[0, :, :, 0].T.contiguous()


def _band(resize: torch.Tensor) -> tuple[list[int], list[int]]:
    """Per output row of an axis matrix, the first and one past the last input it reads."""
    columns = torch.arange(resize.shape[1])
    reads = resize != 0
    first = torch.where(reads, columns, resize.shape[1]).amin(1)
    return first.tolist(), torch.where(reads, columns + 1, 0).amax(1).tolist()


class _Bf16Products(_TwoResizes):
    """The same, with each axis's two resizes composed into one matrix and applied to each
    query's window only, as two bf16 matrix products (for `fast`, whose network made
    these logits in bf16: they lose nothing in the cast; the products round to bf16's
    precision, ~0.4 %). Only the window's input rows and columns are read; the fp32
    window is filled from bf16 products of at most `chunk_bytes` of its rows at a time."""

    def __init__(self, mask_logits: torch.Tensor, padded: tuple[int, int], inp: NetworkInput,
                 windows: list, chunk_bytes: int) -> None:
        super().__init__(mask_logits, padded, inp, windows, chunk_bytes)
        y0, y1, x0, x1 = _photo_region(inp)
        h, w = mask_logits.shape[-2:]
        rows = _axis_resize(h, padded[0], (y0, y1), inp.output_size[0])
        cols = _axis_resize(w, padded[1], (x0, x1), inp.output_size[1])
        self.row_band, self.col_band = _band(rows), _band(cols)
        self.rows, self.cols, self.logits = rows.bfloat16(), cols.bfloat16(), mask_logits.bfloat16()

    def __call__(self, queries: list[int]) -> Iterator[tuple[int, torch.Tensor | None]]:
        (row_first, row_stop), (col_first, col_stop) = self.row_band, self.col_band
        for q in queries:
            window = self.windows[q]
            if window is None:
                yield q, None
                continue
            y0, y1, x0, x1 = window
            a, b, c, d = row_first[y0], row_stop[y1 - 1], col_first[x0], col_stop[x1 - 1]
            across = self.logits[q, a:b, c:d] @ self.cols[x0:x1, c:d].T  # (b - a, window width)
            out = torch.empty((y1 - y0, x1 - x0))
            step = max(1, self.chunk_bytes // (4 * (x1 - x0)))
            for r in range(y0, y1, step):
                out[r - y0:r - y0 + step] = self.rows[r:min(y1, r + step), a:b] @ across
            yield q, out


class _ClassCanvas:
    """M2FP's semantic probability of one class: the mean, over the class's confident
    instances, of sigmoid(mask) x score where that exceeds 0.5 (which needs logit > 0,
    so only each instance's box is touched). One canvas serves every class in turn."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.probs = torch.zeros(size)
        self.times = torch.zeros(size, dtype=torch.uint8)  # at most 100 instances
        self.box: tuple[int, int, int, int] | None = None  # union of the instances' boxes

    def add(self, sigmoid: torch.Tensor, origin: tuple[int, int], mask: Mask, score: float) -> None:
        """sigmoid: the instance's mask probabilities within a window of the photo whose
        top-left corner is `origin` (which holds the mask's box)."""
        ys, xs = slice(mask.y0, mask.y0 + mask.height), slice(mask.x0, mask.x0 + mask.width)
        ins = sigmoid[mask.y0 - origin[0]:ys.stop - origin[0], mask.x0 - origin[1]:xs.stop - origin[1]] * score
        hit = ins > 0.5
        self.probs[ys, xs] += ins.masked_fill_(~hit, 0.0)
        self.times[ys, xs] += hit
        y1, x1 = ys.stop, xs.stop
        b = self.box
        self.box = (ys.start, y1, xs.start, x1) if b is None else (
            min(b[0], ys.start), max(b[1], y1), min(b[2], xs.start), max(b[3], x1))

    def fold_into(self, cls: int, best: torch.Tensor, class_map: torch.Tensor) -> None:
        """Take the pixels where this class beats every earlier (lower-id) one, and clear
        the canvas for the next class."""
        if self.box is None:
            return
        y0, y1, x0, x1 = self.box
        probs = self.probs[y0:y1, x0:x1].div_(self.times[y0:y1, x0:x1].clamp_(min=1))
        current = best[y0:y1, x0:x1]
        better = probs > current  # strict: ties keep the lower class id, as argmax does
        torch.maximum(current, probs, out=current)
        class_map[y0:y1, x0:x1].masked_fill_(better, cls)  # in place: a bool index would list the pixels as int64 (16 B each)
        probs.zero_()
        self.times[y0:y1, x0:x1].zero_()
        self.box = None


def parse_multiple(out: NetworkOutput, inp: NetworkInput, cfg: M2FPConfig,
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES, bf16: bool = False) -> ParseResult:
    """Instance parsing: part and person instances, and M2FP's semantic map.

    One pass, class by class: the queries of a class that may be pasted into the
    semantic map are upsampled once, scored (mask score, box, bit mask) and pasted
    while their full-resolution probabilities are at hand; the remaining queries are
    then only scored. A query proposed for several classes is upsampled once per class.
    `bf16`: upsample with `_Bf16Products` (the `fast` backend's), else with
    ModelScope's arithmetic (`_TwoResizes`).
    """
    logits, mask_logits = out.pred_logits[0].float(), out.pred_masks[0].float()
    num_classes = logits.shape[-1] - 1
    human = cfg.num_parsing
    class_scores = logits.softmax(-1)[:, :-1].flatten()
    top_scores, top_index = class_scores.topk(min(TOP_K, class_scores.numel()))
    # A final score is the class score times a mask score below 1, so a pair whose class
    # score is under every threshold can never be reported: skip its upsampling.
    entries = [
        _Entry(query=i // num_classes, label=i % num_classes, class_score=s)
        for s, i in zip(top_scores.tolist(), top_index.tolist()) if s >= MIN_OUTPUT_SCORE
    ]
    by_query: dict[int, list[_Entry]] = {}
    for e in entries:
        by_query.setdefault(e.query, []).append(e)
    # (query -> entry) per class, for the pairs that may reach the paste threshold
    paste: dict[int, dict[int, _Entry]] = {}
    for e in entries:
        if e.label != human and e.class_score >= cfg.parsing_ins_score_thr:
            paste.setdefault(e.label, {})[e.query] = e

    masks: dict[int, Mask] = {}
    scored: set[int] = set()
    windows = _support(mask_logits, out.padded_size, inp)

    resize = (_Bf16Products if bf16 else _TwoResizes)(mask_logits, out.padded_size, inp, windows, chunk_bytes)

    def upsample_and_score(queries: list[int]):
        """Yield (query, its sigmoid within its window, the window's top-left corner) after
        scoring every query once; nothing outside the window is touched (and, with
        `_Bf16Products`, computed)."""
        for q, logits in resize(queries):
            if logits is not None:
                y0, _, x0, _ = windows[q]
                positive = logits > 0
                logits.sigmoid_()
            if q not in scored:
                scored.add(q)
                if logits is None:
                    _score_empty(by_query[q])
                else:
                    _score_query(q, logits, positive, (y0, x0), by_query[q], masks)
            if logits is not None:
                yield q, logits, (y0, x0)

    class_map = torch.zeros(inp.output_size, dtype=torch.uint8)
    best = torch.zeros(inp.output_size, dtype=torch.float32)
    canvas = _ClassCanvas(inp.output_size)
    for cls in sorted(paste):
        for q, probs, origin in upsample_and_score(sorted(paste[cls])):
            e = paste[cls][q]
            if q in masks and e.score >= cfg.parsing_ins_score_thr:
                canvas.add(probs, origin, masks[q], e.score)
        canvas.fold_into(cls, best, class_map)
    del canvas
    for _ in upsample_and_score(sorted(set(by_query) - scored)):
        pass

    parts = [
        Part(label_id=e.label, label=cfg.classes[e.label], score=e.score, mask=masks[e.query])
        for e in entries if e.label not in (0, human) and e.score >= MIN_OUTPUT_SCORE
    ]
    parts.sort(key=lambda p: -p.score)
    humans = sorted((e for e in entries if e.label == human and e.score > MIN_OUTPUT_SCORE),
                    key=lambda e: -e.score)
    persons = [Person(person_id=i, score=e.score, mask=masks[e.query]) for i, e in enumerate(humans)]
    _assign_parts_to_persons(parts, persons)
    height, width = inp.output_size
    return ParseResult(width=width, height=height, class_map=class_map.numpy(),
                       class_names=cfg.part_classes, parts=parts, persons=persons,
                       single_human=False)


def _score_query(query: int, probs: torch.Tensor, positive: torch.Tensor, origin: tuple[int, int],
                 entries: list[_Entry], masks: dict[int, Mask]) -> None:
    """ModelScope's mask score (mean sigmoid over the positive pixels) into the query's
    entries, and its bit mask into `masks`. `probs` and `positive` cover the query's
    window, whose top-left corner is `origin` in the photo."""
    box = _crop_box(positive)
    if box is None:
        _score_empty(entries)
        return
    y0, y1, x0, x1 = box
    crop = positive[y0:y1, x0:x1]
    count = int(crop.view(torch.uint8).sum(dtype=torch.int32))
    # sigmoid > 0.5 exactly where logit > 0, so the sum over the positive pixels is
    # sum(relu(sigmoid - 0.5)) + 0.5 * count (much faster than selecting them)
    excess = float((probs[y0:y1, x0:x1] - 0.5).clamp_(min=0).sum())
    mask_score = (excess + 0.5 * count) / (count + 1e-6)
    masks[query] = Mask.from_crop(x0 + origin[1], y0 + origin[0], crop.numpy())
    for e in entries:
        e.score = e.class_score * mask_score


def _score_empty(entries: list[_Entry]) -> None:
    """A query positive nowhere scores 0: nothing of it is reported."""
    for e in entries:
        e.score = 0.0


def _assign_parts_to_persons(parts: list[Part], persons: list[Person]) -> None:
    """Each part belongs to the person whose mask overlaps it most (none if no overlap)."""
    person_bits = [p.mask.bits for p in persons]
    for index, part in enumerate(parts):
        bits = part.mask.bits if persons else None
        overlaps = [part.mask.intersection(p.mask, bits, pb) for p, pb in zip(persons, person_bits)]
        if overlaps and max(overlaps) > 0:
            person = persons[overlaps.index(max(overlaps))]
            part.person_id = person.person_id
            person.part_indices.append(index)


def parse_single(out: NetworkOutput, inp: NetworkInput, cfg: M2FPConfig,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> ParseResult:
    """Semantic parsing of one person: argmax of the query-weighted class probabilities."""
    logits, mask_logits = out.pred_logits[0].float(), out.pred_masks[0].float()
    probs = logits.softmax(-1)[:, :-1]
    m = F.interpolate(mask_logits[None], size=out.padded_size, mode="bilinear",
                      align_corners=False)[0].sigmoid()
    semantic = torch.einsum("qc,qhw->chw", probs, m)
    y0, y1, x0, x1 = _photo_region(inp)
    semantic = semantic[:, y0:y1, x0:x1]
    height, width = inp.output_size
    num_classes = semantic.shape[0]

    step = _chunk_size(inp.output_size, chunk_bytes)
    groups = [(c, min(num_classes, c + step)) for c in range(0, num_classes, step)]

    def upsampled(c0: int, c1: int) -> torch.Tensor:
        return F.interpolate(semantic[None, c0:c1], size=(height, width), mode="bilinear",
                             align_corners=False)[0]

    # With one group the upsampled map is kept for the second pass; otherwise each
    # group is recomputed rather than holding (classes x H x W) floats.
    kept = upsampled(0, num_classes) if len(groups) == 1 else None
    best = label = None
    for c0, c1 in groups:
        up = kept if kept is not None else upsampled(c0, c1)
        group_label = up.argmax(0)
        group_best = up.gather(0, group_label[None])[0]
        group_label += c0
        if best is None:
            best, label = group_best, group_label
        else:
            better = group_best > best
            best = torch.where(better, group_best, best)
            label = torch.where(better, group_label, label)
    del best
    counts = torch.bincount(label.flatten(), minlength=num_classes)
    present = [c for c in range(num_classes) if counts[c] > 0]
    # ModelScope's score: mean of sigmoid(probability) over the class's pixels, (n + 1)
    scores: dict[int, float] = {}
    for c0, c1 in groups:
        up = kept if kept is not None else upsampled(c0, c1)
        for c in present:
            if c0 <= c < c1:
                total = up[c - c0].sigmoid()[label == c].double().sum()
                scores[c] = float(total / (float(counts[c]) + 1))
    class_map = label.to(torch.uint8).numpy()
    parts = [
        Part(label_id=c, label=cfg.classes[c], score=scores[c], mask=Mask.from_full(class_map == c))
        for c in present if c != 0
    ]
    parts.sort(key=lambda p: -p.score)
    return ParseResult(width=width, height=height, class_map=class_map,
                       class_names=cfg.part_classes, parts=parts, persons=[],
                       single_human=True, class_scores=scores)
