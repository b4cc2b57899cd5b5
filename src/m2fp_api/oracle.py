"""The fidelity oracle: procedurally generated photos of people with known part labels.

Random weights sit near ties everywhere, so they exaggerate every rounding difference
between backends. A stand-in *trained* on these scenes (`scripts/train_stand_in.py`,
shipped in `tests/fixtures/oracle/`) is confident the way a real model is; the
approximate backends (bf16, ONNX Runtime...) are judged by how many class-map pixels
they share with `exact` on held-out scenes drawn here with a seed the training never
used.

A scene is a cluttered background (shapes, stripes, noise in colours that clothes also
use) with 1-3 figures: head with hair (sometimes a hat or sunglasses), a torso in
upper clothes, a coat or a dress, arms (sometimes gloved), pants or a skirt over bare
legs, shoes; each part a textured shape labelled with its CIHP class id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# CIHP class ids (the multiple-human model's label set)
HAT, HAIR, GLOVE, SUNGLASSES, UPPER, DRESS, COAT, SOCKS, PANTS = 1, 2, 3, 4, 5, 6, 7, 8, 9
TORSO_SKIN, SCARF, SKIRT, FACE, L_ARM, R_ARM, L_LEG, R_LEG, L_SHOE, R_SHOE = range(10, 20)
NUM_PART_CLASSES = 20  # 0 = background .. 19; the model's class 20 is the whole person
# held-out scenes use seeds from here on; training draws below it
HELD_OUT_SEED = 1_000_000
# figure heights in pixels, the same at training and evaluation sizes, so that the
# network sees people at one scale whatever the photo's size
FIGURE_HEIGHT = (130, 300)


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    labels: np.ndarray  # (H, W) uint8 CIHP class id, 0 = background
    persons: np.ndarray  # (H, W) uint8 person index + 1, 0 = background


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _skin(rng: np.random.Generator) -> tuple[int, int, int]:
    tone = rng.uniform(0.25, 1.0)
    return (int(90 + 150 * tone), int(55 + 135 * tone), int(35 + 120 * tone))


def _texture(rng: np.random.Generator, h: int, w: int, base: tuple[int, int, int]) -> np.ndarray:
    """A (h, w, 3) float texture around `base`: flat, stripes, checks or noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.integers(0, 4)
    tex = np.empty((h, w, 3), np.float32)
    tex[:] = base
    if kind == 1:  # stripes at a random angle
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 24)
        wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
        tex += (wave[..., None] * rng.uniform(15, 60) * rng.choice([-1, 1], 3)).astype(np.float32)
    elif kind == 2:  # checks
        period = int(rng.integers(4, 20))
        checks = (((xx // period) + (yy // period)) % 2) * 2 - 1
        tex += checks[..., None] * rng.uniform(10, 50)
    elif kind == 3:  # grain
        tex += rng.normal(0, rng.uniform(5, 25), (h, w, 1)).astype(np.float32)
    return tex


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img = _texture(rng, h, w, _colour(rng))
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(6, 24))):  # clutter in any colour, clothes' ones too
        x0, y0 = rng.integers(-w // 4, w), rng.integers(-h // 4, h)
        x1, y1 = x0 + rng.integers(8, w // 2), y0 + rng.integers(8, h // 2)
        shape = rng.integers(0, 3)
        if shape == 0:
            draw.rectangle((x0, y0, x1, y1), fill=_colour(rng))
        elif shape == 1:
            draw.ellipse((x0, y0, x1, y1), fill=_colour(rng))
        else:
            draw.line((x0, y0, x1, y1), fill=_colour(rng), width=int(rng.integers(2, 12)))
    out = np.asarray(canvas, np.float32)
    out += rng.normal(0, rng.uniform(2, 10), (h, w, 1)).astype(np.float32)
    return out


class _Figure:
    """One person drawn part by part into a label image (back to front)."""

    def __init__(self, rng: np.random.Generator, labels: Image.Image, cx: float, top: float,
                 height: float) -> None:
        self.rng, self.draw = rng, ImageDraw.Draw(labels)
        self.cx, self.top, self.h = cx, top, height

    def y(self, frac: float) -> float:
        return self.top + frac * self.h

    def box(self, label: int, x0: float, y0: float, x1: float, y1: float, ellipse=False) -> None:
        (self.draw.ellipse if ellipse else self.draw.rectangle)((x0, y0, x1, y1), fill=label)

    def limb(self, label: int, start, end, width: float) -> None:
        self.draw.line((*start, *end), fill=label, width=max(2, int(width)))
        r = width / 2
        self.draw.ellipse((end[0] - r, end[1] - r, end[0] + r, end[1] + r), fill=label)

    def render(self) -> None:
        rng, h, cx = self.rng, self.h, self.cx
        half_torso = h * rng.uniform(0.11, 0.15)
        shoulder_y, hip_y = self.y(0.19), self.y(0.52)
        leg_gap, leg_w = h * 0.03, h * rng.uniform(0.07, 0.09)
        foot_y = self.y(0.95)
        # legs: bare skin, then pants or a skirt over them
        for side, label, shoe in ((-1, R_LEG, R_SHOE), (1, L_LEG, L_SHOE)):  # person's right on image left
            knee_x = cx + side * (leg_gap + leg_w / 2)
            foot_x = knee_x + side * h * rng.uniform(-0.02, 0.06)
            self.limb(label, (knee_x, hip_y), (foot_x, foot_y - h * 0.03), leg_w)
            self.box(shoe, foot_x - leg_w * 0.7, foot_y - h * 0.04, foot_x + leg_w * 0.9,
                     foot_y + h * 0.02, ellipse=True)
        lower = (PANTS, PANTS, SKIRT)[int(rng.integers(0, 3))]
        if lower == PANTS:
            knee_end = self.y(rng.uniform(0.62, 0.9))
            for side in (-1, 1):
                x = cx + side * (leg_gap + leg_w / 2)
                self.limb(PANTS, (x, hip_y), (x, knee_end), leg_w * 1.25)
            self.box(PANTS, cx - half_torso * 0.9, hip_y - h * 0.02, cx + half_torso * 0.9, hip_y + h * 0.06)
        else:
            self.draw.polygon([(cx - half_torso * 0.9, hip_y - h * 0.02), (cx + half_torso * 0.9, hip_y - h * 0.02),
                               (cx + half_torso * 1.4, self.y(0.7)), (cx - half_torso * 1.4, self.y(0.7))],
                              fill=SKIRT)
        # arms (behind the torso's edge), sometimes gloved
        arm_w = h * rng.uniform(0.05, 0.065)
        for side, label in ((-1, R_ARM), (1, L_ARM)):
            sx = cx + side * half_torso * 0.85
            hand = (sx + side * h * rng.uniform(0.02, 0.16), self.y(rng.uniform(0.42, 0.56)))
            if rng.random() < 0.2:  # raised
                hand = (sx + side * h * rng.uniform(0.05, 0.2), self.y(rng.uniform(-0.05, 0.15)))
            self.limb(label, (sx, shoulder_y + arm_w / 2), hand, arm_w)
            if rng.random() < 0.25:
                r = arm_w * 0.7
                self.box(GLOVE, hand[0] - r, hand[1] - r, hand[0] + r, hand[1] + r, ellipse=True)
        # torso: neck skin, then upper clothes, a coat or a dress
        self.box(TORSO_SKIN, cx - h * 0.035, self.y(0.14), cx + h * 0.035, shoulder_y + h * 0.03)
        top_label = (UPPER, UPPER, COAT, DRESS)[int(rng.integers(0, 4))]
        bottom = self.y(0.72) if top_label == DRESS else hip_y + h * rng.uniform(0.0, 0.05)
        flare = 1.5 if top_label == DRESS else 1.05
        self.draw.polygon([(cx - half_torso, shoulder_y), (cx + half_torso, shoulder_y),
                           (cx + half_torso * flare, bottom), (cx - half_torso * flare, bottom)],
                          fill=top_label)
        if rng.random() < 0.2:
            self.box(SCARF, cx - half_torso * 0.7, shoulder_y - h * 0.02, cx + half_torso * 0.7,
                     shoulder_y + h * 0.04)
        # head: hair behind and above the face, sometimes a hat or sunglasses
        head_r = h * rng.uniform(0.055, 0.07)
        head_y = self.y(0.085)
        long_hair = rng.random() < 0.4
        self.box(HAIR, cx - head_r * 1.15, head_y - head_r * 1.2, cx + head_r * 1.15,
                 head_y + head_r * (1.6 if long_hair else 0.4), ellipse=not long_hair)
        self.box(FACE, cx - head_r * 0.9, head_y - head_r * 0.6, cx + head_r * 0.9, head_y + head_r * 1.05,
                 ellipse=True)
        if rng.random() < 0.25:
            self.box(HAT, cx - head_r * 1.3, head_y - head_r * 1.5, cx + head_r * 1.3, head_y - head_r * 0.7)
        if rng.random() < 0.2:
            self.box(SUNGLASSES, cx - head_r * 0.8, head_y - head_r * 0.05, cx + head_r * 0.8,
                     head_y + head_r * 0.3)


def scene(seed: int, width: int, height: int) -> Scene:
    """One photo with 1-3 figures, reproducible from its seed."""
    rng = np.random.default_rng(seed)
    image = _background(rng, height, width)
    labels = np.zeros((height, width), np.uint8)
    persons = np.zeros((height, width), np.uint8)
    count = int(rng.integers(1, 4))
    # figures from back to front: smaller (farther) first
    heights = np.sort(rng.uniform(*FIGURE_HEIGHT, count))
    for index, fig_h in enumerate(heights):
        one = Image.new("L", (width, height), 0)
        cx = rng.uniform(0.12, 0.88) * width
        top = rng.uniform(0.0, max(1.0, height - fig_h))
        _Figure(rng, one, cx, top, fig_h).render()
        mask = np.asarray(one)
        drawn = mask > 0
        labels[drawn] = mask[drawn]
        persons[drawn] = index + 1
        # colours per part, skin shared within a person
        skin = _skin(rng)
        for label in np.unique(mask[drawn]):
            where = mask == label
            ys, xs = np.nonzero(where)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            base = skin if label in (FACE, TORSO_SKIN, L_ARM, R_ARM, L_LEG, R_LEG) else _colour(rng)
            tex = _texture(rng, y1 - y0, x1 - x0, base)
            sub = where[y0:y1, x0:x1]
            image[y0:y1, x0:x1][sub] = tex[sub]
    image += rng.normal(0, 3, image.shape).astype(np.float32)  # sensor noise over everything
    return Scene(np.clip(image, 0, 255).astype(np.uint8), labels, persons)


def held_out(count: int, width: int = 832, height: int = 640) -> list[Scene]:
    """The evaluation scenes: seeds the training never draws. At the default size the
    multiple-human pre-processing does not resize them (short side 640)."""
    return [scene(HELD_OUT_SEED + i, width, height) for i in range(count)]


# the share of held-out pixels an approximate backend must agree on with `exact`, on
# trained weights (the performance issue's bar)
MIN_AGREEMENT = 0.995


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of pixels on which two class maps agree."""
    if a.shape != b.shape:
        raise ValueError(f"class maps differ in size: {a.shape} vs {b.shape}")
    return float((a == b).mean())
