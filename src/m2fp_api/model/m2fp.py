"""The M2FP network: backbone -> pixel decoder -> masked-attention decoder.

Module names mirror ModelScope's `M2FP` so that hub state dicts load with
`strict=True`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import STEM_CHUNK_BYTES, DeepLabResNet, DeepLabStem
from .config import M2FPConfig
from .deform_attn import GATHER, GRID_SAMPLE, QUERY_CHUNK, MSDeformAttn
from .layers import GROUP_NORM_CHUNK, GroupNorm, Linear, MultiheadAttention
from .pixel_decoder import FFN_CHUNK, EncoderLayer, MSDeformAttnPixelDecoder
from .transformer_decoder import MaskedTransformerDecoder

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
SIZE_DIVISIBILITY = 32
# runs the heads on the backbone's features: class logits and mask logits
HeadRunner = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class InferenceVariant:
    """How the network computes its outputs. Every variant computes the same function,
    up to float rounding (bfloat16: up to its precision); `M2FP.configure` applies one to
    every module concerned at once. The defaults are a freshly built network's."""

    # deformable attention as one weighted gather; False: `grid_sample` per level, as
    # ModelScope computes it (and ONNX, which lacks the gather's embedding_bag)
    gathered_sampling: bool = True
    # decoder attention masks from the mask features resized to each level first (16-64x
    # fewer pixels per layer); False: full-resolution mask logits resized every layer,
    # as ModelScope does (equal up to rounding: resizing is linear)
    level_masks: bool = False
    # the backbone and the pixel decoder's convolutions in channels-last layout, which
    # oneDNN's convolutions prefer on CPU (1x1: twice as fast in fp32, 6x in bf16); its
    # group norms keep that layout with NCHW's accuracy (layers.GroupNorm)
    channels_last: bool = False
    # bfloat16: the network under bf16 autocast (matrix products in bf16; normalisation
    # statistics, softmax, sampling locations and the outputs stay fp32, see deform_attn)
    dtype: torch.dtype = torch.float32
    # linear layers and attention projections through oneDNN's matrix product
    # (`layers.Linear`, `layers.MultiheadAttention`); False: ATen's addmm, as ModelScope
    # computes them (and what exporters know)
    onednn_linear: bool = False
    # deformable-attention queries, feed-forward tokens and group-norm pixels in bounded
    # chunks (memory, not results); False for graphs made once for every input size, as
    # the number of chunks would be frozen at one size's
    chunked: bool = True
    # the stem's last convolution and max-pool by pieces of output channels
    # (`backbone.STEM_CHUNK_BYTES`; memory, not results); False for an exported graph, as
    # `chunked`. Apart from it: compiled heads run unchunked, the eager stem need not
    stem_in_pieces: bool = True
    # runs the heads instead of `sem_seg_head` when set: its compiled twin
    # (engine.compiled), which must compute the same thing
    heads: HeadRunner | None = None

    def __post_init__(self) -> None:
        if self.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the network runs in float32 or under bfloat16 autocast, not {self.dtype}")
        if self.onednn_linear and not torch.backends.mkldnn.is_available():
            raise ValueError("this torch has no oneDNN for onednn_linear")


@dataclass
class NetworkOutput:
    pred_logits: torch.Tensor  # (B, Q, C+1)
    pred_masks: torch.Tensor  # (B, Q, Hp/4, Wp/4)
    padded_size: tuple[int, int]  # (Hp, Wp): the input padded to a multiple of 32


class Head(nn.Module):
    """`sem_seg_head` in the checkpoint."""

    def __init__(self, cfg: M2FPConfig, channels: dict[str, int], strides: dict[str, int]) -> None:
        super().__init__()
        self.pixel_decoder = MSDeformAttnPixelDecoder(cfg.pixel_decoder, channels, strides)
        self.predictor = MaskedTransformerDecoder(cfg.decoder, cfg.pixel_decoder.conv_dim)

    def forward(self, features: dict[str, torch.Tensor]):
        mask_features, multi_scale = self.pixel_decoder(features)
        return self.predictor(multi_scale, mask_features)


def prepare_input(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in 0..255 -> normalised, padded bottom/right with zeros to a
    multiple of 32 (after normalisation, as detectron2's ImageList does)."""
    x = (images.to(mean.dtype) - mean) / std
    h, w = x.shape[-2:]
    ph = -(-h // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY
    pw = -(-w // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY
    return F.pad(x, (0, pw - w, 0, ph - h), value=0.0)


class M2FP(nn.Module):
    def __init__(self, cfg: M2FPConfig) -> None:
        super().__init__()
        self.config = cfg
        self.backbone = DeepLabResNet(cfg.backbone)
        self.sem_seg_head = Head(cfg, self.backbone.channels, self.backbone.strides)
        self.register_pixel_statistics()
        self.variant = InferenceVariant()

    def configure(self, variant: InferenceVariant) -> None:
        """Compute as `variant` says from now on, in every module it concerns."""
        sampler = GATHER if variant.gathered_sampling else GRID_SAMPLE
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.sampler = sampler
                module.query_chunk = QUERY_CHUNK if variant.chunked else None
            elif isinstance(module, EncoderLayer):
                module.ffn_chunk = FFN_CHUNK if variant.chunked else None
            elif isinstance(module, (Linear, MultiheadAttention)):
                module.onednn = variant.onednn_linear
            elif isinstance(module, GroupNorm):
                module.chunk = GROUP_NORM_CHUNK if variant.chunked else None
            elif isinstance(module, DeepLabStem):
                module.chunk_bytes = STEM_CHUNK_BYTES if variant.stem_in_pieces else None
        self.sem_seg_head.predictor.resize_features_first = variant.level_masks
        if variant.channels_last != self.variant.channels_last:
            layout = torch.channels_last if variant.channels_last else torch.contiguous_format
            self.backbone.to(memory_format=layout)
            self.sem_seg_head.pixel_decoder.to(memory_format=layout)
        self.variant = variant

    def register_pixel_statistics(self) -> None:
        """Normalisation constants; not in the checkpoint (ModelScope registers them
        non-persistent too), so they are set again after loading onto a meta-built net."""
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return prepare_input(images, self.pixel_mean, self.pixel_std)

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits and mask logits of a prepared input (what ONNX exports)."""
        variant = self.variant
        if variant.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant.dtype == torch.bfloat16):
            features = self.backbone(x)
            logits, masks = (variant.heads or self.sem_seg_head)(features)
        # post-processing compares probabilities across queries: in fp32
        return logits.float(), masks.float()

    def forward(self, images: torch.Tensor) -> NetworkOutput:
        """images: (B, 3, H, W) RGB in 0..255, all the same size."""
        x = self.prepare(images)
        logits, masks = self.predict(x)
        return NetworkOutput(pred_logits=logits, pred_masks=masks, padded_size=tuple(x.shape[-2:]))
