"""FireFlow (Deng et al., ICML 2025, "FireFlow: fast inversion of rectified flow for image semantic editing"): the
midpoint rule with the velocity at the start of each step taken from the previous step's midpoint, so one velocity
evaluation per step (N + 1 in all: the first step evaluates its start too) for second-order accuracy.

One step from s to s' = s + ds (paper Alg. 1; authors' ``denoise_fireflow``)::

    v     = v_mid of the previous step          (the first step: v(x, s))
    x_mid = x + ds / 2 v
    v_mid = v(x_mid, s + ds / 2)                the only evaluation, kept for the next step
    x'    = x + ds v_mid

With one step it is the midpoint rule (RF-Solver's step, :mod:`diffinv.steps.rf_solver`). Sampling and inversion
are the same loop, s down or up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from ..ddim import FlowSchedule, flow_x, flow_z
from ..guidance import GuidanceRule
from .base import Guided
from .rf_solver import StepVelocity, VelocityFn, euler_update, guided_velocity, midpoint_state, start_point


def fireflow_solve(velocity: VelocityFn, x: Tensor, sigmas: Sequence[float]) -> tuple[Tensor, int]:
    """x carried along ``sigmas`` (ascending: inversion, descending: sampling) by FireFlow steps; returns the end
    latents and the number of velocity evaluations (steps + 1)."""
    v, evaluations = None, 0
    for s, s_to in zip(sigmas[:-1], sigmas[1:]):
        s, ds = float(s), float(s_to) - float(s)
        if v is None:  # the first step only: the velocity where x sits
            v = velocity(x, s)
            evaluations += 1
        v = velocity(midpoint_state(x, v, ds), s + ds / 2)  # reused as the next step's start velocity
        evaluations += 1
        x = euler_update(x, v, ds)
    return x, evaluations


@dataclass
class FireFlowMover:
    """FireFlow's state over one run: the previous step's midpoint velocity (None before the first step)."""

    v: Tensor | None = None
    evaluations: int = 0

    def move(self, z: Tensor, k_from: int, k_to: int, velocity: StepVelocity, schedule: FlowSchedule) -> Tensor:
        """z from level ``k_from`` to the adjacent ``k_to`` (down: sampling, up: inversion), in the flow's own
        coordinates x = z sqrt((1 - s)^2 + s^2)."""
        k = max(k_from, k_to)
        s, s_to = schedule.sigmas[k_from], schedule.sigmas[k_to]
        s_mid, t_mid, alpha_mid = schedule.midpoint(k)
        ds = float(s_to - s)
        x = flow_x(z, s)
        if self.v is None:
            self.v = velocity(z, k, start_point(schedule, k_from, k))
            self.evaluations += 1
        self.v = velocity(flow_z(midpoint_state(x, self.v, ds), s_mid), k, (t_mid, alpha_mid))
        self.evaluations += 1
        return flow_z(euler_update(x, self.v, ds), s_to)


@dataclass
class FireFlowStep:
    """FireFlow's step for the sampling loop, level k -> k - 1: one guided evaluation (the midpoint) per step, two
    in the first. Only the guidance rule's combination applies. The reused velocity is reset at :meth:`start`;
    ``evaluations`` counts the run's evaluations."""

    mover: FireFlowMover | None = None

    @property
    def evaluations(self) -> int:
        return 0 if self.mover is None else self.mover.evaluations

    def start(self, z: Tensor, level: int) -> None:
        self.mover = FireFlowMover()

    def map_companions(self, fn: Callable[[Tensor], Tensor]) -> None:
        pass

    def __call__(self, z: Tensor, k: int, guided: Guided, rule: GuidanceRule,
                 schedule: FlowSchedule) -> tuple[Tensor, Tensor | None]:
        return self.mover.move(z, k, k - 1, guided_velocity(guided), schedule), None
