"""Inference-time rewrites of a loaded network. Each keeps the arithmetic (results
equal to float rounding, checked by the parity tests on the exact path):

- BatchNorm folded into the preceding convolution (one op instead of two, and no
  normalisation pass over every backbone activation);
- the backbone in channels-last layout, which oneDNN's convolutions prefer on CPU (the
  heads stay NCHW: torch's channels-last GroupNorm on CPU loses ~1e-2 to cancellation);
- multi-scale deformable attention through one weighted gather (`gather_and_weight`)
  instead of `grid_sample` per level;
- the decoder's attention masks from mask features resized to each level, instead of
  full-resolution mask logits resized every layer (equal up to rounding: resizing is
  linear).

`fast` runs the whole network under bf16 autocast: convolutions and matrix products
in bf16, the residual streams, normalisation statistics, softmax, deformable sampling
locations and weights, and the outputs in fp32 (judged by agreement with `exact` on the
trained fidelity oracle, `m2fp_api.oracle`). `reference` leaves the network as
ModelScope computes it, for same-run baselines.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import M2FP
from ..model.deform_attn import MSDeformAttn, gather_and_weight, sample_and_weight
from ..model.layers import ConvNorm
from ..model.pixel_decoder import EncoderLayer


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


def use_sampler(network: nn.Module, sampler) -> None:
    for module in network.modules():
        if isinstance(module, MSDeformAttn):
            module.sample = sampler


def whole_graph(network: nn.Module) -> None:
    """No size-dependent chunking (of deformable-attention queries and feed-forward
    tokens), for graphs traced once for every input size (ONNX export): the number of
    chunks would be frozen at the traced size's. Costs memory, not results."""
    for module in network.modules():
        if isinstance(module, MSDeformAttn):
            module.query_chunk = None
        elif isinstance(module, EncoderLayer):
            module.ffn_chunk = None


def optimize(network: M2FP, level: str) -> M2FP:
    """`exact`: the rewrites above; `fast`: plus bf16 autocast; `reference`: none."""
    if level == "reference":
        use_sampler(network, sample_and_weight)
        return network
    fold_batchnorm(network)
    use_sampler(network, gather_and_weight)
    network.backbone.to(memory_format=torch.channels_last)
    network.channels_last = True
    network.sem_seg_head.predictor.resize_features_first = True
    network.bf16 = level == "fast"
    return network
