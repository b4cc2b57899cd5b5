"""DeepLab-stem ResNet (three 3x3 stem convolutions), as used by M2FP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import BackboneConfig
from .layers import ConvNorm, make_norm

BLOCKS_PER_STAGE = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
STAGE_INDEX = {"res2": 2, "res3": 3, "res4": 4, "res5": 5}


class Bottleneck(nn.Module):
    def __init__(
        self, in_channels: int, out_channels: int, *, bottleneck_channels: int, stride: int,
        num_groups: int, norm: str, stride_in_1x1: bool, dilation: int,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.stride = stride
        self.shortcut = (
            ConvNorm(in_channels, out_channels, kernel_size=1, stride=stride, bias=False,
                     norm=make_norm(norm, out_channels))
            if in_channels != out_channels else None
        )
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = ConvNorm(in_channels, bottleneck_channels, kernel_size=1, stride=stride_1x1,
                              bias=False, norm=make_norm(norm, bottleneck_channels))
        self.conv2 = ConvNorm(bottleneck_channels, bottleneck_channels, kernel_size=3,
                              stride=stride_3x3, padding=dilation, dilation=dilation,
                              groups=num_groups, bias=False,
                              norm=make_norm(norm, bottleneck_channels))
        self.conv3 = ConvNorm(bottleneck_channels, out_channels, kernel_size=1, bias=False,
                              norm=make_norm(norm, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        out += x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out)


# The stem's last convolution gives the network's largest map (128 channels at half the
# input's resolution: 45 MiB in bf16 at 1152x640), and max-pooling it allocates int64
# indices of the pooled size (45 MiB as well): both over glibc's largest mmap threshold
# (32 MiB), so every call maps them afresh and faults their pages in, which on a VM whose
# host reclaims freed guest memory cost a 960x540 `fast` parse 40-90 ms of its ~0.75 s (a
# Zen 5 VM; all of its ~1,070 page faults). Computed by pieces of output channels of at
# most STEM_CHUNK_BYTES (of conv3's output, and so of the indices, which take no more),
# every piece comes from (and goes back to) the heap instead.
STEM_CHUNK_BYTES = 28 * 2**20
# output channels per piece are a multiple of this (oneDNN's kernels block channels by 16)
STEM_CHUNK_CHANNELS = 16


class DeepLabStem(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        half = out_channels // 2
        self.out_channels = out_channels
        # None: conv3's output whole (M2FP.configure sets it by InferenceVariant.stem_in_pieces)
        self.chunk_bytes: int | None = STEM_CHUNK_BYTES
        self.conv1 = ConvNorm(in_channels, half, kernel_size=3, stride=2, padding=1, bias=False,
                              norm=make_norm(norm, half))
        self.conv2 = ConvNorm(half, half, kernel_size=3, padding=1, bias=False,
                              norm=make_norm(norm, half))
        self.conv3 = ConvNorm(half, out_channels, kernel_size=3, padding=1, bias=False,
                              norm=make_norm(norm, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu_(self.conv1(x))
        x = F.relu_(self.conv2(x))
        step = self.chunk_channels(x)
        if step is None:
            return self._pool(self.conv3(x))
        conv = self.conv3
        return torch.cat([
            self._pool(F.conv2d(x, conv.weight[start:start + step],
                                None if conv.bias is None else conv.bias[start:start + step],
                                conv.stride, conv.padding, conv.dilation, conv.groups))
            for start in range(0, self.out_channels, step)], dim=1)

    def chunk_channels(self, x: torch.Tensor) -> int | None:
        """conv3's output channels per piece for input x (conv2's output, in conv3's
        output dtype): the most, in multiples of STEM_CHUNK_CHANNELS, whose output takes no
        more than `chunk_bytes` (at least STEM_CHUNK_CHANNELS). None: whole, when it fits
        in one, or when conv3 still has a norm or an activation of its own (with its
        BatchNorm folded into it, as every optimisation level does, each output channel
        is just its slice of the weights)."""
        conv = self.conv3
        if self.chunk_bytes is None or conv.norm is not None or conv.activation is not None:
            return None
        channel_bytes = x.shape[0] * x.shape[-2] * x.shape[-1] * x.element_size()
        step = max(STEM_CHUNK_CHANNELS,
                   self.chunk_bytes // channel_bytes // STEM_CHUNK_CHANNELS * STEM_CHUNK_CHANNELS)
        return step if step < self.out_channels else None

    @staticmethod
    def _pool(x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu_(x), kernel_size=3, stride=2, padding=1)


class DeepLabResNet(nn.Module):
    """Returns a dict of the requested stage outputs (`res2`..`res5`)."""

    def __init__(self, cfg: BackboneConfig, in_channels: int = 3) -> None:
        super().__init__()
        if cfg.depth not in BLOCKS_PER_STAGE:
            raise ValueError(f"unsupported ResNet depth {cfg.depth}")
        if cfg.res4_dilation not in (1, 2) or cfg.res5_dilation not in (1, 2, 4):
            raise ValueError("res4_dilation must be 1 or 2 and res5_dilation 1, 2 or 4")
        self.stem = DeepLabStem(in_channels, cfg.stem_out_channels, cfg.norm)
        self.out_features = cfg.out_features
        self.channels: dict[str, int] = {}
        self.strides: dict[str, int] = {}

        blocks_per_stage = BLOCKS_PER_STAGE[cfg.depth]
        last_stage = max(STAGE_INDEX[f] for f in cfg.out_features)
        in_ch, out_ch = cfg.stem_out_channels, cfg.res2_out_channels
        bottleneck = cfg.num_groups * cfg.width_per_group
        stride = 4  # the stem's
        self.stage_names: list[str] = []
        for idx, stage_index in enumerate(range(2, last_stage + 1)):
            dilation = {4: cfg.res4_dilation, 5: cfg.res5_dilation}.get(stage_index, 1)
            n_blocks = blocks_per_stage[idx]
            first_stride = 1 if idx == 0 or dilation > 1 else 2
            if stage_index == 5:
                dilations = [dilation * g for g in cfg.res5_multi_grid]
            else:
                dilations = [dilation] * n_blocks
            blocks = []
            for b in range(n_blocks):
                blocks.append(Bottleneck(
                    in_ch if b == 0 else out_ch, out_ch, bottleneck_channels=bottleneck,
                    stride=first_stride if b == 0 else 1, num_groups=cfg.num_groups,
                    norm=cfg.norm, stride_in_1x1=cfg.stride_in_1x1, dilation=dilations[b],
                ))
            name = f"res{stage_index}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            stride *= first_stride
            self.strides[name] = stride
            self.channels[name] = out_ch
            in_ch, out_ch, bottleneck = out_ch, out_ch * 2, bottleneck * 2

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(x)
        outputs = {}
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self.out_features:
                outputs[name] = x
        return outputs
