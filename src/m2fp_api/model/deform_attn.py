"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch.

No compiled extension. Two formulations of the same arithmetic:

- `sample_and_weight`: `grid_sample` per level, then weight and sum, which is what the
  reference falls back to on CPU;
- `gather_and_weight`: the four bilinear corners of every sampling point are computed
  once for all levels, the attention weight is folded into each corner's weight, and
  `embedding_bag` does the weighted gather-sum in one pass without materialising the
  sampled values, from a table of the values with a zero frame around each level
  (`gather_table`, built once per layer). Same result to float rounding, about 3x
  faster on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Linear


def sample_and_weight(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Core of multi-scale deformable attention.

    value: (B, S, heads, D) with S = sum(H_l * W_l);
    sampling_locations: (B, Q, heads, levels, points, 2), x/y in [0, 1];
    attention_weights: (B, Q, heads, levels, points), softmaxed over levels*points.
    Returns (B, Q, heads * D).
    """
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
    # grid_sample wants [-1, 1] coordinates
    grids = (2 * sampling_locations - 1).transpose(1, 2).flatten(0, 1)  # (B*heads, Q, L, P, 2)
    weights = attention_weights.transpose(1, 2).flatten(0, 1)  # (B*heads, Q, L, P)
    out = None
    for level, (h, w) in enumerate(spatial_shapes):
        v = per_level[level].flatten(2).transpose(1, 2).reshape(batch * heads, dim, h, w)
        sampled = F.grid_sample(v, grids[:, :, level], mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # (B*heads, D, Q, P)
        contrib = (sampled * weights[:, None, :, level]).sum(-1)  # (B*heads, D, Q)
        out = contrib if out is None else out + contrib
    return out.view(batch, heads * dim, queries).transpose(1, 2)


@dataclass(frozen=True)
class GatherTable:
    """`value` as `gather_and_weight` reads it, built once per attention layer: every
    level's map framed by one zero pixel on each side (a corner off the map reads a zero
    instead of being masked), as a (batch x row x head, D) table; and, per sampling column
    (head, level, point), the constants that turn a corner into a table row.

    The table keeps the values' dtype and the gather weights are rounded to it: under
    bf16 autocast that is bf16, gathered with fp32 sums, which made fast's 960x540 parse
    ~1 % faster (oracle agreement 99.84 -> 99.94 %, full-size stand-in 99.74 % either way)."""

    table: torch.Tensor  # (batch, rows, heads, D)
    widths: torch.Tensor  # the level's W, per column
    heights: torch.Tensor  # the level's H, per column
    row_step: torch.Tensor  # table rows from one map row to the next: (W + 2) x heads
    origin: torch.Tensor  # table row of the map's pixel (0, 0) for the column's head
    corners: torch.Tensor  # (heads, 4, levels x points) int32: the four corners' offsets


def gather_table(value: torch.Tensor, spatial_shapes: list[tuple[int, int]], points: int) -> GatherTable:
    """value: (B, S, heads, D) as `sample_and_weight` takes it."""
    batch, _, heads, dim = value.shape
    levels = len(spatial_shapes)
    framed = [(h + 2) * (w + 2) for h, w in spatial_shapes]
    # zero rows after the last map: a point clamped to its far edge has weight-0 corners
    # up to a framed row and a pixel beyond its map
    tail = 2 * max(w for _, w in spatial_shapes) + 4
    table = value.new_zeros((batch, sum(framed) + tail, heads, dim))
    start = 0
    for (h, w), size, level in zip(spatial_shapes, framed,
                                   value.split([h * w for h, w in spatial_shapes], dim=1)):
        table[:, start:start + size].view(batch, h + 2, w + 2, heads, dim)[:, 1:-1, 1:-1] = (
            level.view(batch, h, w, heads, dim))
        start += size

    device = value.device
    widths = torch.tensor([w for _, w in spatial_shapes], dtype=torch.float32, device=device)
    heights = torch.tensor([h for h, _ in spatial_shapes], dtype=torch.float32, device=device)
    starts = torch.tensor([0] + framed[:-1], dtype=torch.float32, device=device).cumsum(0)
    steps = (widths + 2) * heads

    def per_column(per_level: torch.Tensor) -> torch.Tensor:
        return per_level.view(1, levels, 1).expand(heads, levels, points).reshape(-1)

    head = torch.arange(heads, dtype=torch.float32, device=device)
    origin = per_column((starts + widths + 3) * heads) + head.repeat_interleave(levels * points)
    corners = torch.stack([torch.zeros_like(steps), torch.full_like(steps, heads), steps, steps + heads])
    corners = corners.view(1, 4, levels, 1).expand(heads, 4, levels, points).reshape(heads, 4, -1)
    return GatherTable(table, per_column(widths), per_column(heights), per_column(steps), origin,
                       corners.to(torch.int32))


def gather_and_weight(
    values: GatherTable,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """`sample_and_weight` (bilinear, zero padding, align_corners=False) on a
    `gather_table` of its `value`.

    The arithmetic runs on (rows, columns) = (batch x query, head x level x point)
    matrices against per-column constants, so every elementwise step is a contiguous
    pass. (`spatial_shapes` is in the table already; taken for the samplers' common
    signature.)
    """
    batch, rows_per_batch, heads, dim = values.table.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    rows, per_head = batch * queries, levels * points
    locations = sampling_locations.reshape(rows, -1, 2)
    # pixel coordinates as grid_sample computes them without corner alignment, clamped
    # to [-1, W] x [-1, H]: beyond that every corner is off the map and reads a zero
    # either way; within it nothing changes
    x = torch.minimum((locations[..., 0] * values.widths - 0.5).clamp_(min=-1), values.widths)
    y = torch.minimum((locations[..., 1] * values.heights - 0.5).clamp_(min=-1), values.heights)
    x0, y0 = x.floor(), y.floor()
    fx, fy = (x - x0).view(rows, heads, per_head), (y - y0).view(rows, heads, per_head)
    # bilinear weights per corner, (y0, x0), (y0, x1), (y1, x0), (y1, x1), the attention
    # weight folded into the row weights; laid out (rows, head, corner, level x point) so
    # that each bag below, one per (batch, query, head), is one contiguous run of taps.
    # Written a corner at a time: one broadcast product over (corner, level x point) ran
    # its 12-wide inner loop 3x slower
    weights = attention_weights.reshape(rows, heads, per_head)
    wx, wy = (1 - fx, fx), ((1 - fy) * weights, fy * weights)
    factors = [(wy[corner // 2], wx[corner % 2]) for corner in range(4)]
    # table rows, exact in fp32 (far below 2**24), then int32 (embedding_bag takes them:
    # half the bytes of int64, the largest temporary here)
    first = torch.addcmul(values.origin, y0, values.row_step).add_(x0, alpha=heads).int().view(rows, heads, per_head)
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        # training (the stand-ins): out= is not differentiable; compiling: the compiler
        # refuses out= slices (and fuses the stacking itself)
        weight = torch.stack([a * b for a, b in factors], 2).to(values.table.dtype)
        index = torch.stack([first + values.corners[:, corner] for corner in range(4)], 2)
    else:  # straight into the table's dtype
        weight = torch.empty((rows, heads, 4, per_head), dtype=values.table.dtype, device=fx.device)
        index = torch.empty((rows, heads, 4, per_head), dtype=torch.int32, device=fx.device)
        for corner, (a, b) in enumerate(factors):
            torch.mul(a, b, out=weight[:, :, corner])
            torch.add(first, values.corners[:, corner], out=index[:, :, corner])
    if batch > 1:
        index += (torch.arange(batch, dtype=torch.int32, device=index.device) * (rows_per_batch * heads)
                  ).repeat_interleave(queries).view(-1, 1, 1, 1)
    per_bag = 4 * per_head
    bags = F.embedding_bag(index.view(-1, per_bag), values.table.view(-1, dim), mode="sum",
                           per_sample_weights=weight.view(-1, per_bag))
    return bags.view(batch, queries, heads * dim)


def softmax_short(x: torch.Tensor) -> torch.Tensor:
    """`x.softmax(-1)` for a short last dimension (levels x points: 12), as three passes:
    ATen's CPU softmax vectorises along that dimension and took ~4x as long (2.8 vs
    0.7 ms for 4096 queries x 8 heads). Equal to rounding (2e-7)."""
    exp = (x - x.amax(-1, keepdim=True)).exp()  # not in place: training differentiates it
    return exp / exp.sum(-1, keepdim=True)


@dataclass(frozen=True)
class Sampler:
    """A formulation of the sampling: `prepare(value, spatial_shapes, points)` turns a
    layer's projected values into what `sample` reads, once per layer; `sample` (same
    contract as `sample_and_weight` otherwise) runs once per chunk of queries."""

    prepare: Callable[[torch.Tensor, list[tuple[int, int]], int], Any]
    sample: Callable[[Any, list[tuple[int, int]], torch.Tensor, torch.Tensor], torch.Tensor]


def _values_as_they_are(value: torch.Tensor, spatial_shapes, points) -> torch.Tensor:
    return value


GRID_SAMPLE = Sampler(_values_as_they_are, sample_and_weight)
GATHER = Sampler(gather_table, gather_and_weight)


# queries sampled at once: bounds the gather's index and weight temporaries (48 taps per
# query and head) to tens of MB whatever the image size; results do not depend on it
QUERY_CHUNK = 4096


class MSDeformAttn(nn.Module):
    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        # the sampling kernel and the queries sampled at once (None: all), as the network's
        # inference variant says (M2FP.configure)
        self.sampler = GATHER
        self.query_chunk: int | None = QUERY_CHUNK
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = Linear(d_model, d_model)
        self.output_proj = Linear(d_model, d_model)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        """query (B, Q, C); reference_points (B, Q, levels, 2); input_flatten (B, S, C)."""
        heads = self.n_heads
        value = self.value_proj(input_flatten).view(input_flatten.shape[0], -1, heads, self.d_model // heads)
        values = self.sampler.prepare(value, spatial_shapes, self.n_points)
        del value
        # per output column of `sampling_offsets` (head, level, point, x|y): the level's
        # size (fp32, as the offsets are), offsets being in its pixels, and which reference
        # coordinate it moves
        levels, points = self.n_levels, self.n_points
        # from scalars one by one, not torch.tensor(list): that would freeze the sizes
        # into an exported (ONNX) graph instead of following its dynamic input size
        sizes = torch.stack([torch.stack([torch.scalar_tensor(w), torch.scalar_tensor(h)])
                             for h, w in spatial_shapes]).to(dtype=torch.float32, device=query.device)
        normalizer = sizes.view(1, levels, 1, 2).expand(heads, levels, points, 2).reshape(-1)
        coordinate = torch.arange(levels * 2, device=query.device).view(1, levels, 1, 2)
        coordinate = coordinate.expand(heads, levels, points, 2).reshape(-1)
        if self.query_chunk is None:
            return self.output_proj(self._sample_chunk(query, reference_points, values, spatial_shapes,
                                                       normalizer, coordinate))
        sampled = [
            self._sample_chunk(q, r, values, spatial_shapes, normalizer, coordinate)
            for q, r in zip(query.split(self.query_chunk, dim=1),
                            reference_points.split(self.query_chunk, dim=1))
        ]
        return self.output_proj(torch.cat(sampled, dim=1) if len(sampled) > 1 else sampled[0])

    def _sample_chunk(self, query, reference_points, values, spatial_shapes, normalizer, coordinate):
        batch, queries, _ = query.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        # fp32 even under bf16 autocast: a location off by bf16's 3 significant digits
        # moves a sampling point by a pixel on the larger maps
        offsets = self.sampling_offsets(query).float()  # (B, Q, heads * levels * points * 2)
        weights = self.attention_weights(query).float().view(batch, queries, heads, levels * points)
        weights = softmax_short(weights).view(batch, queries, heads, levels, points)
        # reference + offset / (W, H), as the reference computes it (same rounding), on
        # flat rows: broadcasting over four trailing dimensions is many times slower.
        # In place on the fresh offsets, which have the batch dimension the shared
        # reference points lack.
        refs = reference_points.flatten(2).index_select(2, coordinate)
        locations = offsets.div_(normalizer).add_(refs).view(batch, queries, heads, levels, points, 2)
        return self.sampler.sample(values, spatial_shapes, locations, weights)
