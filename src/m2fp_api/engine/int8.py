"""The backbone and the pixel decoder's feed-forwards in int8, for the `fast` backend on
CPUs with int8 dot products (VNNI, AMX-INT8): their products are about twice as fast as
in bf16 there (the feed-forwards: 2.8 against 7.7 ms a 4096-token chunk on a Zen 5).

Post-training static quantisation of the BatchNorm-folded ResNet's stages: weights per
output channel (symmetric int8), activations per tensor (asymmetric uint8) with ranges
observed once, at load, on `m2fp_api.oracle`'s procedural scenes; each convolution is
fused with its ReLU, and each block's last convolution with the residual sum and its
ReLU, so the activations stay uint8 from the first stage to the last and only the stage
outputs the heads read are turned back into floats. Judged like every approximation, by
agreement with `exact` on the trained fidelity oracle (tests/test_backends.py, and the
benchmark).

The encoder's feed-forwards are quantised the same way (`quantize_feed_forwards`), their
ranges observed with the int8 backbone already in place; linear1's ReLU output stays
uint8 into linear2. On the tiny oracle agreement went from 99.94 to 99.84 %; on the
full-size stand-in it did not move (99.73 -> 99.74 %).

The stem (three 3x3 convolutions at half resolution, ~15 % of the backbone's work) stays
in floats, bf16 under `fast`'s autocast: quantised, it was where nearly all the int8
error came from. On a full-size (ResNet-101) stand-in trained by
scripts/train_stand_in.py, agreement with `exact` on 8 held-out scenes rose from 99.42 %
to 99.73 % with the stem in floats (8 other scenes: 98.97 -> 99.54 %; floats for res2
and res3 instead of the stem: no gain; conv2 and conv3 in int8 with conv1 in bf16: 99.42 %
again), for ~55 ms more at 1152x640 (of ~0.3 s).

The kernels are oneDNN's int8 convolutions on plain uint8/int8 tensors, the operators
PyTorch's own compiler lowers quantised models to. oneDNN picks VNNI or AMX where the
CPU has them and runs correctly, without the speed, elsewhere; it keeps a primitive per
input shape. (PyTorch's older quantized-tensor kernels cache one primitive, for the
first shape they see: after the service's 128 px warm-up every photo ran the backbone
at half speed, and 2.13 deprecates those tensors.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..model import M2FP, M2FPConfig
from ..model.backbone import Bottleneck, DeepLabResNet, DeepLabStem
from ..model.layers import ConvNorm
from ..model.pixel_decoder import FFN_CHUNK, EncoderLayer
from .backends import cpu_supports_int8
from .compiled import input_sizes
from .preprocess import SHORT_SIDE

# procedural scenes whose activations set the ranges: seeds apart from the oracle's
# held-out ones, at a size that keeps the calibration under a second on the full-size
# backbone (ranges barely depend on it: the oracle's agreement is the check)
CALIBRATION_SEEDS = (9001, 9002, 9003)
CALIBRATION_SIZE = (384, 288)  # width, height


def packing_input_size(cfg: M2FPConfig) -> tuple[int, int]:
    """(height, width) of the network input a model's int8 weights are laid out for.
    oneDNN picks a convolution's weight layout by the size of its input, and reorders the
    weights at every call of another size that wants another layout: laid out for the
    calibration scenes' size, res5's 2048x1024 shortcut was reordered at each photo's call
    with oneDNN's slow generic int8 reorder (42 ms of a 960x540 parse on a Zen 5). A
    single-human model has one input size; a multiple-human one is laid out for the
    smallest a photo becomes, SHORT_SIDE both ways: of the 45 sizes with short side 640,
    all but four want its layouts (for that shortcut, 832x640 and 864x640 landscape and
    640x800 and 640x832 portrait, width x height, want another; the sizes with a shorter
    short side were not measured)."""
    if cfg.single_human:
        return input_sizes(cfg)[0]
    return SHORT_SIDE, SHORT_SIDE


# share of an activation's values left outside its range at each end: the rare extremes
# would otherwise spread the 256 levels thin over values that hardly occur (on the oracle:
# 99.9 % agreement with exact, against 99.8 % with the plain minimum and maximum)
CLIPPED = 1e-4
# values looked at per activation, evenly strided (a full map is millions)
SAMPLED = 200_000


@dataclass(frozen=True)
class QParams:
    """How an activation is stored: real value = (uint8 value - zero_point) * scale."""

    scale: float
    zero_point: int


@dataclass
class Range:
    """The span of the values seen at one point of the network, but for the `CLIPPED`
    share at each end, and the shape of the input it gets from the network input its
    weights are laid out for (`packing_input_size`)."""

    low: float = float("inf")
    high: float = float("-inf")
    packing_shape: list[int] | None = None

    def observe(self, x: torch.Tensor) -> None:
        # in memory order, as a view: flattening a channels-last map would copy it
        values = x.detach().as_strided((x.numel(),), (1,)) if _dense(x) else x.detach().flatten()
        values = values[:: max(1, values.numel() // SAMPLED)].float()
        k = max(1, int(values.numel() * CLIPPED))
        self.low = min(self.low, float(-(-values).topk(k).values[-1]))
        self.high = max(self.high, float(values.topk(k).values[-1]))

    def qparams(self, relu: bool, reduce_range: bool) -> QParams:
        """uint8 scale and zero point covering the range (and 0, which must be exact)."""
        low, high = (0.0 if relu else min(self.low, 0.0)), max(self.high, 0.0)
        levels = activation_levels(reduce_range)
        scale = max(high - low, 1e-8) / levels
        return QParams(scale, int(np.clip(round(-low / scale), 0, levels)))


def activation_levels(reduce_range: bool) -> int:
    """The largest uint8 value an activation takes: 7 bits when `reduce_range`."""
    return 127 if reduce_range else 255


def _dense(x: torch.Tensor) -> bool:
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


def quantize_activation(x: torch.Tensor, q: QParams, levels: int, overwrite: bool = False) -> torch.Tensor:
    """Floats -> uint8 at `q` (a new tensor, in x's layout). An fp32 x is used as the
    work space if `overwrite`, else left as it is (a feed-forward's input is also its
    residual)."""
    work = x.float() if overwrite else x.to(torch.float32, copy=True)
    return work.div_(q.scale).add_(q.zero_point).round_().clamp_(0, levels).to(torch.uint8)


def per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric int8 weights per output channel: (int8 weights, scales, zero points)."""
    weight = weight.detach().float()
    scales = (weight.abs().amax(dim=tuple(range(1, weight.dim()))) / 127).clamp(min=1e-12)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    qweight = (weight / scales.view(shape)).round().clamp(-127, 127).to(torch.int8)
    return qweight, scales, torch.zeros_like(scales, dtype=torch.long)


def float_dtype() -> torch.dtype:
    """The dtype a float layer's output has here: autocast's when it is on, else fp32."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32


class QuantizedConv(nn.Module):
    """One folded ConvNorm (no norm left) as an int8 convolution from uint8 at `inp` to
    uint8 at `out`, fused with its ReLU (`relu`), or, called with a shortcut, with the
    residual sum and the ReLU after it."""

    def __init__(self, conv: ConvNorm, inp: QParams, out: QParams, relu: bool,
                 input_shape: list[int] | None) -> None:
        super().__init__()
        if conv.norm is not None or conv.activation is not None:
            raise ValueError("quantise a backbone after folding its BatchNorm")
        qweight, self.weight_scales, self.weight_zero_points = per_channel_int8(conv.weight)
        self.geometry = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
        # the weights reordered once into the blocked layout oneDNN's kernels want for
        # inputs like `input_shape` (`packing_input_size`'s). Without a shape it lays them
        # out for a tiny input, and every photo-sized call then reorders them again (4-9x
        # slower convolutions); tiny inputs (the warm-up) pay that instead, which does not
        # matter
        self.packed = torch.ops.onednn.qconv_prepack(qweight, self.weight_scales, inp.scale, inp.zero_point,
                                                     *self.geometry, input_shape)
        self.bias = conv.bias.detach().float() if conv.bias is not None else None
        self.inp, self.out, self.relu = inp, out, relu

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor | None = None,
                shortcut_q: QParams | None = None) -> torch.Tensor:
        common = (self.packed, self.weight_scales, self.weight_zero_points)
        if shortcut is None:
            return torch.ops.onednn.qconv_pointwise(
                x, self.inp.scale, self.inp.zero_point, *common, self.bias, *self.geometry,
                self.out.scale, self.out.zero_point, None, "relu" if self.relu else "none", [], "")
        # oneDNN's sum post-op accumulates into the shortcut's memory: the block consumes it
        return torch.ops.onednn.qconv2d_pointwise.binary(
            x, self.inp.scale, self.inp.zero_point, *common, shortcut, self.bias, *self.geometry,
            self.out.scale, self.out.zero_point, None, shortcut_q.scale, shortcut_q.zero_point,
            "sum", 1.0, "relu", [], "")


class QuantizedBottleneck(nn.Module):
    def __init__(self, block: Bottleneck, inp: QParams, ranges: dict[nn.Module, Range],
                 reduce_range: bool) -> None:
        super().__init__()
        q1, q2 = (ranges[c].qparams(True, reduce_range) for c in (block.conv1, block.conv2))
        self.out = ranges[block].qparams(True, reduce_range)
        self.conv1 = QuantizedConv(block.conv1, inp, q1, True, ranges[block.conv1].packing_shape)
        self.conv2 = QuantizedConv(block.conv2, q1, q2, True, ranges[block.conv2].packing_shape)
        # no ReLU of its own: the block's comes after the residual sum, fused into it
        self.conv3 = QuantizedConv(block.conv3, q2, self.out, False, ranges[block.conv3].packing_shape)
        self.shortcut = None
        self.shortcut_q = inp
        if block.shortcut is not None:
            self.shortcut_q = ranges[block.shortcut].qparams(False, reduce_range)
            self.shortcut = QuantizedConv(block.shortcut, inp, self.shortcut_q, False,
                                          ranges[block.shortcut].packing_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 in, uint8 out (at `self.out`); x is overwritten when it is the shortcut."""
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return self.conv3(self.conv2(self.conv1(x)), shortcut, self.shortcut_q)


class Int8Backbone(nn.Module):
    """A DeepLabResNet's twin with its stages in int8 (the stem in floats): same input
    (normalised fp32), same outputs (a dict of stage maps, in autocast's dtype when it is
    on, else fp32), same `out_features`, `channels` and `strides`."""

    def __init__(self, backbone: DeepLabResNet, ranges: dict[nn.Module, Range], reduce_range: bool) -> None:
        super().__init__()
        self.out_features = backbone.out_features
        self.channels, self.strides = backbone.channels, backbone.strides
        self.stage_names = backbone.stage_names
        self.levels = activation_levels(reduce_range)
        self.stem = backbone.stem  # in floats (see the module's docstring)
        self.stem_output = q = ranges[backbone.stem].qparams(True, reduce_range)
        self.stage_outputs: dict[str, QParams] = {}
        for name in self.stage_names:
            blocks = []
            for block in getattr(backbone, name):
                blocks.append(QuantizedBottleneck(block, q, ranges, reduce_range))
                q = blocks[-1].out
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_outputs[name] = q

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # channels-last, as M2FP.predict hands the backbone its input
        q = quantize_activation(self.stem(x), self.stem_output, self.levels, overwrite=True)
        # in the dtype a float backbone's convolutions give under the same autocast, which
        # the heads (and their compiled graphs, made for one dtype) expect; channels-last,
        # as the float backbone gives its maps to the heads
        dtype = float_dtype()
        outputs = {}
        for name in self.stage_names:
            q = getattr(self, name)(q)
            if name in self.out_features:
                out = self.stage_outputs[name]
                floats = q.to(dtype, memory_format=torch.channels_last)
                outputs[name] = floats.sub_(out.zero_point).mul_(out.scale)
        return outputs


def _feed_forward(x: torch.Tensor, inp_scale: float, inp_zero_point: int, levels: int,
                  packed1: torch.Tensor, scales1: torch.Tensor, zero_points1: torch.Tensor, bias1: torch.Tensor,
                  hidden_scale: float, hidden_zero_point: int,
                  packed2: torch.Tensor, scales2: torch.Tensor, zero_points2: torch.Tensor, bias2: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    q = quantize_activation(x, QParams(inp_scale, inp_zero_point), levels)
    hidden = torch.ops.onednn.qlinear_pointwise(q, inp_scale, inp_zero_point, packed1, scales1, zero_points1,
                                                bias1, hidden_scale, hidden_zero_point, torch.uint8,
                                                "relu", [None], "")
    return torch.ops.onednn.qlinear_pointwise(hidden, hidden_scale, hidden_zero_point, packed2, scales2,
                                              zero_points2, bias2, 1.0, 0, dtype, "none", [None], "")


# under torch.compile: an op of its own, kept as it is (inductor lowers oneDNN's int8
# linear only for weights frozen into the graph, which compiled heads do not do)
_compiled_feed_forward = torch.library.custom_op("m2fp::int8_feed_forward", mutates_args=())(_feed_forward)


@_compiled_feed_forward.register_fake
def _(x, inp_scale, inp_zero_point, levels, packed1, scales1, zero_points1, bias1, hidden_scale,
      hidden_zero_point, packed2, scales2, zero_points2, bias2, dtype):
    return x.new_empty((*x.shape[:-1], bias2.shape[0]), dtype=dtype)


class QuantizedFeedForward(nn.Module):
    """An encoder layer's feed-forward, linear2(relu(linear1(x))), in int8: x to uint8 at
    `inp`, linear1 with its ReLU straight into uint8 at `hidden` (the 4x wider map never
    exists in floats), linear2 back to the dtype the float layers would give. Same
    weights per output channel as the backbone's; prepacked for `tokens` rows (a query
    chunk of the encoder: the shape every photo's chunks have)."""

    def __init__(self, linear1: nn.Linear, linear2: nn.Linear, inp: QParams, hidden: QParams,
                 levels: int, tokens: int) -> None:
        super().__init__()
        self.inp, self.hidden, self.levels = inp, hidden, levels
        self.first = self._pack(linear1, tokens)
        self.second = self._pack(linear2, tokens)

    @staticmethod
    def _pack(linear: nn.Linear, tokens: int) -> tuple:
        qweight, scales, zero_points = per_channel_int8(linear.weight)
        packed = torch.ops.onednn.qlinear_prepack(qweight, [tokens, linear.in_features])
        return packed, scales, zero_points, linear.bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = _compiled_feed_forward if torch.compiler.is_dynamo_compiling() else _feed_forward
        return run(x, self.inp.scale, self.inp.zero_point, self.levels, *self.first,
                   self.hidden.scale, self.hidden.zero_point, *self.second, float_dtype())


def quantize_feed_forwards(network: M2FP, inputs: list[torch.Tensor]) -> int:
    """Give every encoder layer of `network` an int8 feed-forward, with the ranges of its
    input and of linear1's output observed while `network` (as configured) runs `inputs`.
    Returns how many layers."""
    layers = [m for m in network.modules() if isinstance(m, EncoderLayer)]
    for layer in layers:  # observed through the float layers, whatever ran them before
        layer.feed_forward = None
    seen = {layer.linear1: (Range(), Range()) for layer in layers}

    def record(linear1, args, output):
        inp, hidden = seen[linear1]
        inp.observe(args[0])
        hidden.observe(output)  # before the ReLU: its range starts at 0 all the same

    hooks = [layer.linear1.register_forward_hook(record) for layer in layers]
    try:
        with torch.inference_mode():
            for x in inputs:
                network.predict(x)
    finally:
        for hook in hooks:
            hook.remove()
    reduce_range = not cpu_supports_int8()
    for layer in layers:
        inp, hidden = seen[layer.linear1]
        if inp.low > inp.high:  # never observed
            raise RuntimeError("an encoder layer's feed-forward never ran during calibration")
        layer.feed_forward = QuantizedFeedForward(
            layer.linear1, layer.linear2, inp.qparams(False, reduce_range), hidden.qparams(True, reduce_range),
            activation_levels(reduce_range), layer.ffn_chunk or FFN_CHUNK).eval()
    return len(layers)


def observe_ranges(backbone: DeepLabResNet, inputs: list[torch.Tensor],
                   packing_size: tuple[int, int]) -> dict[nn.Module, Range]:
    """Run the float backbone on `inputs` (network inputs, padded to SIZE_DIVISIBILITY),
    recording the range of the stem's output, of every convolution's output (before its
    ReLU) and of every block's output, and the shape of each convolution's input at
    `packing_size` (height, width)."""
    ranges: dict[nn.Module, Range] = {}
    watched = [m for m in backbone.modules() if isinstance(m, (ConvNorm, Bottleneck, DeepLabStem))]
    packing_height, packing_width = packing_size
    input_width = 0

    def record(module, args, output):
        seen = ranges.setdefault(module, Range())
        seen.observe(output)
        # the same channels, the spatial size divided by the same stride (each halving
        # rounds up: padded 3x3 and 1x1 convolutions and the stem's pooling alike), which
        # divides the padded input exactly
        batch, channels, _, width = args[0].shape
        stride = input_width // width
        if stride * width != input_width:
            raise ValueError(f"a calibration input {input_width} wide is not padded to the backbone's strides")
        seen.packing_shape = [batch, channels, -(-packing_height // stride), -(-packing_width // stride)]

    hooks = [m.register_forward_hook(record) for m in watched]
    try:
        with torch.inference_mode():
            for x in inputs:
                input_width = x.shape[-1]
                backbone(x)
    finally:
        for hook in hooks:
            hook.remove()
    return ranges


def calibration_inputs(prepare) -> list[torch.Tensor]:
    """The calibration scenes as network inputs (`prepare`: the network's normalisation)."""
    from .. import oracle

    width, height = CALIBRATION_SIZE
    images = [oracle.scene(seed, width, height).image for seed in CALIBRATION_SEEDS]
    return [prepare(torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].float())
            for im in images]


def quantize_backbone(backbone: DeepLabResNet, inputs: list[torch.Tensor],
                      packing_size: tuple[int, int]) -> Int8Backbone:
    """The int8 twin of a BatchNorm-folded backbone, calibrated on `inputs`, its weights
    laid out for a `packing_size` (height, width) network input. Without
    VNNI, activations get 7 bits: 8-bit products summed in pairs can saturate the 16-bit
    sums such CPUs compute int8 dot products with. (Only the calibrated range: the rare
    values beyond it, the `CLIPPED` share, can still take the 8th bit; `fast` picks
    int8 only on CPUs with VNNI or AMX, so this is the forced path of the tests.)"""
    return Int8Backbone(backbone, observe_ranges(backbone, inputs, packing_size),
                        reduce_range=not cpu_supports_int8()).eval()
