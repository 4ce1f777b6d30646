"""Image files in, model-sized arrays out: reading any image as upright 8-bit RGB, fitting it to a model, and
turning it into a tensor.

Images are read once, up front (so a bad file stops the run before anything is written), with EXIF orientation
applied and any mode converted to 8-bit RGB (grayscale, palette, CMYK, 16-bit; transparency is composited on
white). Resizing to the model happens in the method, which knows the model: the shorter side is scaled to
``resolution`` (default: the model's native size), then each side is centre-cropped down to a multiple of the
VAE's downsampling factor.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import DiffinvError


def load_image(path: str | Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, upright per its EXIF orientation."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            _warn_if_animated(im, path)
            im = ImageOps.exif_transpose(im)
    except FileNotFoundError:
        raise DiffinvError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DiffinvError(f"cannot read image {path}: not an image file or corrupt ({e})") from None
    return rgb_array(im, f"image {path}")


def rgb_array(im, what: str) -> np.ndarray:
    """A PIL image as (H, W, 3) uint8 RGB: 16-bit and float greys scaled to 8 bits, transparency over white,
    palettes and other modes converted; an empty one refused naming ``what``."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / hi * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    im = im.convert("RGB")
    if min(im.size) < 1:
        raise DiffinvError(f"{what} is empty ({im.size[0]}x{im.size[1]})")
    return np.asarray(im, dtype=np.uint8).copy()


def _warn_if_animated(im, path: Path) -> None:
    """One warning naming an image file of several frames (animated GIF, WebP, APNG; multi-page TIFF): only its
    first frame is inverted."""
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        kind = "animated" if getattr(im, "is_animated", False) else "multi-page"
        warnings.warn(f"image {path} is {kind} ({frames} frames): only its first frame is used; save the frame you "
                      "mean as a still image to choose another")


def fit_to_model(image: np.ndarray, resolution: int, factor: int, square: bool = False) -> np.ndarray:
    """Scale the shorter side to ``resolution``, then centre-crop each side to a multiple of ``factor``.

    ``square`` first centre-crops to a square (the NPI paper's COCO protocol).
    """
    from PIL import Image

    h, w = image.shape[:2]
    if square and h != w:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        image, h, w = image[top : top + s, left : left + s], s, s
    scale = resolution / min(h, w)
    nh, nw = max(factor, round(h * scale)), max(factor, round(w * scale))
    if (nh, nw) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.LANCZOS))
    ch, cw = nh - nh % factor, nw - nw % factor
    top, left = (nh - ch) // 2, (nw - cw) // 2
    return np.ascontiguousarray(image[top : top + ch, left : left + cw])


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255
