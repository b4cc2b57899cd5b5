"""The native engine against what ModelScope's own pipeline produced for the same
checkpoints (tests/fixtures/m2fp-parity, made by its make_fixture.py)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from conftest import MODES, PARITY, PARITY_IMAGES, load_expected
from m2fp_api.engine.images import decode_image
from m2fp_api.engine.preprocess import prepare

LOGIT_TOL = 1e-3
SCORE_TOL = 1e-4
MIN_IOU = 0.999


@pytest.fixture(scope="module")
def parsers(multiple_parser, single_parser):
    return {"tiny-multiple": multiple_parser, "tiny-single": single_parser}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("image", PARITY_IMAGES)
def test_network_input_equals_modelscope_preprocessing(parsers, mode, image):
    expected = load_expected(mode)[f"{image}:input"]
    parser = parsers[mode]
    inp = prepare(decode_image(PARITY / "images" / image).image, parser.config)
    assert inp.tensor.shape == expected.shape
    np.testing.assert_array_equal(inp.tensor.numpy(), expected.astype(np.float32))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("image", PARITY_IMAGES)
def test_head_outputs_match(parsers, mode, image):
    expected = load_expected(mode)
    x = torch.from_numpy(expected[f"{image}:input"]).float()[None]
    with torch.inference_mode():
        out = parsers[mode].network(x)
    np.testing.assert_allclose(out.pred_logits.numpy(), expected[f"{image}:pred_logits"],
                               atol=LOGIT_TOL, rtol=0)
    # the reference masks were stored as float16: allow its rounding on top of 1e-3
    ref = expected[f"{image}:pred_masks"].astype(np.float32)
    err = np.abs(out.pred_masks.numpy() - ref)
    assert (err <= LOGIT_TOL + np.abs(ref) * 2.0**-11).all(), float(err.max())


@pytest.mark.parametrize("mode", MODES)
def test_a_batch_computes_what_its_images_do_alone(parsers, mode):
    """Images of one size batched (per-image attention masks, repeated per head) give
    each image's own outputs, within the parity tolerance."""
    expected = load_expected(mode)
    inputs = [torch.from_numpy(expected[f"{image}:input"]).float() for image in PARITY_IMAGES]
    same = [x for x in inputs if x.shape == inputs[0].shape][:2]
    x = torch.stack(same if len(same) == 2 else [inputs[0], inputs[0].flip(-1)])
    network = parsers[mode].network
    with torch.inference_mode():
        batched = network(x)
        alone = [network(image[None]) for image in x]
    for i, out in enumerate(alone):
        np.testing.assert_allclose(batched.pred_logits[i].numpy(), out.pred_logits[0].numpy(), atol=LOGIT_TOL, rtol=0)
        np.testing.assert_allclose(batched.pred_masks[i].numpy(), out.pred_masks[0].numpy(), atol=LOGIT_TOL, rtol=0)


def _expected_masks(expected: dict, image: str) -> np.ndarray:
    shape = tuple(expected[f"{image}:masks_shape"])
    bits = np.unpackbits(expected[f"{image}:masks_packed"], axis=-1)[..., : shape[-1]]
    return bits.astype(bool).reshape(shape)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("image", PARITY_IMAGES)
def test_pipeline_output_matches_through_human_parser(parsers, mode, image):
    """Drop-in call on the image file: same labels, scores and masks as ModelScope."""
    expected = load_expected(mode)
    out = parsers[mode](str(PARITY / "images" / image))
    exp_labels = [str(s) for s in expected[f"{image}:labels"]]
    exp_scores = expected[f"{image}:scores"]
    exp_masks = _expected_masks(expected, image)

    assert Counter(out["labels"]) == Counter(exp_labels)
    assert len(out["masks"]) == len(out["scores"]) == len(exp_labels)
    # outputs are compared pairwise: same label, nearest score (order is not part of
    # ModelScope's contract: its top-k is unsorted)
    unmatched = set(range(len(exp_labels)))
    for label, score, mask in zip(out["labels"], out["scores"], out["masks"]):
        candidates = [i for i in unmatched if exp_labels[i] == label]
        i = min(candidates, key=lambda i: abs(exp_scores[i] - score))
        unmatched.remove(i)
        assert abs(exp_scores[i] - score) <= SCORE_TOL, (label, score, exp_scores[i])
        assert mask.shape == exp_masks[i].shape
        ours, theirs = mask > 0.5, exp_masks[i]
        union = np.count_nonzero(ours | theirs)
        iou = np.count_nonzero(ours & theirs) / union if union else 1.0
        assert iou >= MIN_IOU, (label, iou)


@pytest.mark.parametrize("mode", MODES)
def test_dropin_output_types_follow_modelscope(parsers, mode):
    out = parsers[mode](str(PARITY / "images" / "two_figures.png"))
    assert set(out) == {"masks", "labels", "scores"}
    mask = out["masks"][0]
    # ModelScope returns float64 masks for semantic (single) and float32 for instances
    assert mask.dtype == (np.float64 if mode == "tiny-single" else np.float32)
    assert mask.shape == (300, 500)
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert all(isinstance(label, str) for label in out["labels"])


def test_class_map_is_consistent_with_parts(parsers):
    """Multi-human: persons own parts; the class map only uses part classes."""
    result = parsers["tiny-multiple"].parse(PARITY / "images" / "two_figures.png")
    assert result.class_map.shape == (300, 500)
    assert result.class_map.max() < len(result.class_names)
    assert result.persons, "the fixture predicts person instances"
    for person in result.persons:
        for i in person.part_indices:
            assert result.parts[i].person_id == person.person_id
    for part in result.parts:
        assert part.label != "Human" and part.label_id != 0
        assert part.mask.area > 0
    assert set(result.timings_ms) == {"decoding", "preprocessing", "inference", "postprocessing"}


def test_single_parts_come_from_the_class_map(parsers):
    result = parsers["tiny-single"].parse(PARITY / "images" / "astronaut.jpg")
    assert result.persons == []
    for part in result.parts:
        full = part.mask.full(result.height, result.width)
        np.testing.assert_array_equal(full, result.class_map == part.label_id)
