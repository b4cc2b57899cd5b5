"""Palettes, colourised maps, overlays and fast PNG encoding.

Everything is a lookup table or a whole-array operation: nothing loops over masks or
pixels in Python.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .engine.result import ParseResult

# zlib level 1: several times faster than Pillow's default at a modest size cost,
# the right trade for images produced per request
PNG_COMPRESS_LEVEL = 1


def label_set(class_names: tuple[str, ...]) -> str:
    """Name of the label set: `CIHP` (multi-human), `LIP` (single-human) or `custom`."""
    if "Torso-skin" in class_names:
        return "CIHP"
    if "Jumpsuits" in class_names:
        return "LIP"
    return "custom"


def _voc_palette() -> np.ndarray:
    ids = np.arange(256)
    colours = np.zeros((256, 3), dtype=np.int64)
    code = ids.copy()
    for shift in range(7, -1, -1):
        for channel in range(3):
            colours[:, channel] |= ((code >> channel) & 1) << shift
        code >>= 3
    colours = colours.astype(np.uint8)
    colours.flags.writeable = False
    return colours


# (256, 3) uint8 colours by class id, for every label set; 0 (background) is black. CIHP
# and LIP share the colour scheme their benchmarks visualise with (the PASCAL-VOC
# bit-interleaved map), so a class keeps its colour across the two sets.
PALETTE = _voc_palette()


# pixels blended at once: bounds the 16-bit temporaries to a few MB whatever the photo's
# shape (a band of rows of a 30000-pixel-wide strip would be tens of MB)
OVERLAY_BAND_PIXELS = 2**20


def bands(height: int, width: int) -> range:
    """Top rows of the bands of whole rows that hold about OVERLAY_BAND_PIXELS each."""
    return range(0, height, max(1, OVERLAY_BAND_PIXELS // max(1, width)))


def overlay(photo: np.ndarray, class_map: np.ndarray, colours: np.ndarray, alpha: float) -> np.ndarray:
    """Blend the part colours over the photo; background pixels keep the photo."""
    weight = int(round(min(max(alpha, 0.0), 1.0) * 256))
    out = photo.copy()
    step = bands(*photo.shape[:2]).step
    for top in range(0, photo.shape[0], step):
        rows = slice(top, top + step)
        labels = class_map[rows]
        blended = (photo[rows].astype(np.uint16) * (256 - weight)
                   + colours[labels].astype(np.uint16) * weight + 128) >> 8
        np.copyto(out[rows], blended.astype(np.uint8), where=(labels != 0)[..., None])
    return out


def encode_png(pixels: np.ndarray | Image.Image, colours: np.ndarray | None = None) -> bytes:
    """PNG bytes of a (H, W) or (H, W, 3) uint8 array or of an image. With `colours`, a
    (H, W) array is written as a palette image: one byte a pixel, a third of the work of
    RGB. (H, W) arrays are wrapped, not copied."""
    if isinstance(pixels, Image.Image):
        image = pixels
    elif colours is not None:
        height, width = pixels.shape
        image = Image.frombuffer("P", (width, height), np.ascontiguousarray(pixels), "raw", "P", 0, 1)
        image.putpalette(colours.tobytes())
    else:
        image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def mask_png(result: ParseResult) -> bytes:
    """The colourised part map as a palette PNG at the photo's size."""
    return encode_png(result.class_map, PALETTE)


def labels_png(result: ParseResult) -> bytes:
    """One channel, pixel value = class id."""
    return encode_png(result.class_map)


def person_map(result: ParseResult) -> np.ndarray:
    """(H, W): person_id + 1 where a person is, 0 elsewhere (8-bit, 16-bit past 255
    persons). Where persons overlap the higher-scoring one wins (on a tie, the lower id),
    as in a part's assignment to the person that overlaps it most."""
    dtype = np.uint8 if len(result.persons) < 256 else np.uint16
    out = np.zeros((result.height, result.width), dtype=dtype)
    for person in sorted(result.persons, key=lambda p: (p.score, -p.person_id)):  # winners last
        mask = person.mask
        out[mask.y0:mask.y0 + mask.height, mask.x0:mask.x0 + mask.width][mask.bits] = person.person_id + 1
    return out


def persons_png(result: ParseResult) -> bytes:
    """One channel, pixel value = person_id + 1 (0 = no person)."""
    return encode_png(person_map(result))


def overlay_png(result: ParseResult, photo: Image.Image, alpha: float) -> bytes:
    """The part map over the photo, at the photo's full size (a photo decoded at a
    reduced scale is brought back to it).

    Blended band by band into one full-size copy of the photo, which is encoded as it
    is: no full-size array besides it (a 24 MP photo is ~96 MB in Pillow, 72 MB as an
    array)."""
    size = (result.width, result.height)
    canvas = photo.resize(size, Image.BILINEAR) if photo.size != size else photo.copy()
    if canvas.mode != "RGB":
        canvas = canvas.convert("RGB")
    width, height = size
    rows = bands(height, width)
    for top in rows:
        bottom = min(height, top + rows.step)
        band = np.asarray(canvas.crop((0, top, width, bottom)))
        blended = overlay(band, result.class_map[top:bottom], PALETTE, alpha)
        canvas.paste(Image.fromarray(blended), (0, top))
    return encode_png(canvas)
