"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch.

No compiled extension: the sampling is `grid_sample` per level, which is what the
reference falls back to on CPU, so the numbers match it.
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


class MSDeformAttn(nn.Module):
    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
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
        batch, queries, _ = query.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten).view(batch, -1, heads, self.d_model // heads)
        offsets = self.sampling_offsets(query).view(batch, queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, queries, heads, levels, points)
        # offsets are in pixels of each level: normalise by (W, H)
        normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype,
                                  device=query.device)
        locations = (reference_points[:, :, None, :, None, :]
                     + offsets / normalizer[None, None, None, :, None, :])
        return self.output_proj(sample_and_weight(value, spatial_shapes, locations, weights))
