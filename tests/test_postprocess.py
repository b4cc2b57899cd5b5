"""Multi-person post-processing against a plain transcription of M2FP's: every query
upsampled to full size at once, scored, and pasted into the semantic map. The engine
does the same arithmetic in one budgeted pass, class by class; results must agree
whatever the budget (one query per chunk, or all at once)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from m2fp_api.engine.postprocess import (
    MIN_OUTPUT_SCORE, TOP_K, _axis_resize, _support, _upsample, parse_multiple,
)
from m2fp_api.engine.preprocess import NetworkInput
from m2fp_api.engine.stand_in import bundled_configuration
from m2fp_api.model import M2FPConfig, NetworkOutput

CFG = M2FPConfig.from_model_section(bundled_configuration("r101-multiple.json")["model"])


def synthetic_output(seed: int) -> tuple[NetworkOutput, NetworkInput]:
    """100 queries with overlapping disc masks, most of them confident, several classes
    proposed by more than one query and some queries proposed for two classes."""
    g = torch.Generator().manual_seed(seed)
    classes = CFG.decoder.num_classes
    logits = torch.randn(1, 100, classes + 1, generator=g)
    confident = torch.arange(0, 100, 2)
    logits[0, confident, confident % classes] = 7.0 + torch.rand(50, generator=g)
    logits[0, confident[:10], (confident[:10] + 5) % classes] = 7.0  # a second class
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 60), torch.linspace(-1, 1, 80), indexing="ij")
    centres = torch.rand(100, 2, generator=g) * 1.6 - 0.8
    radius = torch.rand(100, generator=g) * 0.5 + 0.2
    dist = ((yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2).sqrt()
    masks = 8 * (radius[:, None, None] - dist) + 0.3 * torch.randn(100, 60, 80, generator=g)
    out = NetworkOutput(pred_logits=logits, pred_masks=masks[None], padded_size=(240, 320))
    # input 232 x 310 inside the padded 240 x 320, photo 450 x 600
    inp = NetworkInput(tensor=torch.zeros(3, 232, 310), output_size=(450, 600), crop_box=None)
    return out, inp


def reference_parse(out: NetworkOutput, inp: NetworkInput):
    """M2FP's instance inference written out directly, in float64 where it sums."""
    scores = out.pred_logits[0].softmax(-1)[:, :-1]
    top, index = scores.flatten().topk(TOP_K)
    queries, labels = index // CFG.decoder.num_classes, index % CFG.decoder.num_classes
    ih, iw = inp.tensor.shape[1:]
    full = F.interpolate(out.pred_masks, size=out.padded_size, mode="bilinear", align_corners=False)
    full = F.interpolate(full[:, :, :ih, :iw], size=inp.output_size, mode="bilinear",
                         align_corners=False)[0][queries]
    sig, positive = full.sigmoid(), full > 0
    mask_scores = (sig.double() * positive).flatten(1).sum(1) / (positive.flatten(1).sum(1) + 1e-6)
    final = top.double() * mask_scores
    human = CFG.num_parsing
    semantic = torch.zeros((human, *inp.output_size), dtype=torch.float64)
    times = torch.zeros_like(semantic)
    for k in range(TOP_K):
        label = int(labels[k])
        if label != human and final[k] >= CFG.parsing_ins_score_thr:
            ins = sig[k].double() * final[k]
            semantic[label] += torch.where(ins > 0.5, ins, 0.0)
            times[label] += ins > 0.5
    class_map = (semantic / times.clamp(min=1)).argmax(0).to(torch.uint8).numpy()
    parts = {
        (int(queries[k]), int(labels[k])): (float(final[k]), positive[k].numpy())
        for k in range(TOP_K)
        if int(labels[k]) not in (0, human) and final[k] >= MIN_OUTPUT_SCORE
    }
    return class_map, parts


@pytest.mark.parametrize("chunk_bytes", [1, 64 * 2**20], ids=["one-query-chunks", "one-chunk"])
@pytest.mark.parametrize("seed", [0, 1])
def test_parse_multiple_matches_m2fp_instance_inference(seed, chunk_bytes):
    out, inp = synthetic_output(seed)
    expected_map, expected_parts = reference_parse(out, inp)
    with torch.inference_mode():
        result = parse_multiple(out, inp, CFG, chunk_bytes=chunk_bytes)
    # the float32 sums may round differently from float64 at exact ties only
    assert (result.class_map != expected_map).mean() < 1e-4
    assert len(np.unique(result.class_map)) > 5  # the paste really happened
    assert len(result.parts) == len(expected_parts) > 20
    found = sorted((p.label_id, round(p.score, 4)) for p in result.parts)
    assert found == sorted((label, round(s, 4)) for (_, label), (s, _) in expected_parts.items())
    by_label_score = {(label, round(s, 4)): m for (_, label), (s, m) in expected_parts.items()}
    for part in result.parts:
        full = part.mask.full(*inp.output_size)
        np.testing.assert_array_equal(full, by_label_score[(part.label_id, round(part.score, 4))])


@pytest.mark.parametrize("seed", range(6))
def test_support_window_holds_every_positive_pixel(seed):
    """Only each query's window is thresholded and scored: a positive pixel outside it
    would be lost. Sparse blobs (the window is then small) at photo sizes that enlarge
    and shrink, with and without a single-human crop."""
    g = torch.Generator().manual_seed(seed)
    h4, w4 = 40 + seed * 7, 30 + seed * 11
    padded = (h4 * 4, w4 * 4)
    masks = torch.full((12, h4, w4), -3.0)
    for q in range(11):  # query 11 stays negative everywhere
        y, x = int(torch.randint(0, h4, (1,), generator=g)), int(torch.randint(0, w4, (1,), generator=g))
        masks[q, max(0, y - q // 3):y + 1 + q // 3, max(0, x - q // 4):x + 1 + q // 4] = 2.0 + q
    input_h, input_w = padded[0] - 5, padded[1] - 3
    crop = None if seed % 2 else (3, 5, input_w - 7, input_h - 2)
    photo = [(input_h * 3, input_w * 2), (input_h // 2 + 1, input_w // 3 + 2), (input_h, input_w)][seed % 3]
    inp = NetworkInput(tensor=torch.zeros(3, input_h, input_w), output_size=photo, crop_box=crop)
    full = _upsample(masks, padded, inp) > 0
    for q, window in enumerate(_support(masks, padded, inp)):
        if window is None:
            assert not full[q].any()
            continue
        y0, y1, x0, x1 = window
        assert full[q].sum() == full[q, y0:y1, x0:x1].sum(), (q, window)
        # and it is a window, not the photo: these blobs cover a small share of it
        assert (y1 - y0) * (x1 - x0) < 0.5 * photo[0] * photo[1]


@pytest.mark.parametrize("photo, crop", [((450, 600), None), ((97, 131), None), ((300, 280), (3, 5, 290, 220))])
def test_composed_axis_resizes_are_the_two_resizes(photo, crop):
    """`fast` resizes with one matrix per axis: the two resizes, composed. In fp32 they
    must give ModelScope's two resizes to float rounding (photo larger and smaller
    than the input, and with a crop)."""
    g = torch.Generator().manual_seed(0)
    masks = torch.randn(3, 60, 80, generator=g) * 5
    padded, (ih, iw) = (240, 320), (232, 310)
    inp = NetworkInput(tensor=torch.zeros(3, ih, iw), output_size=photo, crop_box=crop)
    x0, y0, x1, y1 = crop or (0, 0, iw, ih)
    rows = _axis_resize(60, padded[0], (y0, y1), photo[0])
    cols = _axis_resize(80, padded[1], (x0, x1), photo[1])
    torch.testing.assert_close(rows @ masks @ cols.T, _upsample(masks, padded, inp), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_products_agree_with_m2fp_instance_inference(seed):
    """`fast`'s post-processing (bf16 products on each query's window) against the plain
    transcription: the same parts, their scores and masks to bf16's precision."""
    out, inp = synthetic_output(seed)
    # as fast's network gives them: bf16 numbers (in fp32)
    out = replace(out, pred_masks=out.pred_masks.bfloat16().float())
    expected_map, expected_parts = reference_parse(out, inp)
    with torch.inference_mode():
        result = parse_multiple(out, inp, CFG, chunk_bytes=64 * 2**10, bf16=True)  # windows in row blocks
    # half the synthetic queries have class scores within 1e-3 of 1 and overlap: the
    # semantic map's near-ties there flip with any rounding (on the oracle's trained
    # weights fast's maps agreed to 3 decimals either way)
    assert (result.class_map != expected_map).mean() < 5e-3
    expected = sorted((label, s, m) for (_, label), (s, m) in expected_parts.items())
    got = sorted((p.label_id, p.score, p.mask.full(*inp.output_size)) for p in result.parts)
    assert [label for label, _, _ in got] == [label for label, _, _ in expected]
    for (_, score, mask), (_, expected_score, expected_mask) in zip(got, expected):
        assert score == pytest.approx(expected_score, abs=2e-3)
        assert (mask != expected_mask).sum() <= 1e-3 * expected_mask.sum()
