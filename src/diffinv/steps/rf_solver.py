"""RF-Solver (Wang et al., ICML 2025, "Taming rectified flow for inversion and editing"): the rectified-flow ODE
dx/ds = v(x, s) solved by its second-order Taylor expansion, the derivative of v taken by a finite difference at
the midpoint (one extra velocity evaluation per step: 2 per step, 2N in all).

Symbols: s is the flow's sigma (0: the image, 1: pure noise), x_s = (1 - s) x0 + s eps, v = eps - x0 = dx/ds (the
papers' t is our s; sampling runs s downwards, inversion upwards, the same step with the other sign of ds).
One step from s to s' = s + ds (paper Sec. 3.2, authors' ``denoise``)::

    v     = v(x, s)                                      first evaluation, where x sits
    x_mid = x + ds / 2 v                                 an Euler half step
    v'    = (v(x_mid, s + ds / 2) - v) / (ds / 2)        the time derivative of v, by a finite difference
    x'    = x + ds v + 1/2 ds^2 v'                       the second-order Taylor expansion

Algebraically x' = x + ds v(x_mid, s + ds / 2), the explicit midpoint rule; we evaluate the expansion as written.
It is exact where v is linear in s and does not depend on x (tested), second-order convergent where Euler is first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..ddim import FlowSchedule, flow_x, flow_z
from ..guidance import GuidanceRule
from .base import Guided

VelocityFn = Callable[[Tensor, float], Tensor]
"""v(x, s): the velocity dx/ds of flow latents x at sigma s (pure math, tests' hand-made fields)."""

StepVelocity = Callable[[Tensor, int, "tuple[Tensor, Tensor] | None"], Tensor]
"""velocity(z, k, at) -> v: the velocity (x space) of DDIM-coordinate latents z in the step between levels k - 1
and k: at level k's own point where ``at`` is None (the sampler's default call), else at ``at`` = (timestep,
alpha)."""


def midpoint_state(x: Tensor, v: Tensor, ds: float) -> Tensor:
    """x + ds / 2 v: the Euler half step to the midpoint (RF-Solver Sec. 3.2; FireFlow eq. of its Alg. 1 line 4)."""
    return x + ds / 2 * v


def taylor_update(x: Tensor, v: Tensor, v_mid: Tensor, ds: float) -> Tensor:
    """x + ds v + 1/2 ds^2 v' with v' = (v_mid - v) / (ds / 2) (RF-Solver Sec. 3.2: the second-order expansion,
    the derivative by a finite difference at the midpoint)."""
    derivative = (v_mid - v) / (ds / 2)  # dv/ds at s, from the midpoint's velocity
    return x + ds * v + 0.5 * ds**2 * derivative  # second-order Taylor expansion


def euler_update(x: Tensor, v: Tensor, ds: float) -> Tensor:
    """x + ds v: the Euler step (FireFlow's update with the midpoint's velocity; RF-Inversion's controlled steps)."""
    return x + ds * v


def rf_solver_step(velocity: VelocityFn, x: Tensor, s: float, s_to: float) -> Tensor:
    """One RF-Solver step of flow latents x from sigma s to s_to (2 evaluations)."""
    ds = s_to - s
    v = velocity(x, s)
    v_mid = velocity(midpoint_state(x, v, ds), s + ds / 2)
    return taylor_update(x, v, v_mid, ds)


def rf_solver_solve(velocity: VelocityFn, x: Tensor, sigmas: Sequence[float]) -> tuple[Tensor, int]:
    """x carried along ``sigmas`` (ascending: inversion, descending: sampling) by RF-Solver steps; returns the end
    latents and the number of velocity evaluations (2 per step)."""
    evaluations = 0
    for s, s_to in zip(sigmas[:-1], sigmas[1:]):
        x = rf_solver_step(velocity, x, float(s), float(s_to))
        evaluations += 2
    return x, evaluations


def start_point(schedule: FlowSchedule, k_from: int, k: int) -> tuple[Tensor, Tensor] | None:
    """Where a step between levels k - 1 and k first evaluates the velocity: on the latent of the level it leaves.
    Sampling (k_from = k): level k's own point (None, the sampler's usual call); inversion (k_from = k - 1): level
    k - 1's timestep and alpha (timestep 0 at level 0, where the papers' inversions start)."""
    return None if k_from == k else (schedule.level_timestep(k_from), schedule.alphas[k_from])


def rf_solver_move(z: Tensor, k_from: int, k_to: int, velocity: StepVelocity, schedule: FlowSchedule) -> Tensor:
    """RF-Solver's step of DDIM-coordinate latents z from level ``k_from`` to the adjacent ``k_to`` (down: sampling,
    up: inversion), in the flow's own coordinates x = z sqrt((1 - s)^2 + s^2)."""
    k = max(k_from, k_to)
    s, s_to = schedule.sigmas[k_from], schedule.sigmas[k_to]
    s_mid, t_mid, alpha_mid = schedule.midpoint(k)
    ds = float(s_to - s)
    x = flow_x(z, s)
    v = velocity(z, k, start_point(schedule, k_from, k))
    v_mid = velocity(flow_z(midpoint_state(x, v, ds), s_mid), k, (t_mid, alpha_mid))
    return flow_z(taylor_update(x, v, v_mid, ds), s_to)


def guided_velocity(guided: Guided) -> StepVelocity:
    """The sampler's guided prediction as a velocity v = eps - x0 (the guided x0 is the model's own: CFG is linear)."""

    def velocity(z: Tensor, k: int, at: tuple[Tensor, Tensor] | None) -> Tensor:
        eps, _, x0 = guided(z, k, need_x0=True, at=at)
        return eps - x0

    return velocity


@dataclass
class RFSolverStep:
    """RF-Solver's step for the sampling loop, level k -> k - 1 (2 guided evaluations: level k, then the midpoint).
    Only the guidance rule's combination applies (classifier-free guidance); its x0 and latent corrections
    (ProxNPI's) do not. ``evaluations`` counts the velocity evaluations of the run."""

    evaluations: int = 0

    def start(self, z: Tensor, level: int) -> None:
        self.evaluations = 0

    def map_companions(self, fn: Callable[[Tensor], Tensor]) -> None:
        pass

    def __call__(self, z: Tensor, k: int, guided: Guided, rule: GuidanceRule,
                 schedule: FlowSchedule) -> tuple[Tensor, Tensor | None]:
        self.evaluations += 2
        return rf_solver_move(z, k, k - 1, guided_velocity(guided), schedule), None


Move = Callable[[Tensor, int, int, StepVelocity, FlowSchedule], Tensor]
"""move(z, k_from, k_to, velocity, schedule): a flow solver's step between adjacent levels (:func:`rf_solver_move`,
:meth:`FireFlowMover.move <diffinv.steps.fireflow.FireFlowMover.move>`)."""


def invert_with(move: Move, z0: Tensor, schedule: FlowSchedule, velocity: StepVelocity) -> Tensor:
    """The trajectory z_0 .. z_N (N + 1, B, ...) of a flow solver's steps upwards from z0 at level 0, ``velocity``
    evaluating the step between levels k - 1 and k at the given point (the first at level k - 1's)."""
    trajectory = [z0]
    for k in range(1, schedule.num_steps + 1):
        trajectory.append(move(trajectory[-1], k - 1, k, velocity, schedule))
    return torch.stack(trajectory)


def backbone_velocity(predict: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]],
                      schedule: FlowSchedule) -> StepVelocity:
    """A :data:`StepVelocity` from ``predict(z, timestep, alpha) -> (eps, x0)`` (a backbone's prediction under the
    inversion's conditioning): at ``at``, else at level k's timestep and alpha."""

    def velocity(z: Tensor, k: int, at: tuple[Tensor, Tensor] | None) -> Tensor:
        t, alpha = at if at is not None else (schedule.timesteps[k - 1], schedule.alphas[k])
        eps, x0 = predict(z, t, alpha)
        return eps - x0

    return velocity
