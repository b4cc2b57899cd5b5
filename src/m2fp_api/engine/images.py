"""Turn untrusted input (bytes, a path, a PIL image, an array) into an 8-bit RGB image.

The size is checked from the header before any pixel is decoded (decompression
bombs), decoding is restricted to the accepted formats, and every failure becomes
a typed error instead of whatever the decoder happened to raise.
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
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageTooLarge, ImageTooSmall, InvalidImage, UnsupportedMediaType

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP")


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
    try:
        # Pillow only warns between 1x and 2x its own bomb limit; our limit is checked
        # explicitly below, before decoding, so its warning is noise here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(limits.formats))
    except UnidentifiedImageError:
        raise UnsupportedMediaType(
            f"Not a supported image; send {', '.join(_pretty(limits.formats))}.") from None
    except Image.DecompressionBombError:
        raise ImageTooLarge("The image has too many pixels.") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError):
        raise InvalidImage("The image header is corrupt.") from None
    _check_size(image.size, limits)
    return image


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
        return DecodedImage(_normalise(source, limits), None)
    if isinstance(source, np.ndarray):
        return DecodedImage(_normalise(_from_array(source), limits), None)
    if isinstance(source, (str, os.PathLike)):
        source = Path(source).read_bytes()
    if not isinstance(source, (bytes, bytearray, memoryview)):
        raise TypeError(f"unsupported image input type {type(source).__name__}")
    image = _open(bytes(source), limits)
    fmt = image.format
    full_size = _oriented_size(image)
    if draft_min_side and fmt == "JPEG" and min(image.size) >= 2 * draft_min_side:
        scale = draft_min_side / min(image.size)
        image.draft("RGB", (int(image.size[0] * scale + 1), int(image.size[1] * scale + 1)))
    try:
        image.load()  # first frame only, for animated and multi-page files
    except Image.DecompressionBombError:
        raise ImageTooLarge("The image has too many pixels.") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, MemoryError):
        raise InvalidImage("The image data is corrupt or truncated.") from None
    return DecodedImage(_normalise(image, limits), fmt, full_size)


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """The size once EXIF orientation is applied (5-8 swap width and height)."""
    try:
        orientation = image.getexif().get(0x0112, 1)
    except (OSError, SyntaxError, ValueError, struct.error, KeyError, TypeError):
        orientation = 1
    w, h = image.size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


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


def _normalise(image: Image.Image, limits: ImageLimits) -> Image.Image:
    """Orientation applied, 8-bit RGB that looks like the photo."""
    _check_size(image.size, limits)
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, struct.error, KeyError, TypeError):
        pass  # a broken EXIF block is not worth refusing the photo for
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
