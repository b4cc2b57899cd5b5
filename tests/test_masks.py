"""Masks for programs: parts.json's COCO RLE (decoded with pycocotools, as integrators
do) and persons.png, on edge cases and on real parses of the tiny fixture models."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from conftest import PARITY, PARITY_IMAGES

from m2fp_api import coco_rle, render
from m2fp_api.engine.result import Mask, ParseResult, Person
from m2fp_api.errors import BadRequest
from m2fp_api.outputs import default_outputs, render_outputs
from m2fp_api.result_json import MaskFormat
from m2fp_api.tasks.task import TaskOptions, content_key


def decode(rle: dict) -> np.ndarray:
    with warnings.catch_warnings():  # pycocotools 2.0.11 under numpy 2, about its own __array__
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        return coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def pycocotools_rle(full: np.ndarray) -> dict:
    rle = coco_mask.encode(np.asfortranarray(full.astype(np.uint8)))
    return {"size": [int(n) for n in rle["size"]], "counts": rle["counts"].decode()}


def edge_cases() -> dict[str, np.ndarray]:
    h, w = 37, 23
    cases = {name: np.zeros((h, w), dtype=bool) for name in (
        "empty", "full", "one pixel", "corner pixels", "left column", "bottom row", "full-height band",
        "frame", "checkerboard", "random")}
    cases["full"][:] = True
    cases["one pixel"][17, 9] = True
    for y, x in ((0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)):
        cases["corner pixels"][y, x] = True
    cases["left column"][:, 0] = True
    cases["bottom row"][-1, :] = True
    # runs that go on from the bottom of one column to the top of the next
    cases["full-height band"][:, 5:9] = True
    cases["frame"][[0, -1], :] = cases["frame"][:, [0, -1]] = True
    cases["checkerboard"][:] = (np.indices((h, w)).sum(0) % 2).astype(bool)
    cases["random"][:] = np.random.default_rng(0).random((h, w)) < 0.4
    cases["one pixel photo"] = np.ones((1, 1), dtype=bool)
    # long runs: counts past the 5-bit groups' first few, and deltas of both signs
    cases["large"] = np.zeros((1080, 1920), dtype=bool)
    cases["large"][100:900, 300:1500] = True
    cases["large"][0:1080, 1700:1710] = True
    return cases


@pytest.mark.parametrize("name", list(edge_cases()))
def test_rle_is_pycocotools_own_encoding_and_decodes_to_the_mask(name):
    full = edge_cases()[name]
    height, width = full.shape
    rle = coco_rle.encode(Mask.from_full(full), height, width)
    assert rle == pycocotools_rle(full)
    np.testing.assert_array_equal(decode(rle), full)


def _check_document_masks(result: ParseResult, document: dict) -> None:
    size = [result.height, result.width]
    assert len(document["parts"]) == len(result.parts) and len(document["persons"]) == len(result.persons)
    for out, part in zip(document["parts"], result.parts):
        assert out["mask"]["size"] == size
        decoded = decode(out["mask"])
        np.testing.assert_array_equal(decoded, part.mask.full(result.height, result.width))
        assert int(decoded.sum()) == out["area"]
    for out, person in zip(document["persons"], result.persons):
        np.testing.assert_array_equal(decode(out["mask"]), person.mask.full(result.height, result.width))


def _parse(parser, image: str):
    decoded = parser.decode((PARITY / "images" / image).read_bytes())
    return decoded, parser.parse(decoded)


@pytest.mark.parametrize("image", PARITY_IMAGES)
def test_parts_json_masks_are_the_parts_and_persons_masks(multiple_parser, single_parser, image):
    for parser in (multiple_parser, single_parser):
        decoded, result = _parse(parser, image)
        names = default_outputs(parser.info)
        files, document = render_outputs(result, decoded.image, names, 0.5, parser.info, MaskFormat.rle)
        with_masks = json.loads(files["parts"])
        assert result.parts and (result.persons or parser.info.single_human)
        _check_document_masks(result, with_masks)
        # the Task's result never carries them; otherwise parts.json is that document
        assert all("mask" not in p for p in document["parts"] + document["persons"])
        strip = {**with_masks, "parts": [{k: v for k, v in p.items() if k != "mask"} for p in with_masks["parts"]],
                 "persons": [{k: v for k, v in p.items() if k != "mask"} for p in with_masks["persons"]]}
        assert strip == document
        # without masks=rle, parts.json is the document as it was
        files, document = render_outputs(result, decoded.image, ["parts"], 0.5, parser.info)
        assert json.loads(files["parts"]) == document


def check_persons_png(png: bytes, parts_json: dict) -> None:
    """persons.png's value is person_id + 1; each person's pixels are within its mask, and
    its mask's pixels no higher-scoring person claims are its own."""
    persons = np.asarray(Image.open(io.BytesIO(png)))
    height, width = parts_json["image"]["height"], parts_json["image"]["width"]
    assert persons.shape == (height, width)
    ids = {p["person_id"] for p in parts_json["persons"]}
    assert set(np.unique(persons).tolist()) <= {0} | {i + 1 for i in ids}
    claimed = np.zeros((height, width), dtype=bool)
    for person in sorted(parts_json["persons"], key=lambda p: (-p["score"], p["person_id"])):
        own = decode(person["mask"])
        labelled = persons == person["person_id"] + 1
        assert not (labelled & ~own).any()
        np.testing.assert_array_equal(labelled, own & ~claimed)
        claimed |= own
    assert not ((persons > 0) & ~claimed).any()
    for part in parts_json["parts"]:  # the ids parts refer to are persons.png's
        assert part["person_id"] is None or part["person_id"] in ids


@pytest.mark.parametrize("image", PARITY_IMAGES)
def test_persons_png_ids_match_parts_json(multiple_parser, image):
    decoded, result = _parse(multiple_parser, image)
    files, _ = render_outputs(result, decoded.image, ["parts", "persons"], 0.5, multiple_parser.info,
                              MaskFormat.rle)
    parts_json = json.loads(files["parts"])
    assert parts_json["persons"]
    check_persons_png(files["persons"], parts_json)


def _person(person_id: int, score: float, full: np.ndarray) -> Person:
    return Person(person_id=person_id, score=score, mask=Mask.from_full(full))


def test_overlapping_persons_the_higher_score_wins_then_the_lower_id():
    h, w = 6, 8
    left, right, middle = (np.zeros((h, w), dtype=bool) for _ in range(3))
    left[:, :5] = True
    right[:, 3:] = True
    middle[2:4, 2:6] = True
    persons = [_person(0, 0.5, left), _person(1, 0.9, right), _person(2, 0.5, middle)]
    result = ParseResult(width=w, height=h, class_map=np.zeros((h, w), np.uint8), class_names=("Background",),
                         parts=[], persons=persons, single_human=False)
    expected = np.zeros((h, w), dtype=np.uint8)
    expected[left] = 1
    expected[middle] = 1  # ties with person 0 (0.5): the lower id keeps the pixels
    expected[right] = 2  # the highest score wins over both
    np.testing.assert_array_equal(render.person_map(result), expected)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(render.persons_png(result)))), expected)


def test_single_person_models_neither_write_nor_accept_persons(multiple_parser, single_parser):
    assert "persons" in default_outputs(multiple_parser.info)
    assert "persons" not in default_outputs(single_parser.info)
    assert TaskOptions().for_model(single_parser.info).outputs == default_outputs(single_parser.info)
    with pytest.raises(BadRequest, match="persons"):
        TaskOptions(outputs=("mask", "persons")).for_model(single_parser.info)
    assert TaskOptions(outputs=("persons",)).for_model(multiple_parser.info).outputs == ("persons",)


def test_masks_need_parts_json_and_travel_with_the_options(multiple_parser):
    with pytest.raises(BadRequest, match="parts"):
        TaskOptions(outputs=("mask",), masks=MaskFormat.rle).for_model(multiple_parser.info)
    options = TaskOptions(outputs=("parts",), masks=MaskFormat.rle).for_model(multiple_parser.info)
    # to the Celery workers and back, through JSON
    assert TaskOptions.from_dict(json.loads(json.dumps(options.to_dict()))) == options
    plain = TaskOptions(outputs=("parts",)).for_model(multiple_parser.info)
    assert content_key(b"photo", options, None) != content_key(b"photo", plain, None)


def test_a_single_person_service_has_no_persons_png(tmp_path):
    from photos import jpeg
    from server import Server

    server = Server(tmp_path, model=str(PARITY / "tiny-single")).wait_ready()
    try:
        model = server.client.get("/v1/model").json()
        assert model["single_human"] is True
        assert [o["name"] for o in model["outputs"]] == ["mask", "overlay", "labels", "parts"]
        photo = jpeg(96, 64, seed=3)
        task = server.submit(photo, wait=30, masks="rle").json()
        assert task["status"] == "succeeded", task
        assert {k for k, v in task["links"].items() if v} == {"self", "events", "mask", "overlay", "labels",
                                                              "parts"}
        assert server.client.get(f"/v1/tasks/{task['id']}/persons.png").status_code == 404
        parts_json = server.client.get(task["links"]["parts"]).json()
        assert parts_json["persons"] == [] and all("mask" in p for p in parts_json["parts"])
        r = server.submit(photo, outputs="labels,persons")
        assert r.status_code == 400 and "persons" in r.json()["error"]["message"]
        r = server.client.post("/v1/batch", files=[("files", ("a.jpg", photo, "image/jpeg"))],
                               data={"outputs": "persons"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
    finally:
        server.stop()
