"""Image metrics, per image, in pixel space on [0, 1] RGB (torchmetrics)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def psnr(pred: Tensor, target: Tensor) -> float:
    """PSNR in dB of two (3, H, W) images in [0, 1] (data range 1); identical images give +inf."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    mse = torch.mean((pred.double() - target.double()) ** 2)
    if mse == 0:
        return math.inf
    return float(peak_signal_noise_ratio(pred[None].float(), target[None].float(), data_range=1.0))


def ssim(pred: Tensor, target: Tensor) -> float:
    """SSIM of two (3, H, W) images in [0, 1]: 11x11 Gaussian window (sigma 1.5), averaged over pixels and
    channels; images smaller than the window use the largest odd window that fits."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    k = min(11, *(s if s % 2 else s - 1 for s in pred.shape[-2:]))
    return float(structural_similarity_index_measure(pred[None].float(), target[None].float(), data_range=1.0,
                                                     kernel_size=k, sigma=1.5 * k / 11))
