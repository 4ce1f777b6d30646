"""Reverse DDIM from inverted latents under a guidance rule (classifier-free, proximal, ...), batched over rows.

A *row* is one image to produce: an item's reconstruction (condition = its source prompt) or one of its edits
(condition = a target prompt). All rows advance together, one UNet call per step for the conditional and the
unconditional branches of every row (rows whose unconditional embedding *is* their condition, like NPI's
reconstruction row, are evaluated once).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..backbone import Backbone
from ..ddim import Schedule, ddim_mean, ddim_sigma, ddim_step, from_x0, predict_x0
from ..guidance import ClassifierFree, GuidanceRule, row_scale


def sample(
    backbone: Backbone,
    schedule: Schedule,
    z_T: Tensor,
    cond: Tensor,
    uncond: Tensor,
    guidance: GuidanceRule | float | Tensor,
    uncond_is_cond: Tensor | None = None,
    controller=None,
    start_level: int | None = None,
    eta: float = 0.0,
    step_noise: Tensor | None = None,
    snap_rows: Tensor | None = None,
    trajectory: Tensor | None = None,
    coupled: tuple[Tensor, float] | None = None,
    observe: Callable[[int, Tensor, Tensor | None], None] | None = None,
) -> Tensor:
    """Latents z_0 (B, C, h, w) reached from z_T by N reverse DDIM steps (NPI eq. 2).

    Args:
        z_T: (B, C, h, w) start latents.
        cond: (B, L, D) condition embedding of each row.
        uncond: (B, L, D) unconditional embedding of each row, or (N, B, L, D) one per step (index k-1 for the
            step from level k), as null-text inversion learns.
        guidance: How each step combines the two branches and corrects its x0 and latent
            (:class:`diffinv.guidance.GuidanceRule`: classifier-free, ProxNPI's proximal guidance, ...); a number
            or a (B,) tensor is classifier-free guidance (eq. 1) at that scale, one per row.
        uncond_is_cond: (B,) bool: rows whose unconditional branch equals the conditional one (computed once).
        controller: Prompt-to-Prompt's :class:`AttentionController`, already installed on the UNet; told the
            step index, and given the latents after each step (local blend).
        start_level: Start at this level instead of N (SDEdit): ``z_T`` is then the latent of that level.
        eta: Stochastic DDIM (DDIM paper eq. 12/16) with the given noise: the step from level k moves to the
            mean sqrt(a) x0 + sqrt(1 - a - sigma_k^2) eps, plus ``step_noise[k-1]``.
        step_noise: (N, B, C, h, w) the sigma_k n_k added after each step (CycleDiffusion's latent code); None:
            deterministic DDIM (eta is then ignored).
        snap_rows: (B,) bool: rows put back onto their ``trajectory`` after every step (DirectInversion's source
            branch: the step's result plus z*_{k-1} minus it), before local blend reads them.
        trajectory: (N + 1, B, C, h, w) inversion trajectories, for ``snap_rows``.
        coupled: (y_T (B, C, h, w), p): EDICT's coupled sampling (Wallace et al. eq. 14) from the pair (z_T, y_T)
            with mixing weight p; two guided UNet calls per step; returns the x sequence's z_0.
        observe: Called after each step with the level k it left, the new latents and the guidance's mask
            (ProxNPI's unedited region (B, C, h, w); None under CFG): progress reports and mask display; it
            cannot change the result.
    """
    B = z_T.shape[0]
    n = schedule.num_steps
    rule = ClassifierFree(row_scale(guidance, z_T)) if isinstance(guidance, (int, float, Tensor)) else guidance
    per_step = uncond.dim() == 4
    if per_step and uncond.shape[0] != n:
        raise ValueError(f"per-step unconditional embeddings cover {uncond.shape[0]} steps, the run has {n}")
    need_u = torch.ones(B, dtype=torch.bool, device=z_T.device) if uncond_is_cond is None else ~uncond_is_cond.to(z_T.device)
    if controller is not None:
        controller.set_unconditional_rows(need_u)
    snap = None if snap_rows is None or not bool(snap_rows.any()) else snap_rows.to(z_T.device).view(-1, 1, 1, 1)
    if snap is not None and trajectory is None:
        raise ValueError("snapping rows onto the inversion trajectory needs the trajectory")

    def guided(z: Tensor, k: int) -> tuple[Tensor, Tensor | None]:
        """One UNet call (conditional branch of every row, unconditional branch of the rows that need it), then
        the guidance rule (CFG eq. 1, or ProxNPI Alg. 1 lines 6-7)."""
        t = schedule.timesteps[k - 1]
        u = uncond[k - 1] if per_step else uncond
        eps_all = backbone.eps(torch.cat([z, z[need_u]]), t, torch.cat([cond, u[need_u]]))
        eps_c = eps_all[:B]
        eps_u = eps_c.clone()
        eps_u[need_u] = eps_all[B:]
        return rule.combine(eps_u, eps_c)

    z = z_T
    y = None if coupled is None else coupled[0]
    top = n if start_level is None else start_level
    for k in range(top, 0, -1):  # level k -> k-1
        if controller is not None:
            controller.step = n - k
        t = schedule.timesteps[k - 1]
        a_t, a_prev = schedule.alphas[k].to(z.dtype), schedule.alphas[k - 1].to(z.dtype)
        if coupled is not None:  # EDICT eq. 14: each sequence steps with the other's prediction, then mixing
            p = coupled[1]
            x_inter = ddim_step(z, guided(y, k)[0], a_t, a_prev)
            y_inter = ddim_step(y, guided(x_inter, k)[0], a_t, a_prev)
            z = p * x_inter + (1 - p) * y_inter
            y = p * y_inter + (1 - p) * z
            if controller is not None:
                z, y = controller.after_step(z, n - k), controller.after_step(y, n - k)
            if observe is not None:
                observe(k, z, None)
            continue
        eps, mask = guided(z, k)
        # DDIM step via the predicted x0 (Alg. 1 lines 8 and 12), with the rule's corrections (ProxNPI's
        # reconstruction guidance on x0, its inversion guidance on the new latent).
        x0 = rule.correct_x0(predict_x0(z, eps, a_t), int(t), k, mask)
        if step_noise is None:
            z = from_x0(x0, eps, a_prev)
        else:  # stochastic DDIM with the given noise (CycleDiffusion, DDPM inversion)
            sigma = ddim_sigma(schedule.alphas[k], schedule.alphas[k - 1], eta)
            z = ddim_mean(x0, eps, a_prev, sigma) + step_noise[k - 1]
        z = rule.correct_z(z, int(t), k, mask)
        if snap is not None:
            z = torch.where(snap, trajectory[k - 1], z)  # DirectInversion: z + (z*_{k-1} - z), exactly
        if controller is not None:
            z = controller.after_step(z, n - k)  # Prompt-to-Prompt local blend
        if observe is not None:
            observe(k, z, mask)
    return z
