"""Mask2Former's MSDeformAttn pixel decoder: a deformable-attention encoder over the
coarse backbone levels plus a light FPN up to the mask-feature stride."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import PixelDecoderConfig
from .deform_attn import MSDeformAttn
from .layers import ConvNorm, GroupNorm, Linear, resize_bilinear, sine_position_embedding

# the transformer decoder always reads three scales
NUM_DECODER_LEVELS = 3
# tokens through the feed-forward at once: its hidden layer is 4x wider than the tokens,
# the largest live tensor of the encoder; rows are independent, so this is exact
FFN_CHUNK = 4096


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = Linear(d_model, d_ffn)
        self.linear2 = Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn_chunk: int | None = FFN_CHUNK  # None: all tokens at once (M2FP.configure)
        # what computes linear2(relu(linear1(x))) in their place, if anything (an engine's
        # int8 twin of the two layers); its own attribute, so checkpoints keep their keys
        self.feed_forward: nn.Module | None = None

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        if self.feed_forward is not None:
            return self.feed_forward(x)
        return self.linear2(F.relu(self.linear1(x)))

    def forward(self, src, pos, reference_points, spatial_shapes):
        src = self.norm1(src + self.self_attn(src + pos, reference_points, src, spatial_shapes))
        if self.ffn_chunk is None:
            return self.norm2(src + self.ffn(src))
        return torch.cat([self.norm2(part + self.ffn(part)) for part in src.split(self.ffn_chunk, dim=1)], dim=1)


class Encoder(nn.Module):
    def __init__(self, layer_args: dict, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(**layer_args) for _ in range(num_layers))


class DeformableEncoder(nn.Module):
    """`transformer` in the checkpoint: level embeddings plus the encoder layers."""

    def __init__(self, d_model: int, nhead: int, num_layers: int, d_ffn: int, n_levels: int,
                 n_points: int) -> None:
        super().__init__()
        self.encoder = Encoder(dict(d_model=d_model, d_ffn=d_ffn, n_levels=n_levels,
                                    n_heads=nhead, n_points=n_points), num_layers)
        self.level_embed = nn.Parameter(torch.zeros(n_levels, d_model))

    @staticmethod
    def reference_points(spatial_shapes, n_levels, device) -> torch.Tensor:
        """Pixel centres of every level in [0, 1], repeated for each level: (1, S, L, 2)."""
        refs = []
        for h, w in spatial_shapes:
            # the reference's linspace(0.5, n - 0.5, n), bit for bit (its step is exactly
            # 1), written so that an exported graph keeps n symbolic (linspace's count
            # is a plain int to the exporter)
            ref_y, ref_x = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=device) + 0.5,
                torch.arange(w, dtype=torch.float32, device=device) + 0.5,
                indexing="ij",
            )
            refs.append(torch.stack((ref_x.reshape(-1) / w, ref_y.reshape(-1) / h), -1))
        return torch.cat(refs, 0)[None, :, None, :].expand(1, -1, n_levels, 2)

    def forward(self, srcs: list[torch.Tensor], pos_embeds: list[torch.Tensor]):
        """Consumes `srcs` and `pos_embeds` (emptied once flattened, to free them)."""
        spatial_shapes = [(s.shape[2], s.shape[3]) for s in srcs]
        out = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        # in the tokens' dtype (bf16 under autocast): each layer's query, tokens + positions,
        # only ever reaches bf16 matrix products there, and added across dtypes it took
        # ATen's slow mixed-dtype path into an fp32 map twice the size (fast 960x540: 891
        # -> 817 ms a parse, four fresh process pairs; oracle agreement unchanged)
        pos_flat = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
             for lvl, p in enumerate(pos_embeds)], 1).to(out.dtype)
        srcs.clear()
        pos_embeds.clear()
        refs = self.reference_points(spatial_shapes, len(spatial_shapes), out.device)
        for layer in self.encoder.layers:
            out = layer(out, pos_flat, refs, spatial_shapes)
        return out, spatial_shapes


class MSDeformAttnPixelDecoder(nn.Module):
    def __init__(self, cfg: PixelDecoderConfig, channels: dict[str, int], strides: dict[str, int]) -> None:
        super().__init__()
        conv_dim = self.conv_dim = cfg.conv_dim
        # backbone levels from high to low resolution (res2 .. res5)
        self.in_features = sorted(cfg.in_features, key=lambda f: strides[f])
        self.transformer_in_features = sorted(cfg.transformer_in_features, key=lambda f: strides[f])
        # projections run from low to high resolution (res5 first); every group norm here
        # normalises a convolution's fresh output, which nothing else reads: in place
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels[f], conv_dim, kernel_size=1),
                          GroupNorm(32, conv_dim, in_place=True))
            for f in reversed(self.transformer_in_features)
        )
        self.transformer = DeformableEncoder(
            d_model=conv_dim, nhead=cfg.nheads, num_layers=cfg.enc_layers,
            d_ffn=cfg.dim_feedforward, n_levels=len(self.transformer_in_features),
            n_points=cfg.n_points)
        self.mask_features = ConvNorm(conv_dim, cfg.mask_dim, kernel_size=1)
        finest = min(strides[f] for f in self.transformer_in_features)
        self.num_fpn_levels = int(math.log2(finest) - math.log2(cfg.common_stride))
        self.fpn_features = self.in_features[: self.num_fpn_levels]
        for idx, f in enumerate(self.fpn_features):
            self.add_module(f"adapter_{idx + 1}", ConvNorm(
                channels[f], conv_dim, kernel_size=1, bias=False,
                norm=GroupNorm(32, conv_dim, in_place=True)))
            self.add_module(f"layer_{idx + 1}", ConvNorm(
                conv_dim, conv_dim, kernel_size=3, padding=1, bias=False,
                # the ReLU in place too: its input is the norm's output (saves a full map)
                norm=GroupNorm(32, conv_dim, in_place=True), activation=F.relu_))

    def forward(self, features: dict[str, torch.Tensor]):
        """Returns (mask_features at the finest stride, [3 scales for the decoder]).

        Consumes `features`: a level is removed from the dict once it is no longer needed,
        so its memory is freed during the encoder rather than after the whole head.
        """
        srcs, pos = [], []
        for proj, f in zip(self.input_proj, reversed(self.transformer_in_features)):
            x = features[f] if f in self.fpn_features else features.pop(f)
            srcs.append(proj(x))
            pos.append(sine_position_embedding(x.shape[0], x.shape[2], x.shape[3],
                                               self.conv_dim // 2,
                                               device=x.device))
        del x
        memory, shapes = self.transformer(srcs, pos)
        batch = memory.shape[0]
        outs = [
            level.transpose(1, 2).reshape(batch, -1, h, w)
            for level, (h, w) in zip(memory.split([h * w for h, w in shapes], dim=1), shapes)
        ]
        # FPN levels from low to high resolution
        # (no local keeps a backbone map or a lateral alive past its use: at 1/4 scale
        # each is a full 256-channel map, and this is where the parse peaks in memory)
        for idx in reversed(range(self.num_fpn_levels)):
            lateral = getattr(self, f"adapter_{idx + 1}")(features.pop(self.fpn_features[idx]))
            coarse = outs[-1]
            if lateral.dtype == torch.float32:
                # from a contiguous map: bilinear upsampling of the encoder's strided view
                # (or of a channels-last fp32 map) is several times slower on CPU than of
                # NCHW; added into a channels-last lateral as it is (cheaper than
                # converting either)
                coarse = coarse.contiguous()
            else:
                # a bf16 lateral (autocast): the encoder map cast to its dtype and layout
                # first, for channels-last bf16 resizing is fast on CPU and the sum then
                # reads one layout (at 1152x640: 21 against 110 ms resizing in fp32 and
                # adding across layouts)
                layout = (torch.channels_last if lateral.is_contiguous(memory_format=torch.channels_last)
                          else torch.contiguous_format)
                coarse = coarse.to(lateral.dtype, memory_format=layout)
            lateral += resize_bilinear(coarse, lateral.shape[-2:])
            outs.append(getattr(self, f"layer_{idx + 1}")(lateral))
            del lateral
        return self.mask_features(outs[-1]), outs[:NUM_DECODER_LEVELS]
