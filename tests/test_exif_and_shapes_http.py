"""Odd EXIF and worst-case shapes through a real `m2fp serve` (issue 11, items 1, 2, 4)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from photos import jpeg_bytes, photo, png_bytes
from server import Server
from test_images import ISSUE_EXIF, _chunk, exif_with, marked_photo, marker_centre, oriented, with_app1
from test_reliability_http import assert_error


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("exif-shapes")).wait_ready()
    yield s
    s.stop()


def output_image(server: Server, task: dict, name: str) -> Image.Image:
    r = server.client.get(task["links"][name])
    assert r.status_code == 200, r.text
    return Image.open(io.BytesIO(r.content))


# -- 1-2: EXIF with odd tag types ------------------------------------------------------

@pytest.mark.parametrize("case", sorted(ISSUE_EXIF))
def test_odd_exif_jpeg_is_parsed_upright_at_its_oriented_size(server, case):
    src = marked_photo(300, 200)
    data = with_app1(jpeg_bytes(src, subsampling=0), exif_with(6, ISSUE_EXIF[case]))
    task = server.submit(data, wait=30, overlay_alpha=0).json()  # alpha 0: the overlay is the photo
    assert task["status"] == "succeeded", task
    assert task["result"]["image"] == {"width": 200, "height": 300}
    for name in ("mask", "labels"):
        assert output_image(server, task, name).size == (200, 300)
    overlay = output_image(server, task, "overlay")
    assert overlay.size == (200, 300)
    upright = oriented(src, 6)
    assert np.abs(marker_centre(overlay) - marker_centre(upright)).max() < 0.03
    assert "Traceback" not in server.log()


# -- 4: shapes a task's memory cannot hold are refused at admission ---------------------

# A budget that leaves the tiny model's task about 0.6-0.8 GB: photos of a few MP fit,
# the plan's 520 MB + 26 B/pixel is more than that from ~12 MP up, whatever the shape
SMALL_BUDGET_MB = 1100


def claimed_png(width: int, height: int) -> bytes:
    """A few hundred bytes whose header claims width x height (refused before decoding)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width * 3 + 1), 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("small-budget"), memory_budget_mb=SMALL_BUDGET_MB).wait_ready()
    yield s
    s.stop()


@pytest.mark.parametrize("width, height", [(30000, 800), (800, 30000), (5000, 4000), (89000, 269)])
def test_a_photo_its_task_cannot_hold_is_422_before_queueing(small_server, width, height):
    r = small_server.submit(claimed_png(width, height))
    assert_error(r, 422, "image_too_large")
    message = r.json()["error"]["message"]
    assert f"{width}x{height}" in message and "MB" in message and "pixels" in message
    metrics = small_server.client.get("/metrics").text
    assert 'code="image_too_large"' in metrics


def test_a_photo_that_fits_is_parsed_beside_the_refusals(small_server):
    task = small_server.submit(png_bytes(photo(640, 480)), wait=30).json()
    assert task["status"] == "succeeded", task
