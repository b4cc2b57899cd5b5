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


def gather_and_weight(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Same contract as `sample_and_weight` (bilinear, zero padding, align_corners=False)."""
    batch, total, heads, dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    device = value.device
    sizes = torch.tensor(spatial_shapes, device=device, dtype=torch.float32)  # (L, 2) as (H, W)
    heights, widths = sizes[:, 0].view(1, 1, 1, levels, 1), sizes[:, 1].view(1, 1, 1, levels, 1)
    starts = torch.tensor([0] + [h * w for h, w in spatial_shapes][:-1], device=device).cumsum(0)
    # pixel coordinates as grid_sample computes them without corner alignment
    x = sampling_locations[..., 0] * widths - 0.5
    y = sampling_locations[..., 1] * heights - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    # per-axis weights, zero where that corner falls outside the map (zero padding);
    # the attention weight is folded into the row weights once
    wx0 = (1 - fx) * ((x0 >= 0) & (x0 < widths))
    wx1 = fx * ((x0 >= -1) & (x0 < widths - 1))
    wy0 = (1 - fy) * ((y0 >= 0) & (y0 < heights)) * attention_weights
    wy1 = fy * ((y0 >= -1) & (y0 < heights - 1)) * attention_weights
    # clamped indices: an outside corner reads a valid row with weight 0
    last_x, last_y = widths - 1, heights - 1
    ix0, ix1 = x0.clamp(min=0).minimum(last_x), (x0 + 1).clamp(min=0).minimum(last_x)
    level_start = starts.view(1, 1, 1, levels, 1).float()
    row0 = y0.clamp(min=0).minimum(last_y) * widths + level_start
    row1 = (y0 + 1).clamp(min=0).minimum(last_y) * widths + level_start
    index = torch.stack((row0 + ix0, row0 + ix1, row1 + ix0, row1 + ix1), -1).flatten(3).long()
    weight = torch.stack((wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1), -1).flatten(3)
    # (B, Q, heads, L*P*4) -> bags per (batch, query, head) over a (B*heads*S, D) table
    offset = (torch.arange(batch, device=device).view(batch, 1, 1, 1) * heads
              + torch.arange(heads, device=device).view(1, 1, heads, 1)) * total
    table = value.permute(0, 2, 1, 3).reshape(batch * heads * total, dim)
    bags = F.embedding_bag((index + offset).flatten(0, 2), table, mode="sum",
                           per_sample_weights=weight.flatten(0, 2).to(table.dtype))
    return bags.view(batch, queries, heads * dim)


# queries sampled at once: bounds the gather's index and weight temporaries (48 taps per
# query and head) to tens of MB whatever the image size; results do not depend on it
QUERY_CHUNK = 4096


class MSDeformAttn(nn.Module):
    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        # the sampling kernel; `gather_and_weight` unless a caller needs the reference's
        self.sample = gather_and_weight
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

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
        # offsets are in pixels of each level: normalise by (W, H)
        normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype,
                                  device=query.device)
        sampled = [
            self._sample_chunk(q, r, value, spatial_shapes, normalizer)
            for q, r in zip(query.split(QUERY_CHUNK, dim=1), reference_points.split(QUERY_CHUNK, dim=1))
        ]
        return self.output_proj(torch.cat(sampled, dim=1) if len(sampled) > 1 else sampled[0])

    def _sample_chunk(self, query, reference_points, value, spatial_shapes, normalizer):
        batch, queries, _ = query.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        offsets = self.sampling_offsets(query).view(batch, queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, queries, heads, levels, points)
        locations = (reference_points[:, :, None, :, None, :]
                     + offsets / normalizer[None, None, None, :, None, :])
        return self.sample(value, spatial_shapes, locations, weights)
