"""The gathered formulation of multi-scale deformable attention against the reference's
grid_sample one, including taps outside the maps (zero padding) and batches."""

from __future__ import annotations

import pytest
import torch

from m2fp_api.model.deform_attn import MSDeformAttn, gather_and_weight, sample_and_weight, softmax_short

SHAPES = [(5, 7), (10, 13), (3, 4)]


@pytest.mark.parametrize("batch", [1, 3])
def test_gather_and_weight_equals_grid_sample(batch):
    g = torch.Generator().manual_seed(batch)
    heads, dim, queries, points = 4, 8, 50, 3
    total = sum(h * w for h, w in SHAPES)
    value = torch.randn(batch, total, heads, dim, generator=g)
    # a fifth of the taps land outside [0, 1]: corners there read zeros
    locations = torch.rand(batch, queries, heads, len(SHAPES), points, 2, generator=g) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, len(SHAPES), points, generator=g)
    expected = sample_and_weight(value, SHAPES, locations, weights)
    got = gather_and_weight(value, SHAPES, locations, weights)
    assert got.shape == (batch, queries, heads * dim)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_module_output_does_not_depend_on_the_sampler_or_chunking(monkeypatch):
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=len(SHAPES), n_heads=4, n_points=3).eval()
    total = sum(h * w for h, w in SHAPES)
    query, src = torch.randn(2, total, 32), torch.randn(2, total, 32)
    refs = torch.rand(2, total, len(SHAPES), 2)
    with torch.inference_mode():
        attn.sample = sample_and_weight
        expected = attn(query, refs, src, SHAPES)
        attn.sample = gather_and_weight
        monkeypatch.setattr("m2fp_api.model.deform_attn.QUERY_CHUNK", 17)
        got = attn(query, refs, src, SHAPES)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_short_softmax_equals_torchs():
    g = torch.Generator().manual_seed(0)
    # attention logits of every scale, up to ones that would overflow exp unshifted
    x = torch.randn(64, 8, 12, generator=g) * torch.tensor([1.0, 30.0, 1e3, 1e4]).repeat(16).view(64, 1, 1)
    torch.testing.assert_close(softmax_short(x), x.softmax(-1), atol=1e-6, rtol=1e-5)
