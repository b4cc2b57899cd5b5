"""Turn untrusted input (bytes, a path, a PIL image, an array) into an 8-bit RGB image.

The size is checked from the header before any pixel is decoded (decompression
bombs), decoding is restricted to the accepted formats, and every failure becomes
a typed error instead of whatever the decoder happened to raise. EXIF orientation is
read from the Orientation tag alone and applied here, so the reported size and the
decoded pixels always agree.
"""

from __future__ import annotations

import io
import os
import struct
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ImageTooLarge, ImageTooSmall, InvalidImage, UnsupportedMediaType

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP")

ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that shows the photo as viewers do (1: as stored)
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# EXIF is a TIFF header and directory; in a JPEG it is an APP1 segment with a signature
EXIF_SIGNATURE = b"Exif\0\0"
TIFF_BYTE_ORDERS = {b"II*\0": "<", b"MM\0*": ">"}
TIFF_SHORT = 3
IFD_ENTRY_BYTES = 12
JPEG_SOI = b"\xff\xd8"
JPEG_APP1, JPEG_SOS = 0xE1, 0xDA
# markers that stand alone (no length field): TEM, RST0-7, SOI, EOI
JPEG_STANDALONE = {0x01, *range(0xD0, 0xDA)}


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = 40_000_000
    min_side: int = 8
    formats: tuple[str, ...] = DEFAULT_FORMATS


@dataclass
class DecodedImage:
    image: Image.Image  # RGB, orientation applied (possibly decoded at a reduced scale)
    format: str | None  # as detected from the bytes; None for in-memory inputs
    original_size: tuple[int, int] | None = None  # (width, height) of the photo; results use it
    decode_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.original_size is None:
            self.original_size = self.image.size

    @property
    def size(self) -> tuple[int, int]:
        return self.original_size


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    """Read the header only, with the accepted formats and the size limits checked."""
    if len(data) == 0:
        raise InvalidImage("The upload is empty.")
    data, jpeg_exif = split_jpeg_exif(data)
    try:
        # Pillow only warns between 1x and 2x its own bomb limit; our limit is checked
        # explicitly below, before decoding, so its warning is noise here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(limits.formats))
        if jpeg_exif is not None:
            image.info["exif"] = jpeg_exif  # where Pillow keeps it, unparsed
    except UnidentifiedImageError:
        raise UnsupportedMediaType(
            f"Not a supported image; send {', '.join(_pretty(limits.formats))}.") from None
    except Image.DecompressionBombError:
        raise ImageTooLarge("The image has too many pixels.") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError):
        raise InvalidImage("The image header is corrupt.") from None
    _check_size(image.size, limits)
    return image


def split_jpeg_exif(data: bytes) -> tuple[bytes, bytes | None]:
    """(the JPEG without its EXIF segments, the first EXIF segment's payload or None);
    other data is returned as it is.

    Pillow parses a JPEG's EXIF while opening it (for a DPI value) and refuses the whole
    file when, say, XResolution has an odd type or count; the pixels do not depend on
    it, so it is taken out before Pillow sees the file. Only the segments before the
    scan are walked; anything unexpected ends the walk and is left to the decoder.
    """
    if not data.startswith(JPEG_SOI):
        return data, None
    view = memoryview(data)
    kept: list[memoryview] = []
    exif, at, copied_to = None, len(JPEG_SOI), 0
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        if marker == JPEG_SOS or marker in JPEG_STANDALONE:
            break
        (length,) = struct.unpack_from(">H", data, at + 2)
        end = at + 2 + length
        if length < 2 or end > len(data):
            break
        if marker == JPEG_APP1 and data.startswith(EXIF_SIGNATURE, at + 4):
            if exif is None:
                exif = bytes(view[at + 4:end])
            kept.append(view[copied_to:at])
            copied_to = end
        at = end
    if exif is None:
        return data, None
    kept.append(view[copied_to:])
    return b"".join(kept), exif


def probe_image(data: bytes, limits: ImageLimits = ImageLimits()) -> tuple[str, int, int]:
    """(format, width, height) from the header, without decoding: for admission control."""
    image = _open(data, limits)
    return image.format, image.size[0], image.size[1]


def decode_image(source: ImageInput, limits: ImageLimits = ImageLimits(),
                 draft_min_side: int | None = None) -> DecodedImage:
    """Decode and normalise any supported input. Raises the typed errors in `errors`.

    With `draft_min_side`, a JPEG whose short side is at least twice that is decoded at a
    reduced scale (libjpeg's DCT scaling) that keeps the short side >= draft_min_side;
    `original_size` still reports the full size, at which results are produced.
    """
    started = time.perf_counter()
    decoded = _decode(source, limits, draft_min_side)
    decoded.decode_ms = (time.perf_counter() - started) * 1000
    return decoded


def _decode(source: ImageInput, limits: ImageLimits, draft_min_side: int | None) -> DecodedImage:
    if isinstance(source, Image.Image):
        _check_size(source.size, limits)
        _load(source)
        return DecodedImage(_normalise(source, limits, exif_orientation(source)), None)
    if isinstance(source, np.ndarray):
        return DecodedImage(_normalise(_from_array(source), limits, 1), None)
    if isinstance(source, (str, os.PathLike)):
        source = Path(source).read_bytes()
    if not isinstance(source, (bytes, bytearray, memoryview)):
        raise TypeError(f"unsupported image input type {type(source).__name__}")
    image = _open(bytes(source), limits)
    fmt = image.format
    stored_w, stored_h = image.size
    if draft_min_side and fmt == "JPEG" and min(image.size) >= 2 * draft_min_side:
        scale = draft_min_side / min(image.size)
        image.draft("RGB", (int(image.size[0] * scale + 1), int(image.size[1] * scale + 1)))
    _load(image)
    # read after loading: a PNG may carry its EXIF after the pixel data
    orientation = exif_orientation(image)
    full_size = (stored_h, stored_w) if orientation in (5, 6, 7, 8) else (stored_w, stored_h)
    return DecodedImage(_normalise(image, limits, orientation), fmt, full_size)


def _load(image: Image.Image) -> None:
    try:
        image.load()  # first frame only, for animated and multi-page files
    except Image.DecompressionBombError:
        raise ImageTooLarge("The image has too many pixels.") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, MemoryError):
        raise InvalidImage("The image data is corrupt or truncated.") from None


def exif_orientation(image: Image.Image) -> int:
    """The EXIF Orientation tag (1-8) of an opened image, 1 (as stored) when absent or
    unreadable."""
    raw = image.info.get("exif")
    return orientation_from_exif(bytes(raw)) if isinstance(raw, (bytes, bytearray)) else 1


def orientation_from_exif(block: bytes) -> int:
    """The Orientation tag from an EXIF block (a TIFF header and IFD0), read as viewers
    (Chromium) read it: the first IFD0 entry with tag 0x0112, one SHORT in 1-8; else 1.

    Only the header and IFD0's entry table are read, because the value sits inside its
    entry. Pillow's own reader is not used: it stops at the first entry whose data lies
    past the end of the block and loses the entries after it, and `exif_transpose`
    re-encodes every tag afterwards, failing on odd types. Other tags, sub-IFDs, loops
    and truncation elsewhere therefore cannot change the orientation.
    """
    if block.startswith(EXIF_SIGNATURE):
        block = block[len(EXIF_SIGNATURE):]
    order = TIFF_BYTE_ORDERS.get(block[:4])
    if order is None or len(block) < 8:
        return 1
    (ifd,) = struct.unpack_from(order + "I", block, 4)
    if ifd + 2 > len(block):
        return 1
    (count,) = struct.unpack_from(order + "H", block, ifd)
    # a count claiming more entries than the block holds reads those that are there
    end = min(ifd + 2 + IFD_ENTRY_BYTES * count, len(block) - IFD_ENTRY_BYTES + 1)
    for at in range(ifd + 2, end, IFD_ENTRY_BYTES):
        tag, kind, values = struct.unpack_from(order + "HHI", block, at)
        if tag == ORIENTATION_TAG:
            (value,) = struct.unpack_from(order + "H", block, at + 8)
            readable = kind == TIFF_SHORT and values == 1 and 1 <= value <= 8
            return value if readable else 1
    return 1


def _pretty(formats) -> list[str]:
    return [{"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP"}.get(f, f) for f in formats]


def _check_size(size: tuple[int, int], limits: ImageLimits) -> None:
    w, h = size
    if w * h > limits.max_pixels:
        raise ImageTooLarge(
            f"The image is {w}x{h} ({w * h} pixels); the limit is {limits.max_pixels} pixels.")
    if min(w, h) < limits.min_side:
        raise ImageTooSmall(f"The image is {w}x{h}; each side must be at least {limits.min_side} pixels.")


def _from_array(arr: np.ndarray) -> Image.Image:
    """An (H, W) or (H, W, 3|4) array, RGB channel order."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise InvalidImage(f"Expected an (H, W), (H, W, 3) or (H, W, 4) array, got {arr.shape}.")
    if arr.dtype == np.uint16:
        arr = _scale_16bit(arr)
    elif arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and float(np.nanmax(arr)) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr))


def _scale_16bit(arr: np.ndarray) -> np.ndarray:
    # rescale the full 16-bit range to 8 bits (clamping would turn most photos white)
    return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _normalise(image: Image.Image, limits: ImageLimits, orientation: int) -> Image.Image:
    """Orientation applied, 8-bit RGB that looks like the photo."""
    _check_size(image.size, limits)
    if orientation in ORIENTATION_TRANSPOSE:
        image = image.transpose(ORIENTATION_TRANSPOSE[orientation])
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        image = Image.fromarray(_scale_16bit(np.asarray(image).astype(np.uint32, copy=False)
                                             .clip(0, 65535)))
    elif mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # transparent areas are shown as white by viewers; give the model the same
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image
