"""The backbone in int8, for the `fast` backend on CPUs with int8 dot products (VNNI,
AMX-INT8): its convolutions are about twice as fast as in bf16 there.

Post-training static quantisation of the BatchNorm-folded ResNet: weights per output
channel (symmetric int8), activations per tensor (asymmetric uint8) with ranges
observed once, at load, on `m2fp_api.oracle`'s procedural scenes; each convolution is
fused with its ReLU and each residual sum with its ReLU, so the tensors stay int8 from
the stem to the last stage, and only the stage outputs the heads read are turned back
into floats. Judged like every approximation, by agreement with `exact` on the trained
fidelity oracle (tests/test_backends.py, and the benchmark).

PyTorch's quantized kernels through oneDNN, which picks VNNI or AMX where the CPU has
them; elsewhere they run correctly, without the speed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..model.backbone import Bottleneck, DeepLabResNet
from ..model.layers import ConvNorm
from .backends import cpu_supports_int8

# PyTorch 2.13 (pinned) deprecates creating quantized tensors in favour of the separate
# torchao package; its quantized kernels work, and one more dependency would not pay:
# say so once here, not on every request
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
                        category=UserWarning)

# procedural scenes whose activations set the ranges: seeds apart from the oracle's
# held-out ones, at a size that keeps the calibration under a second on the full-size
# backbone (ranges barely depend on it: the oracle's agreement is the check)
CALIBRATION_SEEDS = (9001, 9002, 9003)
CALIBRATION_SIZE = (384, 288)  # width, height


# share of an activation's values left outside its range at each end: the rare extremes
# would otherwise spread the 256 levels thin over values that hardly occur (on the oracle:
# 99.9 % agreement with exact, against 99.8 % with the plain minimum and maximum)
CLIPPED = 1e-4
# values looked at per activation, evenly strided (a full map is millions)
SAMPLED = 200_000


@dataclass
class Range:
    """The span of the values seen at one point of the network, but for the `CLIPPED`
    share at each end."""

    low: float = float("inf")
    high: float = float("-inf")

    def observe(self, x: torch.Tensor) -> None:
        # in memory order, as a view: flattening a channels-last map would copy it
        values = x.detach().as_strided((x.numel(),), (1,)) if _dense(x) else x.detach().flatten()
        values = values[:: max(1, values.numel() // SAMPLED)].float()
        k = max(1, int(values.numel() * CLIPPED))
        self.low = min(self.low, float(-(-values).topk(k).values[-1]))
        self.high = max(self.high, float(values.topk(k).values[-1]))

    def qparams(self, relu: bool, reduce_range: bool) -> tuple[float, int]:
        """uint8 scale and zero point covering the range (and 0, which must be exact)."""
        low, high = (0.0 if relu else min(self.low, 0.0)), max(self.high, 0.0)
        levels = 127 if reduce_range else 255
        scale = max(high - low, 1e-8) / levels
        return scale, int(np.clip(round(-low / scale), 0, levels))


def _dense(x: torch.Tensor) -> bool:
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


class QuantizedConv(nn.Module):
    """One folded ConvNorm (no norm left) as an int8 convolution, optionally with its ReLU."""

    def __init__(self, conv: ConvNorm, out: Range, relu: bool, reduce_range: bool) -> None:
        super().__init__()
        if conv.norm is not None or conv.activation is not None:
            raise ValueError("quantise a backbone after folding its BatchNorm")
        weight = conv.weight.detach().float()
        scales = (weight.abs().amax(dim=(1, 2, 3)) / 127).clamp(min=1e-12).double()
        qweight = torch.quantize_per_channel(weight, scales, torch.zeros_like(scales, dtype=torch.long),
                                             0, torch.qint8)
        bias = conv.bias.detach().float() if conv.bias is not None else None
        self.packed = torch.ops.quantized.conv2d_prepack(qweight, bias, list(conv.stride),
                                                         list(conv.padding), list(conv.dilation),
                                                         conv.groups)
        self.scale, self.zero_point = out.qparams(relu, reduce_range)
        self.kernel = torch.ops.quantized.conv2d_relu if relu else torch.ops.quantized.conv2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.packed, self.scale, self.zero_point)


class QuantizedBottleneck(nn.Module):
    def __init__(self, block: Bottleneck, ranges: dict[nn.Module, Range], reduce_range: bool) -> None:
        super().__init__()
        self.conv1 = QuantizedConv(block.conv1, ranges[block.conv1], True, reduce_range)
        self.conv2 = QuantizedConv(block.conv2, ranges[block.conv2], True, reduce_range)
        self.conv3 = QuantizedConv(block.conv3, ranges[block.conv3], False, reduce_range)
        self.shortcut = (QuantizedConv(block.shortcut, ranges[block.shortcut], False, reduce_range)
                         if block.shortcut is not None else None)
        self.scale, self.zero_point = ranges[block].qparams(True, reduce_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(self.conv2(self.conv1(x)))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return torch.ops.quantized.add_relu(out, shortcut, self.scale, self.zero_point)


class Int8Backbone(nn.Module):
    """A DeepLabResNet's twin in int8: same input (normalised fp32), same outputs (a dict
    of stage maps, in autocast's dtype when it is on, else fp32), same `out_features`,
    `channels` and `strides`."""

    def __init__(self, backbone: DeepLabResNet, ranges: dict[nn.Module, Range], reduce_range: bool) -> None:
        super().__init__()
        self.out_features = backbone.out_features
        self.channels, self.strides = backbone.channels, backbone.strides
        self.stage_names = backbone.stage_names
        stem = backbone.stem
        self.input_scale, self.input_zero_point = ranges[backbone].qparams(False, reduce_range)
        self.stem = nn.Sequential(*(QuantizedConv(c, ranges[c], True, reduce_range)
                                    for c in (stem.conv1, stem.conv2, stem.conv3)))
        for name in self.stage_names:
            self.add_module(name, nn.Sequential(*(QuantizedBottleneck(b, ranges, reduce_range)
                                                  for b in getattr(backbone, name))))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        q = torch.quantize_per_tensor(x.float(), self.input_scale, self.input_zero_point, torch.quint8)
        q = F.max_pool2d(self.stem(q), kernel_size=3, stride=2, padding=1)
        # in the dtype a float backbone's convolutions give under the same autocast, which
        # the heads (and their compiled graphs, made for one dtype) expect
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32
        outputs = {}
        for name in self.stage_names:
            q = getattr(self, name)(q)
            if name in self.out_features:
                outputs[name] = q.dequantize().to(dtype)
        return outputs


def observe_ranges(backbone: DeepLabResNet, inputs: list[torch.Tensor]) -> dict[nn.Module, Range]:
    """Run the float backbone on `inputs`, recording the range of the input, of every
    convolution's output (before its ReLU) and of every block's output."""
    ranges: dict[nn.Module, Range] = {}
    watched = [m for m in backbone.modules() if isinstance(m, (ConvNorm, Bottleneck))]

    def record(module, args, output):
        ranges.setdefault(module, Range()).observe(output)

    hooks = [m.register_forward_hook(record) for m in watched]
    try:
        with torch.inference_mode():
            for x in inputs:
                ranges.setdefault(backbone, Range()).observe(x)
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


def quantize_backbone(backbone: DeepLabResNet, inputs: list[torch.Tensor]) -> Int8Backbone:
    """The int8 twin of a BatchNorm-folded backbone, calibrated on `inputs`. Without
    VNNI, activations get 7 bits: 8-bit products summed in pairs can saturate the 16-bit
    sums such CPUs compute int8 dot products with."""
    # oneDNN's kernels use AMX where the CPU has it; the default engine ("x86") sends
    # some shapes to FBGEMM, which does not (process-wide: this is its only user)
    torch.backends.quantized.engine = "onednn"
    return Int8Backbone(backbone, observe_ranges(backbone, inputs), reduce_range=not cpu_supports_int8()).eval()
