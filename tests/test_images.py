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

from photos import jpeg_bytes, photo, png_bytes
from m2fp_api.engine.images import (EXIF_SIGNATURE, ImageLimits, decode_image, orientation_from_exif,
                                    split_jpeg_exif)
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


# -- 20: EXIF of any shape (hand-built TIFF blocks) -------------------------------------

EXIF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
# tags Pillow and viewers read from IFD0 (descriptions, resolutions, versions, sub-IFD
# pointers), plus a few nobody knows
ODD_TAGS = (0x010E, 0x010F, 0x0110, 0x011A, 0x011B, 0x0128, 0x0131, 0x0132, 0x013B, 0x0213,
            0x8298, 0x9000, 0xA000, 0x8769, 0x8825, 0xA005, 0x927C, 0x0001, 0xC4A5, 0xFFFF)
SUB_IFD_POINTERS = (0x8769, 0x8825, 0xA005)
IFD0 = 8


def _entry(order: str, tag: int, typ: int, count: int, value: bytes) -> bytes:
    return struct.pack(order + "HHI", tag, typ, count) + value.ljust(4, b"\0")[:4]


def _odd_entry(rng: np.random.Generator, order: str, data_at: int, data: bytearray,
               block_end: int, data_room: int) -> bytes:
    """One IFD entry with a random tag, type (valid or not), count and value or offset."""
    tag = int(rng.choice(ODD_TAGS)) if rng.random() < 0.8 else int(rng.integers(0, 65536))
    if tag == 0x0112:  # the one tag these blocks place deliberately
        tag = 0x0111
    typ = int(rng.integers(1, 14)) if rng.random() < 0.85 else int(rng.choice([0, 14, 15, 255, 65535]))
    count = int(rng.choice([0, 1, 1, 2, 3, 8, int(rng.integers(1, 64)), 2**31, 2**32 - 1]))
    if tag in SUB_IFD_POINTERS and rng.random() < 0.5:
        # a sub-IFD pointer back to IFD0 (a loop), past the end, or into the data
        typ, count = 4, 1
        target = int(rng.choice([IFD0, 2**32 - 1, block_end + 1000, data_at + len(data)]))
        return _entry(order, tag, typ, count, struct.pack(order + "I", target))
    size = EXIF_TYPE_SIZES.get(typ, 1) * count
    if size <= 4:
        return _entry(order, tag, typ, count, rng.bytes(4))
    if size <= 512 and len(data) + size <= data_room and rng.random() < 0.8:
        offset = data_at + len(data)
        data.extend(rng.bytes(size))
    else:  # the value lies outside the block, or only partly inside it
        offset = int(rng.choice([block_end - 2, block_end + 10, 2**31, 2**32 - 8]))
    return _entry(order, tag, typ, count, struct.pack(order + "I", offset))


def orientation_entry(order: str, orientation: int) -> bytes:
    return _entry(order, 0x0112, 3, 1, struct.pack(order + "H", orientation))


def tiff_block(rng: np.random.Generator, orientation: int | None, *, extra: int,
               position: int = 0, next_ifd: int = 0, entries_claimed: int | None = None,
               orientation_raw: bytes | None = None, data_room: int = 4096) -> tuple[bytes, int]:
    """A TIFF header and IFD0 with `extra` random entries and the Orientation entry at
    `position` (or `orientation_raw` in its place). Returns (block, end of that entry)."""
    order = "<" if rng.random() < 0.5 else ">"
    n = extra + 1
    data_at = IFD0 + 2 + 12 * n + 4
    block_end = data_at + data_room
    data = bytearray()
    entries = [_odd_entry(rng, order, data_at, data, block_end, data_room) for _ in range(extra)]
    own = orientation_raw or orientation_entry(order, orientation)
    entries.insert(position, own)
    head = (b"II*\0" if order == "<" else b"MM\0*") + struct.pack(order + "I", IFD0)
    ifd = struct.pack(order + "H", n if entries_claimed is None else entries_claimed)
    ifd += b"".join(entries) + struct.pack(order + "I", next_ifd)
    return head + ifd + bytes(data), IFD0 + 2 + 12 * (position + 1)


def with_app1(jpeg: bytes, *payloads: bytes) -> bytes:
    """The JPEG with APP1 segments inserted right after SOI."""
    segments = b"".join(b"\xff\xe1" + struct.pack(">H", len(p) + 2) + p for p in payloads)
    return jpeg[:2] + segments + jpeg[2:]


def fuzzed_exif(seed: int) -> tuple[list[bytes], int, str]:
    """(APP1 payloads, the orientation a reader of the Orientation tag alone must find, kind)."""
    rng = np.random.default_rng(seed)
    orientation = int(rng.integers(1, 9))
    kind = str(rng.choice(["odd", "odd", "odd", "huge", "loop", "truncated", "bad-orientation",
                           "bad-header", "not-exif", "two-segments", "over-claimed"]))
    extra = int(rng.integers(0, 12))
    position = int(rng.integers(0, extra + 1))
    exif = b"Exif\0\0"
    if kind == "odd":
        block, _ = tiff_block(rng, orientation, extra=extra, position=position,
                              next_ifd=int(rng.choice([0, 0, 2**32 - 1, 5000])))
        return [exif + block], orientation, kind
    if kind == "huge":  # thousands of entries (as many as a JPEG segment holds), the Orientation among the last
        n = int(rng.integers(1000, 5000))
        block, _ = tiff_block(rng, orientation, extra=n, position=n - int(rng.integers(0, 5)),
                              data_room=2000)
        return [exif + block], orientation, kind
    if kind == "loop":  # IFD0's next-IFD and sub-IFD pointers lead back to IFD0
        block, _ = tiff_block(rng, orientation, extra=extra, position=position, next_ifd=IFD0)
        order = "<" if block[:2] == b"II" else ">"
        loop = _entry(order, 0x8769, 4, 1, struct.pack(order + "I", IFD0))
        n = struct.unpack(order + "H", block[8:10])[0]
        block = block[:8] + struct.pack(order + "H", n + 1) + loop + block[10:]
        return [exif + block], orientation, kind
    if kind == "truncated":
        block, entry_end = tiff_block(rng, orientation, extra=extra, position=position)
        cut = int(rng.integers(1, len(block)))
        readable = cut >= entry_end
        return [exif + block[:cut]], orientation if readable else 1, kind
    if kind == "over-claimed":  # more entries claimed than the block holds
        block, _ = tiff_block(rng, orientation, extra=extra, position=position,
                              entries_claimed=int(rng.choice([extra + 2, 1000, 65535])))
        return [exif + block], orientation, kind
    if kind == "bad-orientation":  # the tag itself unreadable: the photo is taken as stored
        order = "<" if rng.random() < 0.5 else ">"
        typ = int(rng.choice([2, 5, 7, 10, 11, 12]))
        raw = rng.choice([
            _entry(order, 0x0112, typ, 1, struct.pack(order + "I", 8 + 2)),
            _entry(order, 0x0112, 3, 1, struct.pack(order + "H", int(rng.choice([0, 9, 255, 65535])))),
            _entry(order, 0x0112, 3, 2, struct.pack(order + "HH", orientation, orientation)),
            _entry(order, 0x0112, 3, 0, b""),
        ])
        block, _ = tiff_block(rng, None, extra=extra, position=position, orientation_raw=bytes(raw))
        return [exif + block], 1, kind
    if kind == "bad-header":
        block, _ = tiff_block(rng, orientation, extra=extra, position=position)
        broken = rng.choice([b"IM*\0" + block[4:], block[:2] + b"\0\0" + block[4:],
                             block[:4] + b"\xff\xff\xff\x00" + block[8:], block[:6]])
        return [exif + bytes(broken)], 1, kind
    if kind == "not-exif":  # APP1 that is not EXIF (XMP, a near-miss prefix)
        block, _ = tiff_block(rng, orientation, extra=extra, position=position)
        prefix = rng.choice([b"Exif\0", b"exif\0\0", b"http://ns.adobe.com/xap/1.0/\0"])
        return [bytes(prefix) + block], 1, kind
    # two EXIF segments: the first one counts
    first, _ = tiff_block(rng, orientation, extra=extra, position=position)
    second, _ = tiff_block(rng, int(rng.integers(1, 9)), extra=extra, position=0)
    return [exif + first, exif + second], orientation, kind


def marked_photo(width: int = 40, height: int = 24) -> Image.Image:
    """Flat grey with one red square off the centre lines: every orientation moves it
    somewhere else."""
    arr = np.full((height, width, 3), 128, np.uint8)
    arr[height * 3 // 24:height * 9 // 24, width * 4 // 40:width * 10 // 40] = (230, 20, 20)
    return Image.fromarray(arr)


def marker_centre(image: Image.Image) -> np.ndarray:
    a = np.asarray(image.convert("RGB")).astype(int)
    ys, xs = np.nonzero(a[..., 0] - a[..., 1] > 100)
    assert ys.size, "marker not found"
    return np.array([xs.mean(), ys.mean()]) / image.size  # as a fraction of (width, height)


def oriented(image: Image.Image, orientation: int) -> Image.Image:
    return image.transpose(TRANSPOSE[orientation]) if orientation in TRANSPOSE else image


FUZZ_CASES = 400


def test_exif_fuzzer_orients_by_the_orientation_tag_alone():
    """Random extra tags of every type and count, broken blocks: the decoded photo always
    has the size and content its Orientation tag gives (the photo as stored when the tag
    cannot be read), and its reported size is the decoded one."""
    src = marked_photo()
    plain = jpeg_bytes(src, subsampling=0)
    kinds: dict[str, int] = {}
    failures = []
    for seed in range(FUZZ_CASES):
        payloads, orientation, kind = fuzzed_exif(seed)
        kinds[kind] = kinds.get(kind, 0) + 1
        # every 4th case through the reduced-scale (draft) path, which sizes results separately
        draft = 8 if seed % 4 == 0 else None
        try:
            check_oriented(src, with_app1(plain, *payloads), orientation, draft)
        except Exception as exc:  # collected: the summary says which kinds of block fail
            failures.append(f"seed {seed} {kind} orientation {orientation}: {type(exc).__name__} {exc}")
    assert not failures, f"{len(failures)}/{FUZZ_CASES} failed:\n" + "\n".join(failures[:15])
    assert len(kinds) == 9 and min(kinds.values()) >= 10, kinds


def check_oriented(src: Image.Image, data: bytes, orientation: int, draft: int | None) -> None:
    decoded = decode_image(data, draft_min_side=draft)
    expected = oriented(src, orientation)
    assert decoded.size == expected.size, ("reported size", decoded.size, expected.size)
    image_w, image_h = decoded.image.size
    assert (image_w >= image_h) == (expected.width >= expected.height), ("decoded", decoded.image.size)
    if draft is None:
        assert decoded.image.size == expected.size, ("decoded", decoded.image.size)
    found, wanted = marker_centre(decoded.image), marker_centre(expected)
    assert np.abs(found - wanted).max() < 0.06, ("marker", found, wanted)


def exif_with(orientation: int, *tags: tuple[int, int, int, bytes]) -> bytes:
    """An EXIF payload (little-endian) with Orientation and the given (tag, type, count,
    value) entries; values over 4 bytes go after the directory."""
    n = len(tags) + 1
    data_at = IFD0 + 2 + 12 * n + 4
    entries, data = [orientation_entry("<", orientation)], b""
    for tag, typ, count, value in tags:
        if len(value) > 4:
            entries.append(_entry("<", tag, typ, count, struct.pack("<I", data_at + len(data))))
            data += value
        else:
            entries.append(_entry("<", tag, typ, count, value))
    return (EXIF_SIGNATURE + b"II*\0" + struct.pack("<IH", IFD0, n) + b"".join(entries)
            + struct.pack("<I", 0) + data)


# the blocks the issue reported, by what Pillow tripped on
ISSUE_EXIF = {
    # exif_transpose: 'IFDRational' object has no attribute 'encode'
    "description-as-rational": (0x010E, 10, 1, struct.pack("<ii", 1, 3)),
    # exif_transpose raised, photo left unrotated with a swapped size
    "xresolution-as-double": (0x011A, 12, 1, struct.pack("<d", 72.0)),
    "exifversion-as-float": (0x9000, 11, 1, struct.pack("<f", 2.3)),
    # Pillow's JPEG open reads the DPI from EXIF: IndexError, the file refused as unsupported
    "xresolution-one-byte": (0x011A, 7, 1, b"\x48"),
}


@pytest.mark.parametrize("case", sorted(ISSUE_EXIF))
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_odd_tag_types_do_not_stop_orientation(case, orientation):
    src = marked_photo()
    data = with_app1(jpeg_bytes(src, subsampling=0), exif_with(orientation, ISSUE_EXIF[case]))
    check_oriented(src, data, orientation, None)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_png_and_webp_exif_orientation_is_applied(fmt):
    src = marked_photo()
    buf = io.BytesIO()
    src.save(buf, format=fmt, exif=exif_with(6, ISSUE_EXIF["description-as-rational"]),
             **({"lossless": True} if fmt == "WEBP" else {}))
    check_oriented(src, buf.getvalue(), 6, None)


def test_split_jpeg_exif_keeps_everything_else():
    plain = jpeg_bytes(marked_photo(), subsampling=0)
    payload = exif_with(6)
    stripped, exif = split_jpeg_exif(with_app1(plain, payload, b"http://ns.adobe.com/xap/1.0/\0<x/>"))
    assert exif == payload
    assert stripped == with_app1(plain, b"http://ns.adobe.com/xap/1.0/\0<x/>")
    assert split_jpeg_exif(plain) == (plain, None)
    assert orientation_from_exif(payload) == 6
