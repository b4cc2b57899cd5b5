"""Building blocks whose fast formulation must compute what torch's plain one does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from m2fp_api.model.layers import GroupNorm


def _map(seed: int = 0) -> torch.Tensor:
    """Like the pixel decoder's 1/4-scale maps of a 1138x640 input (~370 k values per
    group): unit-scale activations on per-channel offsets."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 64, 160, 288, generator=g) * 0.5 + torch.randn(1, 64, 1, 1, generator=g) * 4


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("chunk", [None, 1000])
def test_group_norm_keeps_channels_last_as_accurate_as_nchw(affine, chunk):
    norm = GroupNorm(8, 64, affine=affine)
    norm.chunk = chunk
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
            norm.bias.normal_(generator=torch.Generator().manual_seed(2))
    x = _map()
    exact = F.group_norm(x.double(), 8, *((norm.weight.double(), norm.bias.double()) if affine else ()))
    with torch.inference_mode():
        nchw = norm(x)
        channels_last = norm(x.contiguous(memory_format=torch.channels_last))
        torch_channels_last = F.group_norm(x.contiguous(memory_format=torch.channels_last), 8,
                                           norm.weight, norm.bias)
    differentiable = norm(x.contiguous(memory_format=torch.channels_last))  # as in training
    assert torch.equal(differentiable.detach(), channels_last)
    assert channels_last.is_contiguous(memory_format=torch.channels_last) and nchw.is_contiguous()
    nchw_error = float((nchw - exact).abs().max())
    assert float((channels_last - exact).abs().max()) <= 2 * nchw_error + 1e-7
    # what it is for: torch's channels-last kernel is several times less accurate
    assert float((torch_channels_last - exact).abs().max()) > 4 * nchw_error


def test_group_norm_under_bf16_autocast_gives_bf16_like_torch():
    norm = GroupNorm(8, 64)
    x = _map().bfloat16()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = norm(x.contiguous(memory_format=torch.channels_last))
        theirs = norm(x)  # NCHW: torch's kernel
    assert ours.dtype == theirs.dtype == torch.bfloat16
    # statistics in fp32 either way: the outputs differ by bf16's rounding at most
    assert float((ours.float() - theirs.float()).abs().max()) <= 2 ** -7 * float(theirs.float().abs().max())


def test_group_norm_of_a_bf16_map_far_from_zero_keeps_its_statistics():
    """Statistics from the deviations, not from E[x^2] - E[x]^2: torch's channels-last
    kernel loses the variance of a map sitting far from zero (here, at an offset of 200:
    errors of 0.36 on outputs up to 2.5, where bf16's own rounding is ~0.008)."""
    norm = GroupNorm(8, 64)
    x = (_map() + 200).bfloat16()
    exact = F.group_norm(x.double(), 8)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = norm(x.contiguous(memory_format=torch.channels_last))
    assert ours.dtype == torch.bfloat16
    assert float((ours.double() - exact).abs().max()) <= 2 ** -7 * float(exact.abs().max())
    torch_channels_last = F.group_norm(x.contiguous(memory_format=torch.channels_last), 8)
    assert float((torch_channels_last.double() - exact).abs().max()) > 4 * 2 ** -7 * float(exact.abs().max())


def test_group_norm_in_place_overwrites_only_outside_autograd():
    norm, in_place = GroupNorm(8, 64), GroupNorm(8, 64, in_place=True)
    x = _map().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = norm(x)
        overwritten = x.clone(memory_format=torch.channels_last)
        out = in_place(overwritten)
    assert out.data_ptr() == overwritten.data_ptr() and torch.equal(out, expected)
    kept = x.clone(memory_format=torch.channels_last)
    trained = in_place(kept)  # gradients enabled: the input stays as it was
    assert torch.equal(kept, x) and torch.equal(trained.detach(), expected)


def test_position_embeddings_are_shared_at_inference_only():
    """The pixel decoder and the decoder read the same embeddings per map size: at
    inference one tensor serves them (equal to a fresh one); with autograd on (the
    stand-in trainer) each call gets its own."""
    from m2fp_api.model.layers import _sine_embedding, sine_position_embedding

    fresh = _sine_embedding(1, 7, 9, 16, "cpu", 10000.0)
    with torch.inference_mode():
        first = sine_position_embedding(1, 7, 9, 16, device=torch.device("cpu"))
        again = sine_position_embedding(1, 7, 9, 16, device="cpu")
        other = sine_position_embedding(1, 9, 7, 16, device="cpu")
    assert again is first and torch.equal(first, fresh)
    assert other.shape == (1, 32, 9, 7)
    training = sine_position_embedding(1, 7, 9, 16, device="cpu")
    assert training is not first and not training.is_inference() and torch.equal(training, fresh)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_bytes", [100_000, 800_000])
def test_stem_computed_in_pieces_of_output_channels_equals_it_whole(dtype, chunk_bytes):
    """The stem's last convolution, ReLU and max-pool by pieces of output channels (bounded
    bytes each, the last one smaller where they do not divide) give what they give whole,
    bit for bit, in either dtype; a stem whose BatchNorm is not folded yet runs whole."""
    from m2fp_api.engine.optimize import fold_batchnorm
    from m2fp_api.model.backbone import DeepLabStem

    g = torch.Generator().manual_seed(0)
    stem = DeepLabStem(3, 128, "BN").eval()
    with torch.no_grad():
        for p in stem.parameters():
            p.normal_(0, 0.2, generator=g)
    x = torch.randn(1, 3, 96, 160, generator=g).contiguous(memory_format=torch.channels_last)
    conv2_output = torch.empty(1, 64, 48, 80, dtype=dtype)
    stem.chunk_bytes = chunk_bytes  # a channel of 48 x 80: 15,360 B in fp32, 7,680 B in bf16
    assert stem.chunk_channels(conv2_output) is None  # BatchNorm not folded
    assert fold_batchnorm(stem) == 3
    # the most channels, in 16s, within the bytes (at least 16): 100 kB -> 16 either way;
    # 800 kB -> 48 (48, 48, 32) in fp32 and 96 (96, 32) in bf16
    expected = 16 if chunk_bytes == 100_000 else (48 if dtype == torch.float32 else 96)
    assert stem.chunk_channels(conv2_output) == expected
    stem.to(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        pieces = stem(x)
        stem.chunk_bytes = None
        whole = stem(x)
    assert pieces.dtype == dtype and pieces.shape == (1, 128, 24, 40)
    assert pieces.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(pieces, whole)
