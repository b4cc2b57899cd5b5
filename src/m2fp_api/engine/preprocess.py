"""Photo -> network input, the way ModelScope's M2FP pipeline prepares it.

Multiple-human models: resize (PIL bilinear) so the short side is 640 and the long
side at most 1333. Single-human models: shrink to fit the configured size, then
centre-pad with grey (128); the crop box remembers where the photo sits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..errors import ImageTooSmall
from ..model.config import M2FPConfig

SHORT_SIDE = 640
LONG_SIDE_MAX = 1333
SINGLE_HUMAN_PAD_VALUE = 128
# a network input side below this leaves no pixel at the mask stride (1/4)
MIN_NETWORK_SIDE = 4
# JPEGs may be decoded at a reduced scale down to this short side: twice the network's
# keeps the resize to the network input as sharp as from the full photo
DRAFT_MIN_SIDE = 2 * SHORT_SIDE


@dataclass
class NetworkInput:
    tensor: torch.Tensor  # (3, h, w) float32, RGB 0..255, before padding to 32
    output_size: tuple[int, int]  # (H, W) of the photo: results are produced at this size
    crop_box: tuple[int, int, int, int] | None  # single-human: (x0, y0, x1, y1) of the photo

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.tensor.shape[-2:])


def multiple_human_size(h: int, w: int) -> tuple[int, int]:
    """(new_h, new_w), rounded as ModelScope rounds them."""
    scale = SHORT_SIDE / min(h, w)
    new_h, new_w = (SHORT_SIDE, scale * w) if h < w else (scale * h, SHORT_SIDE)
    if max(new_h, new_w) > LONG_SIDE_MAX:
        shrink = LONG_SIDE_MAX / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return int(new_h + 0.5), int(new_w + 0.5)


def single_human_size(h: int, w: int, target_w: int, target_h: int) -> tuple[int, int]:
    """(new_h, new_w): shrink to fit the target keeping the aspect ratio, never enlarge.

    Integer truncation follows ModelScope. Its square-photo case, larger than the target
    on both sides, falls through to a zero size there; here it fits like the others.
    """
    if h > target_h and w > target_w:
        if h >= w:
            new_h, new_w = target_h, int(target_h * w / h)
            if new_w > target_w:
                new_w, new_h = target_w, int(target_w * h / w)
        else:
            new_w, new_h = target_w, int(target_w * h / w)
            if new_h > target_h:
                new_h, new_w = target_h, int(target_h * w / h)
    elif h > target_h:
        new_h, new_w = target_h, int(target_h * w / h)
    elif w > target_w:
        new_w, new_h = target_w, int(target_w * h / w)
    else:
        new_h, new_w = h, w
    return new_h, new_w


def _to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32."""
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy()).float()


def network_size(width: int, height: int, cfg: M2FPConfig) -> tuple[int, int]:
    """(new_h, new_w) of the photo inside the network input; ImageTooSmall when a side
    would vanish (an extreme aspect ratio)."""
    if cfg.single_human:
        new_h, new_w = single_human_size(height, width, *cfg.single_human_size)
    else:
        new_h, new_w = multiple_human_size(height, width)
    if min(new_h, new_w) < MIN_NETWORK_SIDE:
        raise ImageTooSmall(f"The image is {width}x{height}; its aspect ratio is too extreme to parse.")
    return new_h, new_w



def prepare(image: Image.Image, cfg: M2FPConfig,
            original_size: tuple[int, int] | None = None) -> NetworkInput:
    """RGB photo -> network input for this model's mode.

    `original_size` (width, height) is the photo's full size when `image` was decoded at
    a reduced scale: the network input is sized from it, as ModelScope sizes it from the
    full photo, and results are produced at it.
    """
    w, h = original_size or image.size
    new_h, new_w = network_size(w, h, cfg)
    if not cfg.single_human:
        if (new_w, new_h) != image.size:
            image = image.resize((new_w, new_h), Image.BILINEAR)
        return NetworkInput(_to_tensor(np.asarray(image, dtype=np.uint8)), (h, w), None)

    target_w, target_h = cfg.single_human_size
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.BILINEAR)
    pad_left, pad_top = (target_w - new_w) // 2, (target_h - new_h) // 2
    box = (pad_left, pad_top, pad_left + new_w, pad_top + new_h)
    arr = np.asarray(image, dtype=np.uint8)
    # ModelScope skips the padding when neither the left nor the top pad is needed
    # (a one-pixel shortfall on the right or bottom); the network's own zero padding
    # to a multiple of 32 covers the rest. Kept as is: parity depends on it.
    if pad_left or pad_top:
        canvas = np.full((target_h, target_w, 3), SINGLE_HUMAN_PAD_VALUE, dtype=np.uint8)
        canvas[box[1]:box[3], box[0]:box[2]] = arr
        arr = canvas
    return NetworkInput(_to_tensor(arr), (h, w), box)
