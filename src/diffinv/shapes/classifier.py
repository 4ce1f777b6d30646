"""Reads a shapes-world scene's attributes back from its pixels, by rules (no learning).

1. background = palette colour nearest to the median of the border pixels;
2. shape colour = palette colour (not the background) that best explains the pixels as a blend
   ``bg + alpha * (fg - bg)``; the blend weights, with a dead zone against noise, are the coverage map ``alpha``;
3. shape = the template (circle, square, triangle) rendered at the coverage's centroid with the coverage's
   area that is closest to ``alpha``;
4. size = small/big from the radius that area implies for that shape (threshold between the two ranges).
"""

from __future__ import annotations

import math

import numpy as np

from .world import COLOURS, RADIUS_RANGE, SHAPES, SQUARE_HALF_SIDE, TRIANGLE_CIRCUMRADIUS, coverage

_PALETTE = {name: np.asarray(rgb, dtype=np.float64) for name, rgb in COLOURS.items()}
_AREA_PER_R2 = {
    "circle": math.pi,
    "square": (2 * SQUARE_HALF_SIDE) ** 2,
    "triangle": 3 * math.sqrt(3) / 4 * TRIANGLE_CIRCUMRADIUS**2,
}
_SIZE_THRESHOLD = (RADIUS_RANGE["small"][1] + RADIUS_RANGE["big"][0]) / 2
_DEAD_ZONE = 0.2


def _nearest_colour(rgb: np.ndarray, exclude: str | None = None) -> str:
    return min((n for n in _PALETTE if n != exclude), key=lambda n: float(np.sum((_PALETTE[n] - rgb) ** 2)))


def _blend_alpha(img: np.ndarray, bg: np.ndarray, fg: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-pixel blend weight of ``fg`` over ``bg`` (clipped to [0, 1]) and the residual of that fit."""
    d = fg - bg
    alpha = np.clip(((img - bg) @ d) / float(d @ d), 0.0, 1.0)
    residual = float(np.sum((img - bg - alpha[..., None] * d) ** 2))
    return alpha, residual


def classify(image: np.ndarray) -> dict[str, str]:
    """Attributes ``{size, colour, shape, background}`` of a ``(H, W, 3)`` RGB image (uint8 or 0-255 float)."""
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    background = _nearest_colour(np.median(border, axis=0))
    bg = _PALETTE[background]
    fits = {name: _blend_alpha(img, bg, _PALETTE[name]) for name in _PALETTE if name != background}
    colour = min(fits, key=lambda n: fits[n][1])
    # A dead zone of 0.2 at both ends: noise on the background (clipped at 0, so biased upwards) and on the
    # shape no longer inflates the area; symmetric, so anti-aliased edges keep their mean coverage.
    alpha = np.clip((fits[colour][0] - _DEAD_ZONE) / (1 - 2 * _DEAD_ZONE), 0.0, 1.0)
    area = float(alpha.sum())
    if area < 1.0:  # nothing drawn: guess the smallest shape at the centre
        return {"size": "small", "colour": colour, "shape": "circle", "background": background}
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    cx, cy = float((alpha * xs).sum() / area), float((alpha * ys).sum() / area)
    errors = {}
    for shape in SHAPES:
        r = math.sqrt(area / _AREA_PER_R2[shape])
        # The triangle's centroid is its circumcentre (equilateral), so centring the template on the
        # coverage centroid is right for all three shapes.
        errors[shape] = float(np.sum((coverage(shape, cx, cy, r, size=w) - alpha) ** 2)) if h == w else 0.0
    shape = min(errors, key=errors.get)
    radius = math.sqrt(area / _AREA_PER_R2[shape]) * 32 / w
    size = "small" if radius < _SIZE_THRESHOLD else "big"
    return {"size": size, "colour": colour, "shape": shape, "background": background}


def attribute_accuracy(predicted: list[dict[str, str]], truth: list[dict[str, str]]) -> dict[str, float]:
    """Fraction correct per attribute, on big shapes only for ``shape_big``, and on all four (``all``)."""
    n = len(truth)
    if n == 0 or len(predicted) != n:
        raise ValueError(f"need equal, non-empty lists (got {len(predicted)} predictions, {n} truths)")
    out = {k: sum(p[k] == t[k] for p, t in zip(predicted, truth)) / n for k in ("size", "colour", "shape", "background")}
    big = [(p, t) for p, t in zip(predicted, truth) if t["size"] == "big"]
    out["shape_big"] = sum(p["shape"] == t["shape"] for p, t in big) / len(big) if big else float("nan")
    out["all"] = sum(p == t for p, t in zip(predicted, truth)) / n
    return out
