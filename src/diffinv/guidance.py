"""Classifier-free guidance and proximal guidance (ProxNPI), pure torch.

Shapes: noise predictions are (B, C, H, W).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import check_at_least, check_finite, check_fraction


def cfg(eps_uncond: Tensor, eps_cond: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance, NPI eq. 1: eps_u + w (eps_c - eps_u)."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def cfg_eps(eps_fn, z: Tensor, t: Tensor, cond: Tensor, uncond: Tensor, guidance_scale: float) -> Tensor:
    """The CFG noise prediction (NPI eq. 1) of latents z (B, ...) with both branches in one call of
    ``eps_fn(z, t, emb)``: rows [0, B) conditional, [B, 2B) unconditional."""
    B = z.shape[0]
    both = eps_fn(torch.cat([z, z]), t, torch.cat([cond, uncond]))
    return cfg(both[B:], both[:B], guidance_scale)


def prox_l1(x: Tensor, lam: Tensor | float) -> Tensor:
    """Soft thresholding, the proximal operator of lam * ||.||_1 (ProxNPI eq. 8)."""
    return torch.sign(x) * torch.clamp(x.abs() - lam, min=0)


def prox_l0(x: Tensor, lam: Tensor | float) -> Tensor:
    """Hard thresholding, the proximal operator of lam * ||.||_0 (ProxNPI eq. 9): keep x where |x| > sqrt(2 lam)."""
    lam = torch.as_tensor(lam, dtype=x.dtype, device=x.device)
    return torch.where(x.abs() > (2 * lam).sqrt(), x, torch.zeros_like(x))


def prox_soft_authors(x: Tensor, tau: Tensor | float) -> Tensor:
    """What the ProxNPI authors' code calls 'l0': x - clamp(x, -tau, tau), a *soft* threshold (numerically eq. 8
    at lambda = tau), not the hard threshold of eq. 9."""
    tau = torch.as_tensor(tau, dtype=x.dtype, device=x.device)
    return x - torch.maximum(torch.minimum(x, tau), -tau)


def prox_double_shrink_authors(x: Tensor, tau: Tensor | float) -> Tensor:
    """What the ProxNPI authors' code calls 'l1': the soft threshold s, then s - tau where s > 0, then + tau where
    the result is < 0, in that order. So x - 2 tau for x >= 2 tau, x - tau for tau < x < 2 tau (a jump from tau to
    0 at 2 tau), x + 2 tau for x < -tau (a sign flip for -2 tau < x < -tau), 0 in between. Neither eq. 8 nor
    eq. 9; kept only to reproduce the published numbers."""
    s = prox_soft_authors(x, tau)
    tau = torch.as_tensor(tau, dtype=x.dtype, device=x.device)
    s = torch.where(s > 0, s - tau, s)
    return torch.where(s < 0, s + tau, s)


ProxOperator = Literal["l0", "l1", "authors_l0", "authors_l1"]


def apply_prox(delta: Tensor, tau: Tensor, prox: ProxOperator) -> Tensor:
    """The proximal operator ``prox`` on the guidance delta at threshold tau (broadcast over delta)."""
    if prox == "l0":
        return prox_l0(delta, tau * tau / 2)  # eq. 9 keeps |x| > sqrt(2 lambda) = tau
    if prox == "l1":
        return prox_l1(delta, tau)  # eq. 8 at lambda = tau
    if prox == "authors_l0":
        return prox_soft_authors(delta, tau)
    if prox == "authors_l1":
        return prox_double_shrink_authors(delta, tau)
    raise ValueError(f"prox must be one of l0, l1, authors_l0, authors_l1; got {prox!r}")


def quantile_threshold(delta: Tensor, q: float, groups: Tensor) -> Tensor:
    """Per-row threshold tau = quantile(|delta|, q) over the rows of each group, shaped (B, 1, 1, 1).

    ``groups`` (B,) labels rows that share one threshold: a distinct label per row is ProxNPI Alg. 1 (each
    target's own delta); one label per item reproduces the authors' code, whose batch is an item's source row and
    its target. q = 0 means no thresholding at all (tau = 0, which is plain NPI).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    B = delta.shape[0]
    if q == 0.0:
        return torch.zeros(B, 1, 1, 1, dtype=delta.dtype, device=delta.device)
    absd = delta.abs().float().flatten(1)
    if len(torch.unique(groups)) == B:  # one row per group: one quantile per row, computed together
        return torch.quantile(absd, q, dim=1).to(delta.dtype).view(-1, 1, 1, 1)
    tau = torch.zeros(B, dtype=delta.dtype, device=delta.device)
    for g in torch.unique(groups):
        rows = groups == g
        tau[rows] = torch.quantile(absd[rows].flatten(), q).to(delta.dtype)
    return tau.view(-1, 1, 1, 1)


@dataclass
class ProximalGuidance:
    """Proximal guidance of ProxNPI (Han et al. 2023, eq. 7-9 and Algorithm 1, plus the poster's inversion guidance)."""

    prox: ProxOperator = "l0"
    """Proximal operator on the guidance delta eps_tar - eps_src, thresholding |delta| at tau: 'l0' hard threshold
    (eq. 9, lambda = tau^2 / 2), 'l1' soft threshold (eq. 8). The authors' released code differs from both:
    'authors_l0' is its 'l0' (a soft threshold: x - clamp(x, -tau, tau)), 'authors_l1' its 'l1' (tau subtracted
    again, asymmetrically: see ``prox_double_shrink_authors``). Use those with mask_from 'shrunk' and scope 'item'
    to reproduce the published numbers (configs/reference/proxnpi.yaml)."""
    quantile: float = 0.7
    """tau = this quantile of |eps_tar - eps_src|, per step; 0 keeps everything (plain NPI), 1 drops everything
    (plain DDIM reconstruction)."""
    scope: Literal["row", "item"] = "row"
    """Entries over which the quantile is taken: 'row' = that target's own delta (Alg. 1; an edit never depends
    on the other prompts or items of its batch); 'item' = the item's reconstruction row (delta = 0 for NPI) and
    all its target rows together, as the authors' code does with its batch of source and target (so q = 0.7
    zeroes about 40% of a single target's entries, and an edit changes when another target joins its item)."""
    mask_from: Literal["delta", "shrunk"] = "delta"
    """The edited region: 'delta' = |eps_tar - eps_src| > tau (Alg. 1 line 7); 'shrunk' = |prox(delta)| > tau, as
    the authors' code takes it from the already-thresholded delta (for their soft 'l0': |delta| > 2 tau)."""
    mask_dilation: int = 1
    """Radius (latent pixels) of the max-pool that grows the edited region before the guidance masks are taken from
    it (the reference uses 1-2; 0 = no dilation)."""
    reconstruction_guidance: bool = True
    """Alg. 1 lines 9-10: pull the predicted x0 towards the source latent z0 in the unedited region."""
    inversion_guidance: bool = True
    """Poster: pull z_{t-1} towards the inversion trajectory z*_{t-1} in the unedited region."""
    step_size: float = 0.1
    """eta, the step of both guidances (1 = replace the unedited region outright)."""
    until_timestep: int = 400
    """Both guidances act only while the UNet timestep t < this (T_rec)."""

    def __post_init__(self) -> None:
        """Refuse settings that silently make the guidance a no-op or nonsense, named as options."""
        check_finite(dataclasses.asdict(self), prefix="proximal.")
        check_fraction("proximal.quantile", self.quantile, "0 keeps everything, 1 drops everything")
        check_at_least("proximal.mask_dilation", self.mask_dilation, 0, hint="0: no dilation")
        check_fraction("proximal.step_size", self.step_size, "1 replaces the unedited region outright")
        check_at_least("proximal.until_timestep", self.until_timestep, 0)


def proximal_eps(
    eps_src: Tensor, eps_tar: Tensor, guidance_scale: float, config: ProximalGuidance, groups: Tensor,
    edit_rows: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """ProxNPI Alg. 1 lines 6-7: eps~ = eps_src + w prox(eps_tar - eps_src), and the unedited-region mask M.

    M is 1 where |delta| <= tau (after growing the edited region by ``mask_dilation``), 0 elsewhere.
    ``edit_rows`` (B,) bool marks the target (edit) rows; under scope 'row' the other rows (reconstructions) are
    plain CFG, eps_src + w (eps_tar - eps_src), with M = 1 everywhere: the proximal operator acts on an edit's
    delta only (for NPI's reconstruction row delta is 0 and both readings agree; for a null-text record's
    reconstruction row it keeps the record's own CFG reconstruction). None: every row is an edit row.
    """
    delta = eps_tar - eps_src
    B = delta.shape[0]
    if config.scope == "row":
        groups = torch.arange(B, device=delta.device)
    tau = quantile_threshold(delta, config.quantile, groups)
    shrunk = apply_prox(delta, tau, config.prox)
    edited = ((shrunk if config.mask_from == "shrunk" else delta).abs() > tau).to(delta.dtype)
    if config.mask_dilation > 0:
        k = 2 * config.mask_dilation + 1
        edited = F.max_pool2d(edited, kernel_size=k, stride=1, padding=config.mask_dilation)
    if edit_rows is not None and config.scope == "row":
        is_edit = edit_rows.to(delta.device).view(-1, 1, 1, 1)
        shrunk = torch.where(is_edit, shrunk, delta)
        edited = torch.where(is_edit, edited, torch.zeros_like(edited))
    return eps_src + guidance_scale * shrunk, 1 - edited


# --- guidance rules: what the sampler asks of a guidance (it knows no more of any method) ----------------------


class GuidanceRule(Protocol):
    """One sampling run's guidance: how a step's two noise predictions become one, and the corrections of its
    predicted x0 and of its next latent. ``mask`` is what :meth:`combine` returned beside the prediction (ProxNPI's
    unedited region; None for CFG); ``t`` the UNet timestep and ``k`` the level the step leaves."""

    def combine(self, eps_uncond: Tensor, eps_cond: Tensor) -> tuple[Tensor, Tensor | None]: ...

    def correct_x0(self, x0: Tensor, t: int, k: int, mask: Tensor | None) -> Tensor: ...

    def correct_z(self, z: Tensor, t: int, k: int, mask: Tensor | None) -> Tensor: ...

    @property
    def corrects(self) -> bool:
        """Whether :meth:`correct_x0` or :meth:`correct_z` may change anything (a step rule that has no x0 or no
        DDIM latent to correct, the flow solvers', refuses such a rule rather than dropping its corrections)."""


def row_scale(scale: float | Tensor, like: Tensor) -> float | Tensor:
    """A guidance scale as a number, or (B,) one per row shaped (B, 1, 1, 1) for latents like ``like``."""
    if isinstance(scale, Tensor):
        return scale.to(device=like.device, dtype=like.dtype).view(-1, 1, 1, 1)
    return scale


@dataclass
class ClassifierFree:
    """Classifier-free guidance (NPI eq. 1) at ``scale``: a number, or (B, 1, 1, 1) one per row."""

    scale: float | Tensor

    def combine(self, eps_uncond: Tensor, eps_cond: Tensor) -> tuple[Tensor, Tensor | None]:
        return cfg(eps_uncond, eps_cond, self.scale), None

    def correct_x0(self, x0: Tensor, t: int, k: int, mask: Tensor | None) -> Tensor:
        return x0

    def correct_z(self, z: Tensor, t: int, k: int, mask: Tensor | None) -> Tensor:
        return z

    corrects = False


@dataclass
class Proximal:
    """ProxNPI's guidance of one run (Alg. 1): the unconditional branch plays eps_src and the conditional one
    eps_tar; reconstruction and inversion guidance pull the unedited region back while t < ``until_timestep``.

    Args:
        config: The operator, threshold and guidances.
        scale: w of eps_src + w prox(eps_tar - eps_src): a number or (B, 1, 1, 1).
        groups: (B,) the item of each row (rows that share one threshold under scope 'item').
        edit_rows: (B,) bool: the target rows, the only ones the operator acts on under scope 'row'; None: all.
        z0: (B, C, h, w) source latents (reconstruction guidance).
        trajectory: (N + 1, B, C, h, w) inversion trajectories (inversion guidance).
        unguided_rows: (B,) bool: rows the guidances leave alone (mask 0: all edited), e.g. the reconstruction row of
            a record made without them; None: none.
    """

    config: ProximalGuidance
    scale: float | Tensor
    groups: Tensor
    edit_rows: Tensor | None = None
    z0: Tensor | None = None
    trajectory: Tensor | None = None
    unguided_rows: Tensor | None = None

    def __post_init__(self):
        if self.config.reconstruction_guidance and self.z0 is None:
            raise ValueError("reconstruction guidance needs the source latents z0")
        if self.config.inversion_guidance and self.trajectory is None:
            raise ValueError("inversion guidance needs the inversion trajectory")

    def combine(self, eps_uncond: Tensor, eps_cond: Tensor) -> tuple[Tensor, Tensor | None]:
        eps, keep = proximal_eps(eps_uncond, eps_cond, self.scale, self.config, self.groups, self.edit_rows)
        if self.unguided_rows is not None and bool(self.unguided_rows.any()):
            keep = torch.where(self.unguided_rows.to(keep.device).view(-1, 1, 1, 1), torch.zeros_like(keep), keep)
        return eps, keep

    def _guides(self, t: int) -> bool:
        return t < self.config.until_timestep

    @property
    def corrects(self) -> bool:
        return bool(self.config.reconstruction_guidance or self.config.inversion_guidance)

    def correct_x0(self, x0: Tensor, t: int, k: int, mask: Tensor | None) -> Tensor:
        if self.config.reconstruction_guidance and self._guides(t):
            return x0 - self.config.step_size * mask * (x0 - self.z0)  # Alg. 1 line 10
        return x0

    def correct_z(self, z: Tensor, t: int, k: int, mask: Tensor | None) -> Tensor:
        if self.config.inversion_guidance and self._guides(t):
            return z - self.config.step_size * mask * (z - self.trajectory[k - 1])  # poster: inversion guidance
        return z
