"""Bad and unusual input to the engine: shared/RELIABILITY.md items 1-7."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import jpeg_bytes, photo, png_bytes
from m2fp_api.engine.images import ImageLimits, decode_image
from m2fp_api.errors import ImageTooLarge, ImageTooSmall, InvalidImage, UnsupportedMediaType


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 20000) -> bytes:
    """A few hundred bytes whose header claims side x side pixels."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (side * 3 + 1) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def bomb_jpeg(side: int = 60000) -> bytes:
    """A real small JPEG with its frame header patched to claim side x side."""
    data = bytearray(jpeg_bytes(photo(16, 16)))
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", side, side)
    return bytes(data)


# -- 1: decompression bombs --------------------------------------------------------------

@pytest.mark.parametrize("make", [bomb_png, bomb_jpeg], ids=["png", "jpeg"])
def test_decompression_bomb_is_refused_from_the_header(make):
    with pytest.raises(ImageTooLarge):
        decode_image(make())


def test_decompression_bomb_costs_little_memory():
    """Measured in a fresh process so that the peak RSS is the refusal's own."""
    code = f"""
import resource, sys
sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
from m2fp_api.engine.images import decode_image
from m2fp_api.errors import ImageTooLarge
from test_images import bomb_png
data = bomb_png()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decode_image(data)
except ImageTooLarge:
    pass
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    growth = int(out.stdout.strip().splitlines()[-1])
    assert growth < 100 * 2**20, growth


def test_pixel_limit_is_configurable():
    data = png_bytes(photo(100, 100))
    with pytest.raises(ImageTooLarge):
        decode_image(data, ImageLimits(max_pixels=9_999))
    assert decode_image(data, ImageLimits(max_pixels=10_000)).size == (100, 100)


# -- 2: not an accepted image -----------------------------------------------------------

NOT_IMAGES = {
    "random": np.random.default_rng(1).bytes(4096),
    "text": b"hello, this is not a photo\n" * 20,
    "svg": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
    "pdf": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF",
    "heic": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64,
}


@pytest.mark.parametrize("name", sorted(NOT_IMAGES))
def test_non_images_are_unsupported_media(name):
    with pytest.raises(UnsupportedMediaType):
        decode_image(NOT_IMAGES[name])


def test_gif_is_not_accepted_unless_added():
    buf = io.BytesIO()
    photo().save(buf, format="GIF")
    with pytest.raises(UnsupportedMediaType):
        decode_image(buf.getvalue())
    assert decode_image(buf.getvalue(), ImageLimits(formats=("GIF",))).image.mode == "RGB"


def test_empty_upload_is_invalid():
    with pytest.raises(InvalidImage):
        decode_image(b"")


# -- 3: truncated ---------------------------------------------------------------------------

@pytest.mark.parametrize("encode", [jpeg_bytes, png_bytes], ids=["jpeg", "png"])
def test_truncated_images_are_invalid(encode):
    data = encode(photo(200, 150))
    for cut in (len(data) // 2, len(data) - 40):
        with pytest.raises(InvalidImage):
            decode_image(data[:cut])


# -- 4: EXIF orientation ----------------------------------------------------------------

TRANSPOSE = {2: Image.FLIP_LEFT_RIGHT, 3: Image.ROTATE_180, 4: Image.FLIP_TOP_BOTTOM,
             5: Image.TRANSPOSE, 6: Image.ROTATE_270, 7: Image.TRANSVERSE, 8: Image.ROTATE_90}


def quadrants() -> Image.Image:
    """60x30, four flat colours, so orientation is visible after JPEG compression."""
    arr = np.zeros((30, 60, 3), np.uint8)
    arr[:15, :30] = (255, 0, 0)
    arr[:15, 30:] = (0, 255, 0)
    arr[15:, :30] = (0, 0, 255)
    arr[15:, 30:] = (255, 255, 0)
    return Image.fromarray(arr)


def quadrant_means(image: Image.Image) -> np.ndarray:
    a = np.asarray(image).astype(float)
    h, w = a.shape[0] // 2, a.shape[1] // 2
    return np.array([a[:h, :w].mean((0, 1)), a[:h, w:].mean((0, 1)),
                     a[h:, :w].mean((0, 1)), a[h:, w:].mean((0, 1))])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation):
    src = quadrants()
    exif = Image.Exif()
    exif[0x0112] = orientation
    decoded = decode_image(jpeg_bytes(src, exif=exif, subsampling=0)).image
    expected = src.transpose(TRANSPOSE[orientation]) if orientation in TRANSPOSE else src
    assert decoded.size == expected.size
    np.testing.assert_allclose(quadrant_means(decoded), quadrant_means(expected), atol=20)


# -- 5: colour modes --------------------------------------------------------------------

def test_greyscale_becomes_rgb():
    grey = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (32, 1)))
    out = np.asarray(decode_image(png_bytes(grey)).image)
    assert out.shape == (32, 64, 3)
    np.testing.assert_array_equal(out[..., 0], np.asarray(grey))
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_16bit_greyscale_is_scaled_not_clamped():
    ramp = (np.tile(np.linspace(0, 65535, 64), (16, 1))).astype(np.uint16)
    image = Image.fromarray(ramp)
    out = np.asarray(decode_image(png_bytes(image)).image)[..., 0].astype(int)
    expected = np.round(ramp / 257).astype(int)
    assert np.abs(out - expected).max() <= 1
    assert out.min() == 0 and out.max() == 255 and 100 < out.mean() < 155


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_is_composited_on_white(mode):
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., :3] = 10  # dark colour everywhere ...
    rgba[:, 10:, 3] = 255  # ... opaque only on the right half
    image = Image.fromarray(rgba, "RGBA").convert(mode)
    out = np.asarray(decode_image(png_bytes(image)).image)
    assert out.dtype == np.uint8 and out.shape == (20, 20, 3)
    assert (out[:, :10] == 255).all()
    assert (out[:, 10:] == 10).all()


def test_palette_with_transparency():
    image = Image.new("P", (16, 16), 1)
    image.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    image.info["transparency"] = 0
    image.paste(0, (0, 0, 8, 16))
    out = np.asarray(decode_image(png_bytes(image, transparency=0)).image)
    assert (out[:, :8] == 255).all()
    assert (out[:, 8:] == (200, 30, 30)).all()


def test_cmyk_jpeg_becomes_rgb():
    cmyk = photo(40, 30).convert("CMYK")
    out = decode_image(jpeg_bytes(cmyk)).image
    assert out.mode == "RGB" and out.size == (40, 30)
    diff = np.abs(np.asarray(out).astype(int) - np.asarray(photo(40, 30)).astype(int))
    assert diff.mean() < 12  # looks like the photo


def test_arrays_and_pil_images_are_accepted():
    rgb = np.asarray(photo(32, 24))
    assert decode_image(rgb).size == (32, 24)
    assert decode_image(rgb.astype(np.float32) / 255).size == (32, 24)
    assert decode_image(photo(32, 24).convert("L")).image.mode == "RGB"
    with pytest.raises(InvalidImage):
        decode_image(np.zeros((10, 10, 7), np.uint8))


# -- 6: animated and multi-frame files --------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animated_files_give_their_first_frame(fmt):
    frames = [Image.new("RGB", (24, 24), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    buf = io.BytesIO()
    extra = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=50, **extra)
    out = np.asarray(decode_image(buf.getvalue()).image).astype(int)
    assert np.abs(out - (250, 0, 0)).max() <= 2


# -- 7: too small, extreme aspect ratios ------------------------------------------------

def test_tiny_images_are_too_small():
    with pytest.raises(ImageTooSmall):
        decode_image(png_bytes(photo(5, 40)))


def test_extreme_aspect_ratio_is_too_small_not_a_crash(multiple_parser, single_parser):
    strip = png_bytes(photo(4000, 8))
    for parser in (multiple_parser, single_parser):
        with pytest.raises(ImageTooSmall):
            parser.parse(strip)


def test_square_photo_larger_than_single_human_input(single_parser):
    """ModelScope's centre-pad computes a zero size here; ours fits it like the others."""
    result = single_parser.parse(photo(700, 700))
    assert result.class_map.shape == (700, 700)


def test_error_messages_do_not_leak_internals():
    for data in [*NOT_IMAGES.values(), bomb_png(), b"", jpeg_bytes(photo())[:100]]:
        with pytest.raises(Exception) as info:
            decode_image(data)
        text = json.dumps(info.value.message).lower()
        for leak in ("pil", "pillow", "/", "traceback", "0x"):
            assert leak not in text, (leak, text)
