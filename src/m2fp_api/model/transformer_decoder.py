"""Mask2Former's masked-attention transformer decoder (the `predictor`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import DecoderConfig
from .layers import MLP, ConvNorm, Linear, MultiheadAttention, resize_bilinear, sine_position_embedding
from .pixel_decoder import NUM_DECODER_LEVELS


class SelfAttentionLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, pre_norm: bool) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            t = self.norm(tgt)
            q = t + query_pos
            return tgt + self.self_attn(q, q, value=t, need_weights=False)[0]
        q = tgt + query_pos
        return self.norm(tgt + self.self_attn(q, q, value=tgt, need_weights=False)[0])


class CrossAttentionLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, pre_norm: bool) -> None:
        super().__init__()
        self.multihead_attn = MultiheadAttention(d_model, nhead)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm

    def forward(self, tgt, memory, memory_mask, pos, query_pos) -> torch.Tensor:
        t = self.norm(tgt) if self.pre_norm else tgt
        attended = self.multihead_attn(query=t + query_pos, key=memory + pos, value=memory,
                                       attn_mask=memory_mask, need_weights=False)[0]
        return tgt + attended if self.pre_norm else self.norm(tgt + attended)


class FFNLayer(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int, pre_norm: bool) -> None:
        super().__init__()
        self.linear1 = Linear(d_model, dim_feedforward)
        self.linear2 = Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            return tgt + self.linear2(F.relu(self.linear1(self.norm(tgt))))
        return self.norm(tgt + self.linear2(F.relu(self.linear1(tgt))))


def _embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding, initialised as nn.Embedding does, except on the meta device (how
    checkpoints are loaded): there `normal_` goes through torch's reference
    implementations, which import torch._dynamo and sympy (~40 MB of idle memory)."""
    weight = torch.empty(num, dim)
    if weight.device.type != "meta":
        nn.init.normal_(weight)
    return nn.Embedding(num, dim, _weight=weight)


class MaskedTransformerDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, in_channels: int) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.num_heads = cfg.nheads
        self.num_layers = cfg.dec_layers
        self.num_classes = cfg.num_classes
        self.num_queries = cfg.num_queries
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(d, cfg.nheads, cfg.pre_norm) for _ in range(cfg.dec_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(d, cfg.nheads, cfg.pre_norm) for _ in range(cfg.dec_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(d, cfg.dim_feedforward, cfg.pre_norm) for _ in range(cfg.dec_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.query_feat = _embedding(cfg.num_queries, d)
        self.query_embed = _embedding(cfg.num_queries, d)
        self.level_embed = _embedding(NUM_DECODER_LEVELS, d)
        project = in_channels != d or cfg.enforce_input_project
        self.input_proj = nn.ModuleList(
            ConvNorm(in_channels, d, kernel_size=1) if project else nn.Identity()
            for _ in range(NUM_DECODER_LEVELS))
        self.class_embed = Linear(d, cfg.num_classes + 1)
        self.mask_embed = MLP(d, d, cfg.mask_dim, 3)
        # Attention masks from mask features resized to each level first (M2FP.configure
        # sets it from the inference variant): bilinear resizing is linear, so resize(embed . F) =
        # embed . resize(F), and the per-layer product runs at the level's resolution
        # instead of the mask features' (16-64x fewer pixels). The reference computes
        # full-resolution mask logits every layer and resizes those.
        self.resize_features_first = False

    def _mask_logits(self, output: torch.Tensor, mask_features: torch.Tensor) -> torch.Tensor:
        embed = self.mask_embed(self.decoder_norm(output).transpose(0, 1))  # (B, Q, C)
        batch, channels, height, width = mask_features.shape
        if mask_features.is_contiguous():
            logits = torch.matmul(embed, mask_features.flatten(2))
        else:
            # channels-last: the map is a (B, H*W, C) matrix as it lies, and the product is
            # transposed into place (a bf16 matmul against the (B, C, H*W) view would copy
            # the whole map into NCHW first: ~3x the time)
            pixels = mask_features.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
            logits = torch.matmul(pixels, embed.transpose(1, 2)).transpose(1, 2).contiguous()
        return logits.view(batch, -1, height, width)

    def _attention_mask(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """-inf where a query may not attend (its predicted mask is < 0.5 there), else 0.

        A query whose mask is empty everywhere would attend to nothing (NaNs), so it is
        let attend everywhere, as in Mask2Former. Additive rather than boolean, which
        attention would widen to floats itself, once per head: with one image the heads
        share one mask (a view), an eighth of the memory to fill.
        """
        blocked = (mask_logits.sigmoid().flatten(2) < 0.5)
        blocked[blocked.all(-1)] = False
        additive = torch.zeros_like(blocked, dtype=mask_logits.dtype).masked_fill_(blocked, float("-inf"))
        batch, queries, pixels = additive.shape
        if batch == 1:
            return additive.expand(self.num_heads, queries, pixels)
        return additive.repeat_interleave(self.num_heads, dim=0)

    def _level_mask_logits(self, output: torch.Tensor, mask_features: torch.Tensor,
                           resized_features: list[torch.Tensor], level: int, size) -> torch.Tensor:
        """Mask logits at a decoder level's resolution, for its attention mask."""
        if self.resize_features_first:
            return self._mask_logits(output, resized_features[level])
        return resize_bilinear(self._mask_logits(output, mask_features), size)

    def forward(self, features: list[torch.Tensor], mask_features: torch.Tensor):
        """Returns (class logits (B, Q, C+1), mask logits (B, Q, H/4, W/4))."""
        srcs, pos, sizes = [], [], []
        for i, x in enumerate(features):
            sizes.append(x.shape[-2:])
            p = sine_position_embedding(x.shape[0], x.shape[2], x.shape[3],
                                        self.query_feat.embedding_dim // 2, device=x.device)
            # in the projection's dtype (bf16 under autocast), as the encoder's positions:
            # keys and values only ever reach bf16 products there, and sums across dtypes
            # take ATen's slow mixed-dtype path (the level embedding is rounded to bf16
            # before its sum, one rounding more than before; oracle agreement unchanged)
            s = self.input_proj[i](x).flatten(2)
            s = s + self.level_embed.weight[i].to(s.dtype)[None, :, None]
            pos.append(p.flatten(2).permute(2, 0, 1).to(s.dtype))
            srcs.append(s.permute(2, 0, 1))
        batch = srcs[0].shape[1]
        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, batch, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, batch, 1)

        resized = [
            resize_bilinear(mask_features, size)
            for size in sizes
        ] if self.resize_features_first else []
        for i in range(self.num_layers):
            level = i % NUM_DECODER_LEVELS
            attn_mask = self._attention_mask(
                self._level_mask_logits(output, mask_features, resized, level, sizes[level]))
            output = self.transformer_cross_attention_layers[i](
                output, srcs[level], attn_mask, pos[level], query_pos)
            output = self.transformer_self_attention_layers[i](output, query_pos)
            output = self.transformer_ffn_layers[i](output)
        mask_logits = self._mask_logits(output, mask_features)
        # only the last layer's predictions are used at inference (no auxiliary heads)
        logits = self.class_embed(self.decoder_norm(output).transpose(0, 1))
        return logits, mask_logits
