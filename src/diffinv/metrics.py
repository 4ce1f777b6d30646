"""Image metrics, per image, in pixel space: RGB in [0, 1], data range 1 (torchmetrics).

* ``psnr``: 10 log10(1 / MSE) over all pixels and channels; identical images give +inf (written "inf").
* ``ssim``: 11x11 Gaussian window, sigma 1.5, averaged over pixels and channels (smaller windows for images
  under 11 pixels).
* ``mse``: mean squared error over pixels and channels.
* ``lpips_alex`` / ``lpips_vgg``: torchmetrics' LPIPS on inputs scaled to [-1, 1]; needs torchvision and the
  network weights (``pip install 'diffinv[metrics]'``), else "unavailable".
* ``clip_score``: torchmetrics' CLIPScore (100 x cosine of image and text embeddings, floored at 0) with a CLIP
  model from the hub cache or a local folder, else "unavailable".
* PIE-Bench's background preservation (``*_unedited``): as PIE-Bench computes it, both images multiplied by the
  unedited mask (1 - edit mask, the mask resized to the image with nearest neighbours), then the metric over
  the whole image; ``clip_score_edited``: CLIP score of the edited image times the edit mask.
"""

from __future__ import annotations

import math
import sys
from functools import lru_cache

import torch
from torch import Tensor

UNAVAILABLE = "unavailable"


def mse(pred: Tensor, target: Tensor) -> float:
    return float(torch.mean((pred.double() - target.double()) ** 2))


def psnr(pred: Tensor, target: Tensor) -> float:
    """PSNR in dB of two (3, H, W) images in [0, 1] (data range 1); identical images give +inf."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    if mse(pred, target) == 0:
        return math.inf
    return float(peak_signal_noise_ratio(pred[None].float(), target[None].float(), data_range=1.0))


def ssim(pred: Tensor, target: Tensor) -> float:
    """SSIM of two (3, H, W) images in [0, 1] (see the module docstring)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    k = min(11, *(s if s % 2 else s - 1 for s in pred.shape[-2:]))
    return float(structural_similarity_index_measure(pred[None].float(), target[None].float(), data_range=1.0,
                                                     kernel_size=k, sigma=1.5 * k / 11))


def _tell_once(key: str, message: str) -> None:
    if key not in _told:
        _told.add(key)
        print(f"diffinv: {message}", file=sys.stderr)


_told: set[str] = set()


@lru_cache(maxsize=None)
def _lpips(net: str):
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        return LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True).eval()
    except Exception as e:  # noqa: BLE001 - missing torchvision/lpips or weights: reported once, column unavailable
        _tell_once(f"lpips-{net}", f"LPIPS ({net}) is unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                   "enable it with `pip install 'diffinv[metrics]'` where torchvision works and its weights can be "
                   "downloaded once")
        return None


def lpips(pred: Tensor, target: Tensor, net: str = "alex") -> float | str:
    metric = _lpips(net)
    if metric is None:
        return UNAVAILABLE
    with torch.no_grad():
        return float(metric(pred[None].float().clamp(0, 1), target[None].float().clamp(0, 1)))


@lru_cache(maxsize=None)
def _clip(model: str):
    try:
        from torchmetrics.multimodal.clip_score import CLIPScore

        return CLIPScore(model_name_or_path=model).eval()
    except Exception as e:  # noqa: BLE001
        _tell_once(f"clip-{model}", f"CLIP score is unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                   f"download {model} where there is network (`hf download {model}`) and pass its folder as "
                   "--writer.clip_model")
        return None


def clip_score(image: Tensor, text: str, model: str) -> float | str:
    metric = _clip(model)
    if metric is None:
        return UNAVAILABLE
    with torch.no_grad():
        return float(metric((image.clamp(0, 1) * 255).to(torch.uint8)[None], [text]))


def masked(image: Tensor, keep: Tensor) -> Tensor:
    """The image times a (H, W) 0/1 mask."""
    return image * keep.to(image.dtype)[None]
