"""Train the fidelity oracle: a small M2FP on procedurally generated figures.

    .venv/bin/python scripts/train_stand_in.py --out tests/fixtures/oracle [--steps N]

Seeded and reproducible (same machine, same thread count); the shipped oracle took
about 25 minutes of one core (800 steps of 4 crops of 320 px). The network is the project's
own M2FP built from a configuration (tiny-multiple with one query per class), trained
from scratch with a fixed matching instead of Hungarian matching: query c learns class
c and that class's pixels (class 20, `Human`, the union of all figures), with
cross-entropy on the class logits (no-object weight 0.1 for absent classes) and
BCE + dice on the masks at 1/4 resolution. The result is written in ModelScope's
layout, marked as a stand-in (`pretrained: false`), and its held-out pixel accuracy
printed: a model that cannot parse the scenes would make a useless oracle.

The same recipe trains a full-size (ResNet-101) stand-in, to judge an approximation on a
network of the real size rather than only on the tiny oracle (not shipped: ~240 MB):

    .venv/bin/python scripts/train_stand_in.py --out DIR --config r101-multiple.json \
        --crop 224 --freeze-bn --threads 2 --steps 600

Batch norm stays at its initial statistics there (`--freeze-bn`), as in the recipe that
first trained the full-size network (1,000 steps at 224 px); batch statistics from 4 crops
are not what it was tried with.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from m2fp_api import oracle
from m2fp_api.engine.checkpoint import STAND_IN_KEY, WEIGHTS_FILE, CONFIG_FILE
from m2fp_api.engine.stand_in import bundled_configuration
from m2fp_api.model import M2FP, M2FPConfig
from m2fp_api.model.deform_attn import MSDeformAttn

SEED = 20261122
CROP = 320
NO_OBJECT_WEIGHT = 0.1


def configuration(name: str, queries: int) -> dict:
    conf = bundled_configuration(name)
    conf["model"]["decoder"]["num_queries"] = queries
    return conf


def init_deformable(network: M2FP) -> None:
    """Deformable DETR's initialisation: sampling points start on rays around the
    reference point, attention uniform; without it training from scratch is slow."""
    for m in network.modules():
        if isinstance(m, MSDeformAttn):
            torch.nn.init.zeros_(m.sampling_offsets.weight)
            angles = torch.arange(m.n_heads, dtype=torch.float32) * (2 * math.pi / m.n_heads)
            grid = torch.stack([angles.cos(), angles.sin()], -1)
            grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(m.n_heads, 1, 1, 2)
            grid = grid.repeat(1, m.n_levels, m.n_points, 1)
            for i in range(m.n_points):
                grid[:, :, i, :] *= i + 1
            with torch.no_grad():
                m.sampling_offsets.bias.copy_(grid.view(-1))
            torch.nn.init.zeros_(m.attention_weights.weight)
            torch.nn.init.zeros_(m.attention_weights.bias)
            for lin in (m.value_proj, m.output_proj):
                torch.nn.init.xavier_uniform_(lin.weight)
                torch.nn.init.zeros_(lin.bias)


def batch(step: int, size: int, human: int, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    scenes = [oracle.scene(step * size + i, crop, crop) for i in range(size)]
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float()
    labels = np.stack([s.labels for s in scenes]).astype(np.int64)
    targets = torch.from_numpy(labels)
    person = torch.from_numpy(np.stack([s.persons for s in scenes]) > 0)
    # one binary target per class: (B, classes + Human, H, W)
    onehot = F.one_hot(targets, human).permute(0, 3, 1, 2).float()
    return images, torch.cat([onehot, person[:, None].float()], 1)


def loss_fn(out, masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    logits, pred = out.pred_logits, out.pred_masks  # (B, Q, C+1), (B, Q, h, w)
    b, q = logits.shape[:2]
    small = F.interpolate(masks, size=pred.shape[-2:], mode="area")  # (B, C, h, w) in [0, 1]
    present = small.flatten(2).amax(-1) > 0.5  # (B, C)
    target_cls = torch.full((b, q), num_classes, dtype=torch.long)
    matched = torch.zeros(b, q, dtype=torch.bool)
    matched[:, :num_classes] = present
    target_cls[:, :num_classes] = torch.where(present, torch.arange(num_classes), num_classes)
    weight = torch.ones(num_classes + 1)
    weight[num_classes] = NO_OBJECT_WEIGHT
    ce = F.cross_entropy(logits.transpose(1, 2), target_cls, weight=weight)
    p = pred[:, :num_classes][present]
    t = small[present]
    if p.numel() == 0:
        return ce
    bce = F.binary_cross_entropy_with_logits(p, t)
    s = p.sigmoid().flatten(1)
    dice = 1 - (2 * (s * t.flatten(1)).sum(-1) + 1) / (s.sum(-1) + t.flatten(1).sum(-1) + 1)
    return ce + 5 * bce + 5 * dice.mean()


def evaluate(model_dir: Path, count: int) -> tuple[float, float]:
    from m2fp_api.engine import HumanParser

    parser = HumanParser.from_pretrained(str(model_dir), backend="exact", allow_download=False)
    correct = total = fg_correct = fg_total = 0
    for s in oracle.held_out(count):
        class_map = parser.parse(s.image).class_map
        right, person = class_map == s.labels, s.labels > 0
        correct, total = correct + int(right.sum()), total + right.size
        fg_correct, fg_total = fg_correct + int(right[person].sum()), fg_total + int(person.sum())
    return correct / total, fg_correct / fg_total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1, help="the shipped oracle: 1")
    ap.add_argument("--eval", type=int, default=8, help="held-out scenes to report accuracy on")
    ap.add_argument("--config", default="tiny-multiple.json",
                    help="bundled configuration; r101-multiple.json is the full-size network")
    ap.add_argument("--crop", type=int, default=CROP, help="training crop side in pixels")
    ap.add_argument("--freeze-bn", action="store_true",
                    help="batch norm at its initial statistics (the full-size recipe)")
    args = ap.parse_args()

    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    human = oracle.NUM_PART_CLASSES
    conf = configuration(args.config, queries=human + 4)
    cfg = M2FPConfig.from_model_section(conf["model"])
    num_classes = cfg.decoder.num_classes
    assert num_classes == human + 1, "class ids: the parts, then Human"
    network = M2FP(cfg)
    init_deformable(network)
    network.train()
    if args.freeze_bn:
        for m in network.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval().requires_grad_(False)
    optim = torch.optim.AdamW(network.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=args.lr, total_steps=args.steps,
                                                pct_start=0.05)
    started = time.time()
    for step in range(args.steps):
        images, masks = batch(step, args.batch, human, args.crop)
        loss = loss_fn(network(images), masks, num_classes)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        # a diverged step stops here, by name, not later as an index error in the sampling
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0, error_if_nonfinite=True)
        optim.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.time() - started:.0f} s)", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    conf[STAND_IN_KEY] = {"stand_in": True, "seed": SEED, "steps": args.steps, "batch": args.batch,
                          "config": args.config, "crop": args.crop, "freeze_bn": args.freeze_bn,
                          "threads": args.threads, "note": (
        "trained on synthetic figures by scripts/train_stand_in.py; the fidelity oracle, "
        "not a model of real photos")}
    state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    torch.save({"model": state}, args.out / WEIGHTS_FILE)
    (args.out / CONFIG_FILE).write_text(json.dumps(conf, indent=2))
    accuracy, on_people = evaluate(args.out, args.eval)
    print(f"held-out pixel accuracy over {args.eval} scenes: {accuracy * 100:.2f} % "
          f"({on_people * 100:.2f} % of the figures' pixels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
