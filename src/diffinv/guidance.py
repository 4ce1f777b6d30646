"""Classifier-free guidance and proximal guidance (ProxNPI), pure torch.

Shapes: noise predictions are (B, C, H, W).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def cfg(eps_uncond: Tensor, eps_cond: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance, NPI eq. 1: eps_u + w (eps_c - eps_u)."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def prox_l1(x: Tensor, lam: Tensor | float) -> Tensor:
    """Soft thresholding, the proximal operator of lam * ||.||_1 (ProxNPI eq. 8)."""
    return torch.sign(x) * torch.clamp(x.abs() - lam, min=0)


def prox_l0(x: Tensor, lam: Tensor | float) -> Tensor:
    """Hard thresholding, the proximal operator of lam * ||.||_0 (ProxNPI eq. 9): keep x where |x| > sqrt(2 lam)."""
    lam = torch.as_tensor(lam, dtype=x.dtype, device=x.device)
    return torch.where(x.abs() > (2 * lam).sqrt(), x, torch.zeros_like(x))


def quantile_threshold(delta: Tensor, q: float, groups: Tensor) -> Tensor:
    """Per-row threshold tau = quantile(|delta|, q) over the rows of each group, shaped (B, 1, 1, 1).

    ``groups`` (B,) labels rows that share one threshold: one label per item reproduces the reference (its batch
    is one source row plus that item's target rows); a distinct label per row gives per-sample thresholds.
    q = 0 means no thresholding at all (tau = 0, which is plain NPI).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    tau = torch.zeros(delta.shape[0], dtype=delta.dtype, device=delta.device)
    if q == 0.0:
        return tau.view(-1, 1, 1, 1)
    absd = delta.abs().float()
    for g in torch.unique(groups):
        rows = groups == g
        tau[rows] = torch.quantile(absd[rows].flatten(), q).to(delta.dtype)
    return tau.view(-1, 1, 1, 1)


@dataclass
class ProximalGuidance:
    """Proximal guidance of ProxNPI (Han et al. 2023, eq. 7-9 and Algorithm 1, plus the poster's inversion guidance)."""

    prox: Literal["l0", "l1"] = "l0"
    """Proximal operator on the guidance delta eps_tar - eps_src: 'l0' hard threshold (eq. 9) or 'l1' soft (eq. 8).
    Both threshold |delta| at tau (for 'l0' that is lambda = tau^2 / 2)."""
    quantile: float = 0.7
    """tau = this quantile of |eps_tar - eps_src|, per step; 0 keeps everything (plain NPI), 1 drops everything
    (plain DDIM reconstruction)."""
    scope: Literal["item", "sample"] = "item"
    """Rows sharing one tau: 'item' = an item's source row and all its target rows (what the reference's batch
    holds), 'sample' = each row its own."""
    mask_dilation: int = 1
    """Radius (latent pixels) of the max-pool that grows the edited region |delta| > tau before the guidance masks
    are taken from it (the reference uses 1-2; 0 = no dilation)."""
    reconstruction_guidance: bool = True
    """Alg. 1 lines 9-10: pull the predicted x0 towards the source latent z0 in the unedited region."""
    inversion_guidance: bool = True
    """Poster: pull z_{t-1} towards the inversion trajectory z*_{t-1} in the unedited region."""
    step_size: float = 0.1
    """eta, the step of both guidances (1 = replace the unedited region outright)."""
    until_timestep: int = 400
    """Both guidances act only while the UNet timestep t < this (T_rec)."""


def proximal_eps(
    eps_src: Tensor, eps_tar: Tensor, guidance_scale: float, config: ProximalGuidance, groups: Tensor
) -> tuple[Tensor, Tensor]:
    """ProxNPI Alg. 1 lines 6-7: eps~ = eps_src + w prox(eps_tar - eps_src), and the unedited-region mask M.

    M is 1 where |delta| <= tau (after growing the edited region by ``mask_dilation``), 0 elsewhere.
    """
    delta = eps_tar - eps_src
    tau = quantile_threshold(delta, config.quantile, groups)
    if config.prox == "l1":
        shrunk = prox_l1(delta, tau)
    elif config.prox == "l0":
        shrunk = prox_l0(delta, tau * tau / 2)  # eq. 9 keeps |x| > sqrt(2 lambda) = tau
    else:
        raise ValueError(f"prox must be 'l0' or 'l1', got {config.prox!r}")
    edited = (delta.abs() > tau).to(delta.dtype)
    if config.mask_dilation > 0:
        k = 2 * config.mask_dilation + 1
        edited = F.max_pool2d(edited, kernel_size=k, stride=1, padding=config.mask_dilation)
    return eps_src + guidance_scale * shrunk, 1 - edited
