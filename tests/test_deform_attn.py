"""The gathered formulation of multi-scale deformable attention against the reference's
grid_sample one, including taps outside the maps (zero padding) and batches."""

from __future__ import annotations

import pytest
import torch

from m2fp_api.model.deform_attn import (
    GATHER, GRID_SAMPLE, MSDeformAttn, gather_and_weight, gather_table, sample_and_weight, softmax_short,
)

# the levels' sizes as the encoder orders them (coarse first), and one out of order
SHAPES = [(3, 4), (5, 7), (10, 13)]


@pytest.mark.parametrize("batch, shapes", [(1, SHAPES), (3, SHAPES), (2, [(6, 2), (3, 9), (1, 1)])])
def test_gather_and_weight_equals_grid_sample(batch, shapes):
    g = torch.Generator().manual_seed(batch)
    heads, dim, queries, points = 4, 8, 50, 3
    total = sum(h * w for h, w in shapes)
    value = torch.randn(batch, total, heads, dim, generator=g)
    # a fifth of the taps land just outside [0, 1] (corners there read zeros), some far
    # outside, some exactly on the maps' edges
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=g) * 1.4 - 0.2
    locations[:, :5] *= 20
    locations[:, 5:10] = locations[:, 5:10].round()
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=g)
    expected = sample_and_weight(value, shapes, locations, weights)
    got = gather_and_weight(gather_table(value, shapes, points), shapes, locations, weights)
    assert got.shape == (batch, queries, heads * dim)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_module_output_does_not_depend_on_the_sampler_or_chunking():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=len(SHAPES), n_heads=4, n_points=3).eval()
    total = sum(h * w for h, w in SHAPES)
    query, src = torch.randn(2, total, 32), torch.randn(2, total, 32)
    refs = torch.rand(2, total, len(SHAPES), 2)
    with torch.inference_mode():
        attn.sampler, attn.query_chunk = GRID_SAMPLE, None
        expected = attn(query, refs, src, SHAPES)
        attn.sampler, attn.query_chunk = GATHER, 17
        got = attn(query, refs, src, SHAPES)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_gathered_sampling_has_grid_samples_gradients():
    """The stand-in trainer differentiates through the gathered formulation."""
    g = torch.Generator().manual_seed(0)
    heads, dim, queries, points = 2, 4, 30, 2
    total = sum(h * w for h, w in SHAPES)
    value = torch.randn(1, total, heads, dim, generator=g)
    locations = torch.rand(1, queries, heads, len(SHAPES), points, 2, generator=g) * 1.4 - 0.2
    weights = torch.rand(1, queries, heads, len(SHAPES), points, generator=g)
    grads = []
    for sample in (lambda v, l, w: sample_and_weight(v, SHAPES, l, w),
                   lambda v, l, w: gather_and_weight(gather_table(v, SHAPES, points), SHAPES, l, w)):
        inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
        sample(*inputs).square().sum().backward()
        grads.append([t.grad for t in inputs])
    for expected, got in zip(*grads):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_short_softmax_equals_torchs():
    g = torch.Generator().manual_seed(0)
    # attention logits of every scale, up to ones that would overflow exp unshifted
    x = torch.randn(64, 8, 12, generator=g) * torch.tensor([1.0, 30.0, 1e3, 1e4]).repeat(16).view(64, 1, 1)
    torch.testing.assert_close(softmax_short(x), x.softmax(-1), atol=1e-6, rtol=1e-5)


def test_gathered_sampling_compiles_whole():
    """Compiled heads trace the sampler in inference mode: one graph, no breaks (an out=
    into a strided slice made the compiler skip the whole frame)."""
    import torch._dynamo

    g = torch.Generator().manual_seed(0)
    heads, dim, queries, points = 4, 8, 20, 3
    total = sum(h * w for h, w in SHAPES)
    value = torch.randn(1, total, heads, dim, generator=g)
    locations = torch.rand(1, queries, heads, len(SHAPES), points, 2, generator=g)
    weights = torch.rand(1, queries, heads, len(SHAPES), points, generator=g)
    with torch.inference_mode():
        values = gather_table(value, SHAPES, points)
        explained = torch._dynamo.explain(gather_and_weight)(values, SHAPES, locations, weights)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
