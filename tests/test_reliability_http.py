"""shared/RELIABILITY.md over real HTTP: every bad input gets its status and code, and no
error body leaks internals. (Items 13-17 are in test_service_e2e.py.)"""

from __future__ import annotations

import json
import re
import socket
import time

import pytest

from photos import jpeg, jpeg_bytes, photo, png_bytes
from server import Server
from test_images import NOT_IMAGES, bomb_jpeg, bomb_png, quadrants

MAX_UPLOAD_MB = 2
LEAKS = re.compile(r"traceback|/usr/|/work/|site-packages|\.py\b|0x[0-9a-f]{6,}|pillow|\bPIL\b|torch|"
                   r"starlette|fastapi|python_multipart|pydantic", re.IGNORECASE)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("reliability"), max_upload_mb=MAX_UPLOAD_MB,
               max_results=5).wait_ready()
    yield s
    s.stop()


def assert_error(response, status: int, code: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert not LEAKS.search(body["error"]["message"]), body


# -- 1-7: image content --------------------------------------------------------------

def test_decompression_bombs_are_refused_fast(server):
    for data in (bomb_png(), bomb_jpeg()):
        t0 = time.monotonic()
        assert_error(server.submit(data), 422, "image_too_large")
        assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("name", sorted(NOT_IMAGES))
def test_non_images_are_415(server, name):
    assert_error(server.submit(NOT_IMAGES[name]), 415, "unsupported_media_type")


def test_empty_upload_is_422(server):
    assert_error(server.submit(b""), 422, "invalid_image")


def test_truncated_image_fails_its_task_as_invalid(server):
    data = jpeg(300, 200, seed=21)
    r = server.submit(data[: len(data) // 2], wait=30)
    task = r.json()
    # the header is fine, so it is accepted; decoding then fails with a clear code
    assert task["status"] == "failed" and task["error"]["code"] == "invalid_image"
    assert not LEAKS.search(task["error"]["message"])
    truncated_png = png_bytes(photo(200, 150, seed=3))[:-60]
    assert server.submit(truncated_png, wait=30).json()["error"]["code"] == "invalid_image"


def test_exif_orientation_gives_the_corrected_size(server):
    exif = photo().getexif()
    exif[0x0112] = 6  # rotated 90 degrees: width and height swap
    data = jpeg_bytes(quadrants(), exif=exif)
    task = server.submit(data, wait=30).json()
    assert task["result"]["image"] == {"width": 30, "height": 60}


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "I;16"])
def test_colour_modes_are_parsed(server, mode):
    image = photo(64, 48, seed=4)
    if mode == "I;16":
        image = image.convert("L").point(lambda v: v * 257, mode="I").convert("I;16")
    else:
        image = image.convert(mode)
    task = server.submit(png_bytes(image), wait=30).json()
    assert task["status"] == "succeeded", task
    assert task["result"]["image"] == {"width": 64, "height": 48}


def test_cmyk_jpeg_is_parsed(server):
    task = server.submit(jpeg_bytes(photo(64, 48).convert("CMYK")), wait=30).json()
    assert task["status"] == "succeeded"


def test_too_small_and_extreme_aspect_are_422(server):
    assert_error(server.submit(png_bytes(photo(5, 40))), 422, "image_too_small")
    assert_error(server.submit(jpeg(4000, 8)), 422, "image_too_small")


# -- 8: body size ---------------------------------------------------------------------

def test_body_over_the_limit_with_content_length_is_413(server):
    big = b"\xff\xd8" + b"\x00" * (MAX_UPLOAD_MB * 2**20 + 1000)
    assert_error(server.submit(big), 413, "payload_too_large")


def test_chunked_body_over_the_limit_is_413_without_reading_it_all(server):
    sent = 0

    def body():
        nonlocal sent
        head = (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n"
                b"Content-Type: image/jpeg\r\n\r\n")
        yield head
        chunk = b"\x00" * 65536
        for _ in range(20 * MAX_UPLOAD_MB * 16):  # would be 20x the limit
            sent += len(chunk)
            yield chunk

    r = server.client.post("/v1/parse", content=body(),
                           headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
    assert_error(r, 413, "payload_too_large")
    assert server.client.get("/readyz").status_code == 200


# -- 9-10: multipart abuse ----------------------------------------------------------

def test_two_files_where_one_is_expected_is_400(server):
    files = [("file", ("a.jpg", jpeg(64, 64), "image/jpeg")), ("file", ("b.jpg", jpeg(64, 64, 1), "image/jpeg"))]
    assert_error(server.client.post("/v1/parse", files=files), 400, "bad_request")


def test_thousands_of_fields_is_400_quickly(server):
    fields = {f"f{i}": "x" for i in range(5000)}
    t0 = time.monotonic()
    r = server.client.post("/v1/parse", files={"file": ("a.jpg", jpeg(64, 64), "image/jpeg")}, data=fields)
    assert_error(r, 400, "bad_request")
    assert time.monotonic() - t0 < 5


def test_huge_text_field_is_400(server):
    r = server.client.post("/v1/parse", files={"file": ("a.jpg", jpeg(64, 64), "image/jpeg")},
                           data={"outputs": "m" * (1_500_000)})
    assert_error(r, 400, "bad_request")


@pytest.mark.parametrize("content_type, body", [
    ("multipart/form-data", b"--abc\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nxx"),
    ("multipart/form-data; boundary=abc", b"--abc\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nunterminated"),
    ("multipart/form-data; boundary=zzz", b"--abc\r\n\r\nwrong boundary\r\n--abc--\r\n"),
    ("application/json", b'{"file": "x"}'),
])
def test_malformed_multipart_is_400(server, content_type, body):
    r = server.client.post("/v1/parse", content=body, headers={"Content-Type": content_type})
    assert_error(r, 400, "bad_request")


@pytest.mark.parametrize("form, fragment", [
    ({"outputs": "mask,nope"}, "outputs"), ({"overlay_alpha": "2"}, "overlay_alpha"),
    ({"overlay_alpha": "abc"}, "overlay_alpha"), ({"wait": "61"}, "wait"), ({"wait": "-1"}, "wait"),
])
def test_bad_options_are_400(server, form, fragment):
    r = server.submit(jpeg(64, 64), **form)
    assert_error(r, 400, "bad_request")
    assert fragment in r.json()["error"]["message"]


# -- 11-12: names and leaks ----------------------------------------------------------

@pytest.mark.parametrize("name", ["../../etc/passwd", "/abs/path.jpg", "a\x00b.jpg", "n" * 3_000,
                                  "<script>alert(1)</script>.jpg"])
def test_hostile_filenames_are_ignored(server, name):
    r = server.submit(jpeg(80, 60, seed=len(name)), name=name, wait=30)
    assert r.status_code == 200, r.text
    text = r.text + server.client.get(r.json()["links"]["parts"]).text
    for fragment in ("passwd", "/abs/", "<script>", "nnnnnnnnnn"):
        assert fragment not in text


def test_10kb_filename_is_refused_without_echo(server):
    r = server.submit(jpeg(80, 60), name="n" * 10_000)
    assert_error(r, 400, "bad_request")
    assert "nnnnnnnnnn" not in r.text


def test_raw_malformed_http_does_not_kill_the_server(server):
    host, port = "127.0.0.1", server.port
    for garbage in (b"GARBAGE\r\n\r\n", b"POST /v1/parse HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
                    b"POST /v1/parse HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(garbage)
            sock.recv(4096)
    assert server.client.get("/readyz").status_code == 200


def test_unknown_route_and_method_are_json(server):
    assert_error(server.client.get("/v1/nothing"), 404, "not_found")
    assert_error(server.client.put("/v1/parse"), 405, "method_not_allowed")


# -- 18: bounded store ----------------------------------------------------------------

def test_finished_tasks_are_bounded(server):
    ids = [server.submit(jpeg(48, 48, seed=100 + i), wait=30, outputs="labels").json()["id"]
           for i in range(8)]
    kept = [i for i in ids if server.client.get(f"/v1/tasks/{i}").status_code == 200]
    assert len(kept) <= 5 and ids[-1] in kept
    assert json.loads(server.client.get(f"/v1/tasks/{ids[-1]}").text)["status"] == "succeeded"
