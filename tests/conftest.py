from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"
PARITY = FIXTURES / "m2fp-parity"
PARITY_IMAGES = ("astronaut.jpg", "camera.png", "two_figures.png")
MODES = ("tiny-multiple", "tiny-single")


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    return PARITY


@pytest.fixture(scope="session")
def multiple_parser():
    from m2fp_api import HumanParser

    return HumanParser.from_pretrained(PARITY / "tiny-multiple", allow_download=False)


@pytest.fixture(scope="session")
def single_parser():
    from m2fp_api import HumanParser

    return HumanParser.from_pretrained(PARITY / "tiny-single", allow_download=False)


def png_bytes(image: Image.Image, **save_args) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **save_args)
    return buf.getvalue()


def jpeg_bytes(image: Image.Image, **save_args) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90, **save_args)
    return buf.getvalue()


def photo(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    """A small photo-like RGB image: smooth gradients plus noise, no two pixels alike."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 128.0)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))


def load_expected(mode: str) -> dict:
    return dict(np.load(PARITY / mode / "expected.npz"))


def configuration(mode: str) -> dict:
    return json.loads((PARITY / mode / "configuration.json").read_text())
