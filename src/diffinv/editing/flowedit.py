"""FlowEdit (Kulikov et al., ICCV 2025, "FlowEdit: inversion-free text-based editing using pre-trained flow models"):
:func:`flowedit` (the math) and :class:`FlowEdit` (the editor, flow models only). An ODE carries the source image's
latent straight to the edit, driven by the difference of the target and source velocities at noised copies of the
source, with no inversion.

Symbols: s is the flow's sigma (0: the image, 1: noise), levels 0 .. N with sigmas s_0 = 0 < ... < s_N, v = eps - x0
= dx/ds. Paper Alg. 1 (authors' ``FlowEditSD3`` / ``FlowEditFLUX``), the edit running the levels k = n_max .. 1::

    Z_FE = X_src                                                  at level n_max
    for k = n_max .. n_min + 1:
        for j = 1 .. n_avg:   N_kj ~ N(0, I)
            Z_src = (1 - s_k) X_src + s_k N_kj                      the source, noised to level k
            Z_tar = Z_FE + Z_src - X_src                            the edit, noised alike
            V_k  += (V_tar(Z_tar, s_k) - V_src(Z_src, s_k)) / n_avg  each under its own CFG scale
        Z_FE = Z_FE + (s_{k-1} - s_k) V_k
    (n_min > 0: from level n_min, Z_tar = Z_FE + Z_src - X_src with a fresh N, then plain Euler steps with V_tar)

With the target prompt and guidance equal to the source's every difference is 0 and the edit is X_src itself
(tested). The noise N_kj is keyed by (run seed, item id, target prompt, level, draw), as SDEdit's
(:mod:`diffinv.editing.sdedit`): an edit never depends on its batch neighbours. The authors' defaults: SD 3, 50 steps,
n_max 33, source CFG 3.5, target CFG 13.5; FLUX.1-dev, 28 steps, n_max 24, source 1.5, target 5.5; n_avg 1, n_min 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..ddim import flow_z
from ..errors import DiffinvError, check_at_least
from ..seeds import keyed_normal
from .editor import EditContext, Editor, Row, SampleRows

LevelVelocity = Callable[[Tensor, int], Tensor]
"""v(x, k): the (guided) velocity of flow latents x at level k's sigma and timestep, one row per edit."""

LevelNoise = Callable[[int, int], Tensor]
"""noise(k, j): the standard normal N_kj of level k's draw j, one row per edit, the shape of the latents."""


def keyed_noise(shape: tuple[int, ...], seed: int, keys: Sequence[tuple[str, str]]) -> LevelNoise:
    """Each edit's N_kj from (seed, item id, target prompt, level k, draw j) (:func:`diffinv.seeds.keyed_normal`),
    stacked over the edits ``keys`` = [(item id, target prompt), ...]: the same alone or beside any other edit."""

    def noise(k: int, j: int) -> Tensor:
        return torch.stack([keyed_normal(shape, seed, item, target, f"flowedit level {k}", f"draw {j}")
                            for item, target in keys])

    return noise


def flowedit(x_src: Tensor, sigmas: Tensor, source: LevelVelocity, target: LevelVelocity, noise: LevelNoise,
             n_max: int, n_min: int = 0, n_avg: int = 1) -> tuple[Tensor, int]:
    """The edit of the source latents ``x_src`` (B, ...) (FlowEdit Alg. 1), over the levels of ``sigmas`` (N + 1,
    ascending, s_0 = 0): the edited latents and the number of velocity evaluations, 2 n_avg per edit step (source and
    target) plus one per plain step below n_min. ``source``/``target``: each row's velocity under the source prompt at
    the source's CFG scale and under its target prompt at the target's."""
    n = len(sigmas) - 1
    if not 0 <= n_min < n_max <= n:
        raise ValueError(f"FlowEdit needs 0 <= n_min < n_max <= {n} steps, got n_min {n_min}, n_max {n_max}")
    if n_avg < 1:
        raise ValueError(f"FlowEdit needs n_avg >= 1, got {n_avg}")
    s = [float(v) for v in sigmas]
    z_fe, evaluations = x_src, 0
    for k in range(n_max, n_min, -1):
        v_delta = torch.zeros_like(x_src)
        for j in range(n_avg):
            n_kj = noise(k, j).to(x_src)
            z_src = (1 - s[k]) * x_src + s[k] * n_kj  # the source noised to level k
            z_tar = z_fe + z_src - x_src  # the edit noised alike
            v_delta = v_delta + (target(z_tar, k) - source(z_src, k)) / n_avg  # V_delta, averaged over n_avg draws
            evaluations += 2
        z_fe = z_fe + (s[k - 1] - s[k]) * v_delta  # Euler step of the edit ODE
    if n_min == 0:
        return z_fe, evaluations
    z_tar = z_fe + (1 - s[n_min]) * x_src + s[n_min] * noise(n_min, 0).to(x_src) - x_src  # noised at level n_min
    for k in range(n_min, 0, -1):  # plain sampling of the target from there
        z_tar = z_tar + (s[k - 1] - s[k]) * target(z_tar, k)
        evaluations += 1
    return z_tar, evaluations


class FlowEdit(Editor):
    """FlowEdit: each edit is carried from its item's source latent (no inversion: the method's inversion serves
    its reconstruction row only) by :func:`flowedit`, on the schedule's levels from ``n_max`` down; the
    reconstruction row is the method's own. The paper's defaults are SD 3's (50 steps: n_max 33, source CFG 3.5,
    target CFG 13.5; ``configs/flow/flowedit_sd3.yaml``); FLUX.1-dev's (28 steps: n_max 24, source 1.5 and target
    5.5 given to its guidance embedding, as the authors' FlowEditFLUX) are ``configs/flow/flowedit_flux.yaml``.
    Flow models only (refused on the others in one line, before any work)."""

    edit_name = "flowedit"
    needs_flow = True

    def __init__(self, n_max: float = 0.66, n_min: float = 0.0, n_avg: int = 1, source_guidance: float = 3.5,
                 target_guidance: float = 13.5, embedded_guidance: bool = False, seed: int = 0):
        """
        Args:
            n_max: The fraction of the steps the edit runs, from level round(n_max N) down (the paper: SD 3 33 of
                50, 0.66; FLUX 24 of 28, 0.86).
            n_min: The fraction of the steps below which the edit is finished by plain sampling of the target
                (the paper: 0).
            n_avg: Noise draws averaged per step (the paper: 1).
            source_guidance: The source velocity's guidance scale (the paper: SD 3 3.5, FLUX 1.5).
            target_guidance: The target velocity's guidance scale (the paper: SD 3 13.5, FLUX 5.5).
            embedded_guidance: Give the two scales to a guidance-distilled model's embedding (FLUX.1-dev, as the
                authors' FlowEditFLUX) instead of classifier-free guidance with the null prompt (SD 3).
            seed: Run seed of the noise: each edit draws from (this seed, the item's id, the target prompt, level,
                draw), so an edit is the same alone or beside any other items and prompts.
        """
        if not 0 <= n_min < n_max <= 1:
            raise DiffinvError(f"FlowEdit needs 0 <= n_min < n_max <= 1 (fractions of the steps), got n_min {n_min}, "
                               f"n_max {n_max}")
        check_at_least("editor.n_avg", n_avg, 1, hint="noise draws per step; the paper: 1")
        check_at_least("editor.source_guidance", source_guidance, 0)
        check_at_least("editor.target_guidance", target_guidance, 0)
        self.n_max, self.n_min, self.n_avg = n_max, n_min, int(n_avg)
        self.source_guidance, self.target_guidance = source_guidance, target_guidance
        self.embedded_guidance, self.seed = embedded_guidance, seed

    def check_backbone(self, backbone) -> None:
        """With ``embedded_guidance``, the model must be guidance-distilled (FLUX.1-dev): refused in one line."""
        if self.embedded_guidance:
            backbone.family.with_embedded_guidance(backbone, self.target_guidance)

    def levels(self, num_steps: int) -> tuple[int, int]:
        """(n_max, n_min) as levels of an N-step schedule: round(f N), n_max at least 1 and above n_min."""
        top = max(1, min(num_steps, round(self.n_max * num_steps)))
        return top, min(top - 1, round(self.n_min * num_steps))

    def sample(self, run: SampleRows, rows: list[Row], starts: Tensor, ctx: EditContext) -> Tensor:
        if ctx.velocity is None:
            raise DiffinvError("FlowEdit drives a rectified flow's ODE: it runs on flow models (SD 3 / 3.5, FLUX.1)")
        recon = [r for r, row in enumerate(rows) if not row.is_edit]
        edits = [r for r, row in enumerate(rows) if row.is_edit]
        latents = torch.empty_like(starts)
        latents[recon] = run(recon, starts[recon])
        if not edits:
            return latents
        x_src = torch.stack([ctx.z0[rows[r].item] for r in edits]).to(starts)  # level 0: z = x
        sources = [ctx.sources[rows[r].item] for r in edits]
        targets = [rows[r].target for r in edits]
        n_max, n_min = self.levels(ctx.schedule.num_steps)
        sigmas = ctx.schedule.sigmas.to(starts.device)
        e = self.embedded_guidance
        with torch.no_grad():
            x, _ = flowedit(
                x_src, sigmas,
                source=lambda x, k: ctx.velocity(x, k, sources, self.source_guidance, e),
                target=lambda x, k: ctx.velocity(x, k, targets, self.target_guidance, e),
                noise=keyed_noise(tuple(x_src.shape[1:]), self.seed, [(ctx.item_ids[rows[r].item], t)
                                                                     for r, t in zip(edits, targets)]),
                n_max=n_max, n_min=n_min, n_avg=self.n_avg)
        latents[edits] = flow_z(x, sigmas[0]).to(starts.dtype)
        return latents

