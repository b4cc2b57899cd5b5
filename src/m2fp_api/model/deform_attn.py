"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch.

No compiled extension. Two formulations of the same arithmetic:

- `sample_and_weight`: `grid_sample` per level, then weight and sum, which is what the
  reference falls back to on CPU;
- `gather_and_weight`: the four bilinear corners of every sampling point are computed
  once for all levels, the attention weight is folded into each corner's weight, and
  `embedding_bag` does the weighted gather-sum in one pass without materialising the
  sampled values. Same result to float rounding, about 2-3x faster on CPU.
"""

from __future__ import annotations

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


def _column_constants(spatial_shapes: list[tuple[int, int]], heads: int, points: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each sampling column (head, level, point): its level's width, height and first
    token, as flat float vectors that broadcast along rows."""
    levels = len(spatial_shapes)
    sizes = torch.tensor(spatial_shapes, dtype=torch.float32, device=device)  # (L, 2) as (H, W)
    starts = torch.tensor([0] + [h * w for h, w in spatial_shapes][:-1], device=device).cumsum(0)

    def per_column(per_level: torch.Tensor) -> torch.Tensor:
        return per_level.float().view(1, levels, 1).expand(heads, levels, points).reshape(-1)

    return per_column(sizes[:, 1]), per_column(sizes[:, 0]), per_column(starts)


def gather_and_weight(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Same contract as `sample_and_weight` (bilinear, zero padding, align_corners=False).

    The arithmetic runs on (rows, columns) = (batch x query, head x level x point)
    matrices against per-column constants, so every elementwise step is a contiguous
    pass; `value` is read in place as a (batch x token x head, D) table.
    """
    batch, total, heads, dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    widths, heights, starts = _column_constants(spatial_shapes, heads, points, value.device)
    locations = sampling_locations.reshape(batch * queries, -1, 2)
    # pixel coordinates as grid_sample computes them without corner alignment
    x = locations[..., 0] * widths - 0.5
    y = locations[..., 1] * heights - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    # per-axis weights, zero where that corner falls outside the map (zero padding);
    # the attention weight is folded into the row weights once
    weights = attention_weights.reshape(batch * queries, -1)
    wx0 = (1 - fx) * ((x0 >= 0) & (x0 < widths))
    wx1 = fx * ((x0 >= -1) & (x0 < widths - 1))
    wy0 = (1 - fy) * ((y0 >= 0) & (y0 < heights)) * weights
    wy1 = fy * ((y0 >= -1) & (y0 < heights - 1)) * weights
    # clamped indices: an outside corner reads a valid row with weight 0
    last_x, last_y = widths - 1, heights - 1
    ix0, ix1 = x0.clamp(min=0).minimum(last_x), (x0 + 1).clamp(min=0).minimum(last_x)
    row0 = y0.clamp(min=0).minimum(last_y) * widths + starts
    row1 = (y0 + 1).clamp(min=0).minimum(last_y) * widths + starts
    # corners stacked per head: (rows, head, 4, level x point), so that each bag below,
    # one per (batch, query, head), is a contiguous run of 4 x levels x points taps
    per_head = (batch * queries, heads, levels * points)
    token = torch.stack([t.view(per_head) for t in (row0 + ix0, row0 + ix1, row1 + ix0, row1 + ix1)], 2)
    # row of the (batch, token, head) table; the batch offset is added in integers
    # int32 rows (embedding_bag takes them): half the bytes of the largest temporary, a
    # third off the sampling's time; a batch's table has far fewer than 2**31 rows
    head = torch.arange(heads, dtype=token.dtype, device=value.device).view(1, heads, 1, 1)
    index = (token * heads + head).int()
    if batch > 1:
        index += (torch.arange(batch, dtype=torch.int32, device=value.device) * (total * heads)
                  ).repeat_interleave(queries).view(-1, 1, 1, 1)
    weight = torch.stack([w.view(per_head) for w in (wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1)], 2)
    per_bag = levels * points * 4
    # the bilinear weights stay fp32 (a bf16 value table is widened, a few MB)
    bags = F.embedding_bag(index.view(-1, per_bag), value.reshape(-1, dim).float(), mode="sum",
                           per_sample_weights=weight.view(-1, per_bag))
    return bags.view(batch, queries, heads * dim)


def softmax_short(x: torch.Tensor) -> torch.Tensor:
    """`x.softmax(-1)` for a short last dimension (levels x points: 12), as three passes:
    ATen's CPU softmax vectorises along that dimension and took ~4x as long (2.8 vs
    0.7 ms for 4096 queries x 8 heads). Equal to rounding (2e-7)."""
    exp = (x - x.amax(-1, keepdim=True)).exp()  # not in place: training differentiates it
    return exp / exp.sum(-1, keepdim=True)


# queries sampled at once: bounds the gather's index and weight temporaries (48 taps per
# query and head) to tens of MB whatever the image size; results do not depend on it
QUERY_CHUNK = 4096


class MSDeformAttn(nn.Module):
    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        # the sampling kernel and the queries sampled at once (None: all), as the network's
        # inference variant says (M2FP.configure)
        self.sample = gather_and_weight
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
        # per output column of `sampling_offsets` (head, level, point, x|y): the level's
        # size, offsets being in its pixels, and which reference coordinate it moves
        levels, points = self.n_levels, self.n_points
        # from scalars one by one, not torch.tensor(list): that would freeze the sizes
        # into an exported (ONNX) graph instead of following its dynamic input size
        sizes = torch.stack([torch.stack([torch.scalar_tensor(w), torch.scalar_tensor(h)])
                             for h, w in spatial_shapes]).to(dtype=query.dtype, device=query.device)
        normalizer = sizes.view(1, levels, 1, 2).expand(heads, levels, points, 2).reshape(-1)
        coordinate = torch.arange(levels * 2, device=query.device).view(1, levels, 1, 2)
        coordinate = coordinate.expand(heads, levels, points, 2).reshape(-1)
        if self.query_chunk is None:
            return self.output_proj(self._sample_chunk(query, reference_points, value, spatial_shapes,
                                                       normalizer, coordinate))
        sampled = [
            self._sample_chunk(q, r, value, spatial_shapes, normalizer, coordinate)
            for q, r in zip(query.split(self.query_chunk, dim=1),
                            reference_points.split(self.query_chunk, dim=1))
        ]
        return self.output_proj(torch.cat(sampled, dim=1) if len(sampled) > 1 else sampled[0])

    def _sample_chunk(self, query, reference_points, value, spatial_shapes, normalizer, coordinate):
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
        return self.sample(value, spatial_shapes, locations, weights)
