"""Typed view of the `model` section of a ModelScope M2FP `configuration.json`.

Every size the network needs is read from here; nothing is assumed from the hub
models, so the tiny test checkpoints and the full-size ones share one code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class BackboneConfig:
    depth: int
    num_groups: int
    width_per_group: int
    norm: str
    stem_out_channels: int
    res2_out_channels: int
    stride_in_1x1: bool
    res4_dilation: int
    res5_dilation: int
    res5_multi_grid: tuple[int, ...]
    out_features: tuple[str, ...]


@dataclass(frozen=True)
class PixelDecoderConfig:
    in_features: tuple[str, ...]
    transformer_in_features: tuple[str, ...]
    nheads: int
    dim_feedforward: int
    enc_layers: int
    conv_dim: int
    mask_dim: int
    common_stride: int
    # sampling points per head and level; Mask2Former's encoder always uses 4
    n_points: int = 4


@dataclass(frozen=True)
class DecoderConfig:
    num_classes: int
    hidden_dim: int
    num_queries: int
    nheads: int
    dim_feedforward: int
    dec_layers: int
    pre_norm: bool
    mask_dim: int
    enforce_input_project: bool


@dataclass(frozen=True)
class M2FPConfig:
    backbone: BackboneConfig
    pixel_decoder: PixelDecoderConfig
    decoder: DecoderConfig
    classes: tuple[str, ...]
    single_human: bool
    # multiple-human parsing: index of the "Human" class (= number of part classes)
    num_parsing: int | None
    parsing_ins_score_thr: float
    parsing_on: bool
    semantic_on: bool
    # single-human parsing: the fixed network input, (width, height)
    single_human_size: tuple[int, int] | None

    @classmethod
    def from_model_section(cls, model: Mapping[str, Any]) -> "M2FPConfig":
        """Build from `configuration.json["model"]` (ModelScope's constructor kwargs)."""
        b, e, d = model["backbone"], model["encoder"], model["decoder"]
        backbone = BackboneConfig(
            depth=int(b["depth"]),
            num_groups=int(b["num_groups"]),
            width_per_group=int(b["width_per_group"]),
            norm=str(b["norm"]),
            stem_out_channels=int(b["stem_out_channels"]),
            res2_out_channels=int(b["res2_out_channels"]),
            stride_in_1x1=bool(b["stride_in_1x1"]),
            res4_dilation=int(b["res4_dilation"]),
            res5_dilation=int(b["res5_dilation"]),
            res5_multi_grid=tuple(int(x) for x in b["res5_multi_grid"]),
            out_features=tuple(b["out_features"]),
        )
        pixel_decoder = PixelDecoderConfig(
            in_features=tuple(e["in_features"]),
            transformer_in_features=tuple(e["transformer_in_features"]),
            nheads=int(e["transformer_nheads"]),
            dim_feedforward=int(e["transformer_dim_feedforward"]),
            enc_layers=int(e["transformer_enc_layers"]),
            conv_dim=int(e["conv_dim"]),
            mask_dim=int(e["mask_dim"]),
            common_stride=int(e["common_stride"]),
        )
        decoder = DecoderConfig(
            num_classes=int(d["num_classes"]),
            hidden_dim=int(d["hidden_dim"]),
            num_queries=int(d["num_queries"]),
            nheads=int(d["nheads"]),
            dim_feedforward=int(d["dim_feedforward"]),
            dec_layers=int(d["dec_layers"]),
            pre_norm=bool(d["pre_norm"]),
            mask_dim=int(d["mask_dim"]),
            enforce_input_project=bool(d["enforce_input_project"]),
        )
        single = bool(model.get("single_human", True))
        size = None
        if single:
            w, h = model["input_single_human"]["sizes"][0]
            size = (int(w), int(h))
        num_parsing = model.get("num_parsing")
        return cls(
            backbone=backbone,
            pixel_decoder=pixel_decoder,
            decoder=decoder,
            classes=tuple(model["classes"]),
            single_human=single,
            num_parsing=None if num_parsing is None else int(num_parsing),
            parsing_ins_score_thr=float(model.get("parsing_ins_score_thr", 0.5)),
            parsing_on=bool(model.get("parsing_on", False)),
            semantic_on=bool(model.get("semantic_on", True)),
            single_human_size=size,
        )

    @property
    def part_classes(self) -> tuple[str, ...]:
        """Classes that can appear in the class-id map (drops the multi-human "Human")."""
        if self.num_parsing is None:
            return self.classes
        return self.classes[: self.num_parsing]
