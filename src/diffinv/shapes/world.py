"""The shapes world: 32x32 scenes of one anti-aliased shape on a plain background.

The world is fixed so that scenes made by any tool are comparable:

* caption exactly ``"a {small|big} {colour} {shape} on a {colour} background"``;
* six colours (:data:`COLOURS`), the background a different colour from the shape;
* circle of radius ``r``; square of equal area (half-side ``0.886 r``); equilateral triangle pointing up
  with circumradius ``1.3 r``;
* ``r`` uniform in ``[0.12, 0.18] * 32`` (small) or ``[0.24, 0.32] * 32`` (big); centre uniform with the
  whole shape inside the frame; neither position nor radius is in the caption;
* drawn anti-aliased: rendered at 4x and box-downsampled.

Because the scene behind every caption is known, an edit ("a red circle ..." -> "a blue circle ...") has a
ground-truth image: :func:`render` the same geometry with the edited attribute.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, replace

import numpy as np

SIZE = 32
SUPERSAMPLE = 4
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 170),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "big")
RADIUS_RANGE = {"small": (0.12 * SIZE, 0.18 * SIZE), "big": (0.24 * SIZE, 0.32 * SIZE)}
SQUARE_HALF_SIDE = 0.886  # times r: equal area to the circle
TRIANGLE_CIRCUMRADIUS = 1.3  # times r
VOCABULARY = ("a", "on", "background", *SIZES, *COLOURS, *SHAPES)


@dataclass(frozen=True)
class Scene:
    """One scene: its attributes and its geometry (pixels, origin top-left, y down)."""

    size: str
    colour: str
    shape: str
    background: str
    cx: float
    cy: float
    r: float

    @property
    def caption(self) -> str:
        return caption_of(self.size, self.colour, self.shape, self.background)

    @property
    def attributes(self) -> dict[str, str]:
        return {"size": self.size, "colour": self.colour, "shape": self.shape, "background": self.background}

    def edited(self, **attributes: str) -> "Scene":
        """The same geometry with some attributes changed (the ground truth of an edit).

        Changing ``size`` rescales the radius to the same relative position in the new size's range.
        """
        scene = replace(self, **attributes)
        if scene.size != self.size:
            lo, hi = RADIUS_RANGE[self.size]
            nlo, nhi = RADIUS_RANGE[scene.size]
            scene = replace(scene, r=nlo + (self.r - lo) / (hi - lo) * (nhi - nlo))
        return scene

    def to_dict(self) -> dict:
        return asdict(self) | {"caption": self.caption}


def caption_of(size: str, colour: str, shape: str, background: str) -> str:
    return f"a {size} {colour} {shape} on a {background} background"


def parse_caption(caption: str) -> dict[str, str]:
    """The attributes a caption names; ``ValueError`` if it is not a caption of this world."""
    words = caption.strip().lower().split()
    if (
        len(words) != 8
        or words[0] != "a"
        or words[4:6] != ["on", "a"]
        or words[7] != "background"
        or words[1] not in SIZES
        or words[2] not in COLOURS
        or words[3] not in SHAPES
        or words[6] not in COLOURS
    ):
        raise ValueError(f"not a shapes-world caption: {caption!r}")
    return {"size": words[1], "colour": words[2], "shape": words[3], "background": words[6]}


def all_attribute_combinations() -> list[tuple[str, str, str, str]]:
    """Every (size, colour, shape, background) with background != colour: 180 captions."""
    return [c for c in itertools.product(SIZES, COLOURS, SHAPES, COLOURS) if c[1] != c[3]]


def held_out_combinations() -> set[tuple[str, str, str, str]]:
    """Captions never shown in training: every 9th combination (20 of 180), fixed for all tools."""
    return set(all_attribute_combinations()[4::9])


def shape_extent(shape: str, r: float) -> tuple[float, float, float]:
    """(half-width, distance above the centre, distance below the centre) of a shape of radius ``r``."""
    if shape == "circle":
        return r, r, r
    if shape == "square":
        h = SQUARE_HALF_SIDE * r
        return h, h, h
    R = TRIANGLE_CIRCUMRADIUS * r
    return R * math.sqrt(3) / 2, R, R / 2


def coverage(shape: str, cx: float, cy: float, r: float, size: int = SIZE, supersample: int = SUPERSAMPLE):
    """Anti-aliased coverage in [0, 1] of a shape, as a ``(size, size)`` float array.

    The shape is tested at ``supersample``^2 points per pixel (pixel centres of the fine grid), then the
    fine mask is averaged down (box filter).
    """
    n = size * supersample
    coords = (np.arange(n, dtype=np.float64) + 0.5) / supersample
    x = coords[None, :] - cx
    y = coords[:, None] - cy
    if shape == "circle":
        mask = x * x + y * y <= r * r
    elif shape == "square":
        h = SQUARE_HALF_SIDE * r
        mask = (np.abs(x) <= h) & (np.abs(y) <= h)
    elif shape == "triangle":
        R = TRIANGLE_CIRCUMRADIUS * r
        # Vertices: top (0, -R), bottom-left (-R sin60, R/2), bottom-right (R sin60, R/2); y points down.
        # Inside = below the bottom edge's line is false, and on the inner side of both slanted edges.
        s3 = math.sqrt(3)
        mask = (y <= R / 2) & (s3 * x - y <= R) & (-s3 * x - y <= R)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return mask.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def render(scene: Scene) -> np.ndarray:
    """The scene as a ``(32, 32, 3)`` uint8 RGB image."""
    alpha = coverage(scene.shape, scene.cx, scene.cy, scene.r)[..., None]
    fg = np.asarray(COLOURS[scene.colour], dtype=np.float64)
    bg = np.asarray(COLOURS[scene.background], dtype=np.float64)
    return np.round(bg + alpha * (fg - bg)).astype(np.uint8)


def sample_scene(rng: np.random.Generator, combination: tuple[str, str, str, str] | None = None) -> Scene:
    """A random scene; ``combination`` fixes (size, colour, shape, background), else drawn uniformly."""
    if combination is None:
        combos = all_attribute_combinations()
        combination = combos[int(rng.integers(len(combos)))]
    size, colour, shape, background = combination
    lo, hi = RADIUS_RANGE[size]
    r = float(rng.uniform(lo, hi))
    half_w, up, down = shape_extent(shape, r)
    cx = float(rng.uniform(half_w, SIZE - half_w))
    cy = float(rng.uniform(up, SIZE - down))
    return Scene(size, colour, shape, background, cx, cy, r)


def sample_scenes(n: int, seed: int, split: str = "any") -> list[Scene]:
    """``n`` seeded scenes. ``split``: "train" (never a held-out caption), "held_out" (only those), "any"."""
    rng = np.random.default_rng(seed)
    held = sorted(held_out_combinations())
    pool = {
        "any": all_attribute_combinations(),
        "train": [c for c in all_attribute_combinations() if c not in set(held)],
        "held_out": held,
    }[split]
    return [sample_scene(rng, pool[int(rng.integers(len(pool)))]) for _ in range(n)]


# --- the flow model's world: larger scenes on a striped background ---------------------------------------------
FLOW_SIZE = 48
"""Side of the flow model's scenes (``shapes-flow``): the same geometry as :data:`SIZE` scaled by 48 / 32."""
STRIPE_PERIOD = (5.0, 10.0)
"""Period range (pixels of a 48x48 scene) of the background stripes."""
STRIPE_AMPLITUDE = (14.0, 28.0)
"""Amplitude range (0-255 levels, grey: added to all three channels) of the background stripes."""


@dataclass(frozen=True)
class StripedScene(Scene):
    """A scene of the flow model's world: :class:`Scene`'s shape and captions (the same words, sizes, colours and
    held-out combinations; geometry in the 32-pixel frame, rendered at :data:`FLOW_SIZE`), on a background striped
    by a grey sinusoid ``amplitude * sin(2 pi (x cos(angle) + y sin(angle)) / period + phase)`` (pixels of the
    rendered image). The stripes are not in the caption: like position and radius, an inversion must recover them,
    which is what makes reconstruction hard on this world. ``edited`` keeps them (the ground truth of an edit)."""

    period: float = 6.0
    angle: float = 0.0
    phase: float = 0.0
    amplitude: float = 20.0


def stripes(scene: StripedScene, size: int = FLOW_SIZE) -> np.ndarray:
    """The background's grey offset, a ``(size, size)`` float array (0-255 levels)."""
    c = np.arange(size, dtype=np.float64) + 0.5
    u = c[None, :] * math.cos(scene.angle) + c[:, None] * math.sin(scene.angle)
    return scene.amplitude * np.sin(2 * math.pi * u / scene.period + scene.phase)


def render_striped(scene: StripedScene, size: int = FLOW_SIZE) -> np.ndarray:
    """A :class:`StripedScene` as a ``(size, size, 3)`` uint8 RGB image: the shape (plain, anti-aliased, its geometry
    scaled by size / 32) over the striped background."""
    k = size / SIZE
    alpha = coverage(scene.shape, scene.cx * k, scene.cy * k, scene.r * k, size=size)[..., None]
    fg = np.asarray(COLOURS[scene.colour], dtype=np.float64)
    bg = np.asarray(COLOURS[scene.background], dtype=np.float64) + stripes(scene, size)[..., None]
    return np.clip(np.round(bg + alpha * (fg - bg)), 0, 255).astype(np.uint8)


def sample_striped_scenes(n: int, seed: int, split: str = "any") -> list[StripedScene]:
    """``n`` seeded striped scenes (the flow model's world): :func:`sample_scenes`'s scenes (same seed, same
    captions and geometry), each given stripes from a second generator seeded alike."""
    rng = np.random.default_rng([seed, 48])
    out = []
    for s in sample_scenes(n, seed, split):
        period = float(rng.uniform(*STRIPE_PERIOD))
        angle = float(rng.uniform(0, math.pi))
        phase = float(rng.uniform(0, 2 * math.pi))
        amplitude = float(rng.uniform(*STRIPE_AMPLITUDE))
        out.append(StripedScene(**{f: getattr(s, f) for f in ("size", "colour", "shape", "background", "cx", "cy", "r")},
                                period=period, angle=angle, phase=phase, amplitude=amplitude))
    return out


WORLDS = {"unet": (sample_scenes, render, SIZE), "flow": (sample_striped_scenes, render_striped, FLOW_SIZE)}
"""name -> (sample_scenes(n, seed, split), render(scene), side in pixels): the U-Net model's 32-pixel world and
the flow model's striped 48-pixel one (the benchmarks' ``--world``)."""
