"""The sampling loop: rows of latents from level ``top`` down to 0 under a guidance rule, a step rule and hooks.

A *row* is one image to produce: an item's reconstruction (condition = its source prompt) or one of its edits
(condition = a target prompt). All rows advance together, one denoiser call per step for the conditional and the
unconditional branches of every row (rows whose unconditional embedding *is* their condition, like NPI's
reconstruction row, are evaluated once). How a step moves the latents (deterministic, stochastic or coupled DDIM)
and what happens after it (snapping, local blend, progress, the finiteness check) are objects of
:mod:`diffinv.steps`: the loop knows no method, no editor and no family.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..backbone import Backbone
from ..ddim import Schedule
from ..guidance import ClassifierFree, GuidanceRule, row_scale
from ..steps import DeterministicStep, Step, StepHook


def sample(
    backbone: Backbone,
    schedule: Schedule,
    z_T: Tensor,
    cond: Tensor,
    uncond: Tensor,
    guidance: GuidanceRule | float | Tensor,
    step: Step | None = None,
    hooks: Sequence[StepHook] = (),
    uncond_is_cond: Tensor | None = None,
    start_level: int | None = None,
) -> Tensor:
    """Latents z_0 (B, C, h, w) reached from z_T by reverse steps (NPI eq. 2 by default).

    Args:
        z_T: (B, C, h, w) start latents (of level N, or of ``start_level``).
        cond: (B, L, D) condition embedding of each row.
        uncond: (B, L, D) unconditional embedding of each row, or (N, B, L, D) one per step (index k-1 for the
            step from level k), as null-text inversion learns.
        guidance: How each step combines the two branches and corrects its x0 and latent
            (:class:`diffinv.guidance.GuidanceRule`: classifier-free, ProxNPI's proximal guidance, ...); a number
            or a (B,) tensor is classifier-free guidance (eq. 1) at that scale, one per row.
        step: The step rule (:mod:`diffinv.steps`); None: deterministic DDIM.
        hooks: Called around every step, in order (:class:`diffinv.steps.StepHook`).
        uncond_is_cond: (B,) bool: rows whose unconditional branch equals the conditional one (computed once).
        start_level: Start at this level instead of N (SDEdit, DDPM inversion's skip): ``z_T`` is then the latent
            of that level.
    """
    B = z_T.shape[0]
    n = schedule.num_steps
    rule = ClassifierFree(row_scale(guidance, z_T)) if isinstance(guidance, (int, float, Tensor)) else guidance
    step = DeterministicStep() if step is None else step
    per_step = uncond.dim() == 4
    if per_step and uncond.shape[0] != n:
        raise ValueError(f"per-step unconditional embeddings cover {uncond.shape[0]} steps, the run has {n}")
    need_u = torch.ones(B, dtype=torch.bool, device=z_T.device) if uncond_is_cond is None else ~uncond_is_cond.to(z_T.device)

    pure_noise = {k for k in range(1, n + 1) if float(schedule.alphas[k]) == 0.0}

    def branches(all_rows: Tensor) -> tuple[Tensor, Tensor]:
        """(unconditional, conditional) rows of one batched prediction (a row needing no unconditional branch
        reuses its conditional one)."""
        c = all_rows[:B]
        u = c.clone()
        u[need_u] = all_rows[B:]
        return u, c

    def guided(z: Tensor, k: int, need_x0: bool = False,
               at: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """One denoiser call (conditional branch of every row, unconditional branch of the rows that need it),
        then the guidance rule (CFG eq. 1, or ProxNPI Alg. 1 lines 6-7). At a level of alpha 0 x0 is not a
        function of eps (eps = z there): the model's own x0 of each branch, combined by the same rule (CFG is
        linear in the model output, so this is the guided x0); also wherever ``need_x0`` asks (a step that moves
        another latent with this prediction: EDICT). ``at``: (timestep, alpha) of a point that is no level (RF-Solver's
        and FireFlow's midpoint), z sitting there; step k's embeddings and guidance, the model's own x0."""
        t = schedule.timesteps[k - 1] if at is None else at[0]
        u = uncond[k - 1] if per_step else uncond
        zz, emb = torch.cat([z, z[need_u]]), torch.cat([cond, u[need_u]])
        if at is not None:
            eps_all, x0_all = backbone.predict(zz, t, emb, at[1])
            eps, mask = rule.combine(*branches(eps_all))
            return eps, mask, rule.combine(*branches(x0_all))[0]
        if k not in pure_noise and not need_x0:
            eps, mask = rule.combine(*branches(backbone.eps(zz, t, emb)))
            return eps, mask, None
        eps_all, x0_all = backbone.predict(zz, t, emb)
        eps, mask = rule.combine(*branches(eps_all))
        return eps, mask, rule.combine(*branches(x0_all))[0]

    top = n if start_level is None else start_level
    z = z_T
    step.start(z, top)
    for k in range(top, 0, -1):  # level k -> k-1
        for hook in hooks:
            hook.before(k)
        z, mask = step(z, k, guided, rule, schedule)
        for hook in hooks:
            z = hook.after(z, k, mask, step)
    return z
