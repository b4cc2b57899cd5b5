"""Inference-time rewrites of a loaded network, by optimisation level. Each keeps the
arithmetic (results equal to float rounding, checked by the parity tests on the exact
path):

- BatchNorm folded into the preceding convolution (one op instead of two, and no
  normalisation pass over every backbone activation);
- the network's inference variant (`model.InferenceVariant`, which says what each
  switch does): deformable attention by one weighted gather instead of `grid_sample`
  per level, the decoder's attention masks at each level's resolution, the backbone
  channels-last, linear layers through oneDNN.

`fast` runs the whole network under bf16 autocast: convolutions and matrix products
in bf16, and the maps between them (the encoder's tokens and positions, the decoder's
keys and values) in bf16 too; the decoder's residual stream, normalisation statistics,
softmax, deformable sampling locations and weights, and the outputs in fp32 (judged by
agreement with `exact` on the trained fidelity oracle, `m2fp_api.oracle`). Where the
CPU has int8 dot products, `fast` also runs the backbone and the encoder's
feed-forwards in int8 (`engine.int8`). `reference` leaves the network as ModelScope
computes it, for same-run baselines.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..model import M2FP, InferenceVariant
from ..model.layers import ConvNorm
from .int8 import calibration_inputs, packing_input_size, quantize_backbone, quantize_feed_forwards

EXACT = InferenceVariant(gathered_sampling=True, level_masks=True, channels_last=True,
                         onednn_linear=torch.backends.mkldnn.is_available())
VARIANTS = {"reference": InferenceVariant(gathered_sampling=False), "exact": EXACT,
            "fast": replace(EXACT, dtype=torch.bfloat16)}


def fold_batchnorm(network: nn.Module) -> int:
    """Fold every ConvNorm's BatchNorm into its weights and bias; returns how many."""
    folded = 0
    for module in network.modules():
        if isinstance(module, ConvNorm) and isinstance(module.norm, nn.BatchNorm2d):
            bn = module.norm
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = module.bias if module.bias is not None else torch.zeros_like(bn.running_mean)
            with torch.no_grad():
                module.weight.mul_(scale.view(-1, 1, 1, 1))
                module.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
            module.norm = None
            folded += 1
    return folded


def store_matrix_weights(network: nn.Module, dtype: torch.dtype) -> int:
    """Keep the weights and biases of every convolution, linear layer and attention input
    projection in `dtype`, which autocast would otherwise round them to at every call
    (same values, half the memory, no per-call copies). Norms and embeddings, which
    autocast leaves in fp32, stay fp32. Returns how many tensors were converted."""
    converted = 0
    for module in network.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            names = ("weight", "bias")
        elif isinstance(module, nn.MultiheadAttention):
            names = ("in_proj_weight", "in_proj_bias")
        else:
            continue
        for name in names:
            param = getattr(module, name, None)
            if param is not None:
                setattr(module, name, nn.Parameter(param.detach().to(dtype), requires_grad=False))
                converted += 1
    return converted


def optimize(network: M2FP, level: str, int8: bool = False) -> M2FP:
    """`exact`: the rewrites above; `fast`: plus bf16 autocast, with the matrix weights
    stored in bf16; `reference`: none. `int8`: the (folded) backbone swapped for its int8
    twin, then the encoder's feed-forwards given theirs, each calibrated with what comes
    before it already in int8 (before the rest is stored in bf16)."""
    if level != "reference":
        fold_batchnorm(network)
    network.configure(VARIANTS[level])
    if int8:
        if level == "reference":
            raise ValueError("the reference network is not quantised")
        inputs = calibration_inputs(network.prepare)
        network.backbone = quantize_backbone(network.backbone, inputs, packing_input_size(network.config))
        # one scene is enough for their ranges (agreement as with three: 99.84 % on the
        # oracle, 99.74 % on the full-size stand-in) and saves ~0.3 s of the start
        quantize_feed_forwards(network, inputs[:1])
    if level == "fast":
        store_matrix_weights(network, torch.bfloat16)
    return network
