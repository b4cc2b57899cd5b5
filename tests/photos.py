"""Synthetic photos for the tests: every helper that makes image bytes lives here."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png_bytes(image: Image.Image, **save_args) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **save_args)
    return buf.getvalue()


def jpeg_bytes(image: Image.Image, quality: int = 90, **save_args) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, **save_args)
    return buf.getvalue()


def photo(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    """A small photo-like RGB image: smooth gradients plus noise, no two pixels alike."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 128.0)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))


def jpeg(width: int, height: int, seed: int = 0, quality: int = 85) -> bytes:
    """A smooth photo-like JPEG (small file even at 24 MP); each seed gives other bytes."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = (x * 255 / width + seed * 37) % 256
    arr = np.stack([r, y * 255 / height, (x + y) * 127 / (width + height)], -1).astype(np.uint8)
    return jpeg_bytes(Image.fromarray(arr), quality=quality)


def big_jpeg(seed: int = 0) -> bytes:
    """24 MP: seconds of real work even for the tiny model (decoding, post-processing
    and rendering at full size), so tests can catch tasks while they run."""
    return jpeg(6000, 4000, seed)
