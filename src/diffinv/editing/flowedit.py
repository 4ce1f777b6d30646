"""FlowEdit (Kulikov et al., ICCV 2025, "FlowEdit: inversion-free text-based editing using pre-trained flow models"):
the math only (no editor is wired yet). An ODE carries the source image's latent straight to the edit, driven by the
difference of the target and source velocities at noised copies of the source, with no inversion.

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

from ..seeds import keyed_normal

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
