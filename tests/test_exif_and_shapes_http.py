"""Odd EXIF and worst-case shapes through a real `m2fp serve` (issue 11, items 1, 2, 4)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from conftest import jpeg_bytes
from server import Server
from test_images import ISSUE_EXIF, exif_with, marked_photo, marker_centre, oriented, with_app1


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
