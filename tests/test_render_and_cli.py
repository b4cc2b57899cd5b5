"""Rendering outputs and the `m2fp` command line."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import PARITY
from photos import photo
from m2fp_api import render
from m2fp_api.result_json import ParseResultOut

CIHP = ("Background", "Hat", "Hair", "Glove", "Sunglasses", "UpperClothes", "Dress", "Coat",
        "Socks", "Pants", "Torso-skin", "Scarf", "Skirt", "Face", "Left-arm", "Right-arm",
        "Left-leg", "Right-leg", "Left-shoe", "Right-shoe")


def test_palette_gives_every_class_its_own_colour():
    colours = render.PALETTE
    assert colours.shape == (256, 3) and colours.dtype == np.uint8
    assert tuple(colours[0]) == (0, 0, 0)
    assert len({tuple(c) for c in colours[:len(CIHP)]}) == len(CIHP)
    assert tuple(colours[1]) == (128, 0, 0) and tuple(colours[2]) == (0, 128, 0)
    assert render.label_set(CIHP) == "CIHP"
    assert render.label_set(CIHP[:10] + ("Jumpsuits",) + CIHP[11:]) == "LIP"


def test_overlay_blends_parts_and_keeps_background():
    photo_px = np.full((2, 3, 3), 200, np.uint8)
    class_map = np.array([[0, 1, 2], [2, 0, 1]], np.uint8)
    colours = render.PALETTE
    out = render.overlay(photo_px, class_map, colours, alpha=0.5)
    assert (out[class_map == 0] == 200).all()
    np.testing.assert_allclose(out[0, 1], (200 + np.array([128, 0, 0])) / 2, atol=1)
    assert (render.overlay(photo_px, class_map, colours, 0.0) == photo_px).all()
    np.testing.assert_array_equal(render.overlay(photo_px, class_map, colours, 1.0)[0, 2], colours[2])


def test_pngs_decode_to_the_class_map(multiple_parser):
    result = multiple_parser.parse(PARITY / "images" / "two_figures.png")
    labels = np.asarray(Image.open(io.BytesIO(render.labels_png(result))))
    np.testing.assert_array_equal(labels, result.class_map)
    mask = Image.open(io.BytesIO(render.mask_png(result)))
    assert mask.size == (500, 300)
    np.testing.assert_array_equal(np.asarray(mask.convert("RGB")),
                                  render.PALETTE[result.class_map])
    overlay = Image.open(io.BytesIO(render.overlay_png(result, photo(500, 300), 0.5)))
    assert overlay.mode == "RGB" and overlay.size == (500, 300)


def test_cli_parse_writes_all_outputs(tmp_path):
    photos = [str(PARITY / "images" / name) for name in ("astronaut.jpg", "camera.png")]
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "m2fp_api.cli", "parse", *photos, "--out", str(out),
         "--model", str(PARITY / "tiny-multiple")],
        capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "stand-in" in proc.stderr  # the fixture's random weights are announced
    for stem in ("astronaut", "camera"):
        for suffix in ("mask.png", "overlay.png", "labels.png", "persons.png"):
            assert Image.open(out / f"{stem}.{suffix}").size == (512, 512)
        doc = json.loads((out / f"{stem}.parts.json").read_text())
        # the service's document, nothing more
        assert set(doc) == set(ParseResultOut.model_fields)
        ParseResultOut.model_validate(doc)
        assert doc["model"]["pretrained"] is False
        assert doc["image"] == {"width": 512, "height": 512}
        assert doc["parts"] and doc["persons"]


def test_cli_parse_masks_rle_and_persons(tmp_path):
    from test_masks import check_persons_png

    photo = PARITY / "images" / "two_figures.png"
    proc = subprocess.run(
        [sys.executable, "-m", "m2fp_api.cli", "parse", str(photo), "--out", str(tmp_path),
         "--model", str(PARITY / "tiny-multiple"), "--outputs", "parts,persons", "--masks", "rle"],
        capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "two_figures.parts.json").read_text())
    assert doc["persons"] and all("mask" in p for p in doc["parts"] + doc["persons"])
    check_persons_png((tmp_path / "two_figures.persons.png").read_bytes(), doc)
    # a single-person model has no persons to write: refused, as by the service
    proc = subprocess.run(
        [sys.executable, "-m", "m2fp_api.cli", "parse", str(photo), "--out", str(tmp_path / "single"),
         "--model", str(PARITY / "tiny-single"), "--outputs", "persons"],
        capture_output=True, text=True)
    assert proc.returncode == 2 and "persons" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_parse_reports_bad_files_and_continues(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    good = PARITY / "images" / "two_figures.png"
    proc = subprocess.run(
        [sys.executable, "-m", "m2fp_api.cli", "parse", str(bad), str(good), "--out",
         str(tmp_path), "--model", str(PARITY / "tiny-single"), "--outputs", "labels"],
        capture_output=True, text=True)
    assert proc.returncode == 1
    assert "unsupported_media_type" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "two_figures.labels.png").exists()
    assert not (tmp_path / "two_figures.mask.png").exists()


def test_cli_info(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "m2fp_api.cli", "info", "--model", str(PARITY / "tiny-single")],
        capture_output=True, text=True, check=True)
    doc = json.loads(proc.stdout)
    assert doc["model"]["single_human"] is True and doc["model"]["pretrained"] is False
    assert doc["model"]["label_set"] == "LIP"
    assert doc["runtime"]["backend"] == "torch-fp32" and doc["runtime"]["threads"] >= 1
