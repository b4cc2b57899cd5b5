"""Small building blocks shared by the backbone, pixel decoder and transformer decoder."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


@torch.library.custom_op("m2fp::resize_bilinear", mutates_args=())
def _opaque_resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    # contiguous out, as the fake below promises the compiler; a channels-last input is
    # read as it is (shrinking it is fast, converting it is not), others made contiguous
    source = x if x.is_contiguous(memory_format=torch.channels_last) else x.contiguous()
    return F.interpolate(source, size=(height, width), mode="bilinear", align_corners=False).contiguous()


@_opaque_resize.register_fake
def _(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-2], height, width))


def resize_bilinear(x: torch.Tensor, size) -> torch.Tensor:
    """`F.interpolate(x, size, mode="bilinear", align_corners=False)`. Under torch.compile
    it stays ATen's kernel, an op the compiler does not look into: inductor's own lowering
    (index arithmetic per output pixel) is 2-3x slower on CPU. Exporters see the plain
    interpolate, which ONNX has."""
    if torch.compiler.is_dynamo_compiling() and not torch.compiler.is_exporting():
        return _opaque_resize(x, size[0], size[1])
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@torch.library.custom_op("m2fp::onednn_linear", mutates_args=())
def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")  # see Linear


@_onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """`F.linear` through oneDNN's matrix multiplication instead of ATen's addmm. ATen's
    fp32 addmm is MKL's, which ran at half oneDNN's speed on an AMD Zen 5 (177-190 against
    ~400 GFLOP/s on the encoder's shapes; equal to float rounding). In bf16 both are oneDNN.
    Under torch.compile the call is an op of its own, which inductor keeps as it is (its
    lowering of oneDNN's linear wants static shapes); eagerly it is oneDNN's op itself
    (calling a custom op imports torch._dynamo, ~70 MB of idle memory)."""
    if torch.is_autocast_enabled("cpu"):  # what autocast does to F.linear's operands
        dtype = torch.get_autocast_dtype("cpu")
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if torch.compiler.is_dynamo_compiling():
        return _onednn_linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class Linear(nn.Linear):
    """`nn.Linear` whose product can run through oneDNN (`onednn_linear`) instead of ATen's
    addmm (`InferenceVariant.onednn_linear`, set by `M2FP.configure`)."""

    onednn = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.onednn:
            return super().forward(x)
        return onednn_linear(x, self.weight, self.bias)


class MultiheadAttention(nn.MultiheadAttention):
    """`nn.MultiheadAttention` (same parameters, same checkpoint keys) whose input and
    output projections can run through oneDNN like `Linear`'s, around the same scaled
    dot-product attention (`onednn`, set by `M2FP.configure`). Sequence-first inputs,
    no dropout (inference), an optional additive mask of shape (batch x heads, L, S)."""

    onednn = False

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None, need_weights: bool = False):
        if not self.onednn or need_weights:
            return super().forward(query, key, value, attn_mask=attn_mask, need_weights=need_weights)
        length, batch, width = query.shape
        heads = self.num_heads
        # the packed projection's rows: queries, keys, values (contiguous slices)
        weight, bias = self.in_proj_weight, self.in_proj_bias
        if key is query:  # self-attention: queries and keys in one product
            q, k = onednn_linear(query, weight[:2 * width], bias[:2 * width]).chunk(2, dim=-1)
        else:
            q = onednn_linear(query, weight[:width], bias[:width])
            k = onednn_linear(key, weight[width:2 * width], bias[width:2 * width])
        v = onednn_linear(value, weight[2 * width:], bias[2 * width:])

        def per_head(t: torch.Tensor) -> torch.Tensor:  # (L, B, E) -> (B, heads, L, E / heads)
            return t.reshape(t.shape[0], batch, heads, width // heads).permute(1, 2, 0, 3)

        mask = None if attn_mask is None else attn_mask.view(batch, heads, length, key.shape[0])
        out = F.scaled_dot_product_attention(per_head(q), per_head(k), per_head(v), attn_mask=mask)
        out = out.permute(2, 0, 1, 3).reshape(length, batch, width)
        return onednn_linear(out, self.out_proj.weight, self.out_proj.bias), None


# pixels per pass of GroupNorm's channels-last variance: bounds its temporary to a few MB
GROUP_NORM_CHUNK = 2048


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` that keeps a channels-last map channels-last, with statistics as
    accurate as torch's NCHW kernel's. torch's own channels-last kernel on CPU is less
    accurate (errors of 5e-5 to 9e-5 on the unit-scale outputs of the 1/4-scale maps,
    where the NCHW kernel stays within 3e-6; far worse on maps far from zero, bf16 ones
    included, tests/test_layers.py): here the mean is a cascaded sum and the variance a
    second pass over the deviations from it, `chunk` pixels at a time (set by
    `M2FP.configure`; None: all at once, for graphs made once for every input size).
    Other layouts take torch's kernel. `in_place`: outside autograd, the output overwrites
    the input map (for a map nothing else reads, as a convolution's output: at 1/4 scale
    one full map less at the network's peak)."""

    chunk: int | None = GROUP_NORM_CHUNK

    def __init__(self, num_groups: int, num_channels: int, *, in_place: bool = False, **kwargs) -> None:
        super().__init__(num_groups, num_channels, **kwargs)
        self.in_place = in_place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x)
        batch, channels, height, width = x.shape
        groups, per_group = self.num_groups, channels // self.num_groups
        # (batch, pixel, channel): a view of the map. Statistics in fp32 whatever the
        # map's dtype, the output in it (as torch's kernel under bf16 autocast); a bf16
        # map is widened a chunk at a time, never whole (a 1/4-scale map is ~50 MB in fp32)
        pixels = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        count = height * width * per_group
        parts = [pixels] if self.chunk is None else pixels.split(self.chunk, dim=1)
        # summing with dtype=float32 would widen a bf16 map whole first
        sums = pixels.sum(1) if x.dtype == torch.float32 else sum(part.float().sum(1) for part in parts)
        mean = sums.view(batch, groups, per_group).sum(-1, keepdim=True) / count
        centre = mean.expand(batch, groups, per_group).reshape(batch, 1, channels)
        squares = sum((part.float() - centre).square().sum(1) for part in parts)
        var = squares.view(batch, groups, per_group).sum(-1, keepdim=True) / count
        per_channel = (1, groups, per_group)
        weight, bias = ((self.weight.float().view(per_channel), self.bias.float().view(per_channel))
                        if self.affine else (1.0, 0.0))
        scale = (var + self.eps).rsqrt() * weight
        shift = bias - mean * scale
        scale, shift = (t.expand(batch, groups, per_group).reshape(batch, 1, channels) for t in (scale, shift))
        # computed in fp32 (the operands' common type), rounded once into the map's dtype
        if torch.is_grad_enabled():  # training (the stand-ins): out= is not differentiable
            out = torch.addcmul(shift, pixels, scale).to(x.dtype)
            return out.view(batch, height, width, channels).permute(0, 3, 1, 2)
        out = x if self.in_place else torch.empty_like(x, memory_format=torch.channels_last)
        out_pixels = out.permute(0, 2, 3, 1).view(batch, height * width, channels)
        destinations = [out_pixels] if self.chunk is None else out_pixels.split(self.chunk, dim=1)
        for part, destination in zip(parts, destinations):
            torch.addcmul(shift, part, scale, out=destination)
        return out


class ConvNorm(nn.Conv2d):
    """A convolution with an optional norm and activation applied after it.

    The norm is a child module named `norm`, which is what gives the hub checkpoints
    their key layout (`conv1.weight`, `conv1.norm.running_mean`, ...).
    """

    def __init__(
        self,
        *args,
        norm: nn.Module | None = None,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def make_norm(kind: str, channels: int) -> nn.Module:
    """Norm layer by its configuration name. SyncBN behaves as BN at inference."""
    if kind in ("BN", "SyncBN", "nnSyncBN"):
        return nn.BatchNorm2d(channels)
    if kind == "GN":
        return nn.GroupNorm(32, channels)
    raise ValueError(f"unsupported norm {kind!r}")


class MLP(nn.Module):
    """Linear layers with ReLU between them (not after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x


def sine_position_embedding(
    batch: int, height: int, width: int, num_feats: int, *, device: torch.device,
    temperature: float = 10000.0,
) -> torch.Tensor:
    """DETR's normalised sine embedding for an unmasked (B, *, H, W) map -> (B, 2F, H, W).

    Written to produce the same float32 values as the reference (cumsum of ones, then
    normalised by the last value + 1e-6 and scaled by 2*pi), since the decoder's outputs
    are compared against ModelScope's to 1e-3.

    At inference the result is shared by every caller asking for the same map size (see
    `_shared_sine_embedding`): read it, never write into it.
    """
    if torch.is_inference_mode_enabled() and not torch.compiler.is_compiling():
        return _shared_sine_embedding(batch, height, width, num_feats, torch.device(device), temperature)
    return _sine_embedding(batch, height, width, num_feats, device, temperature)


# The embeddings of the last two input sizes' three levels (whichever model asked): they
# depend on the map size alone, the pixel decoder and the decoder ask for the same three
# per parse, and the 1/8-scale one takes ~9 ms (~20 ms a 960x540 parse in all), for
# 15 MB kept per input size at 1152x640, 18 MB at the largest (1344x640).
@lru_cache(maxsize=6)
def _shared_sine_embedding(batch: int, height: int, width: int, num_feats: int, device: torch.device,
                           temperature: float) -> torch.Tensor:
    return _sine_embedding(batch, height, width, num_feats, device, temperature)


def _sine_embedding(batch: int, height: int, width: int, num_feats: int, device,
                    temperature: float) -> torch.Tensor:
    ones = torch.ones((batch, height, width), dtype=torch.float32, device=device)
    y_embed = ones.cumsum(1, dtype=torch.float32)
    x_embed = ones.cumsum(2, dtype=torch.float32)
    eps, scale = 1e-6, 2 * math.pi
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale

    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
