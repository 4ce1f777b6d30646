"""RF-Inversion's controlled ODEs (Rout et al., ICLR 2025, "Semantic image inversion and editing using rectified
stochastic differential equations"), Euler-discretised as the paper's Algorithms 1 and 2.

Symbols: s is the flow's sigma (0: the image, 1: noise); the paper's forward time t (image -> noise) is our s, its
reverse time is 1 - s. v(x, s) = eps - x0 = dx/ds is the model's velocity (the paper's u_t(Y_t) = v(Y_t, s) for the
forward ODE, and its reverse field v_t(X_t) = -v(X_t, s)).

Controlled forward ODE (inversion, eq. 8), toward a noise sample y1 ~ N(0, I)::

    dY/ds = v(Y, s) + gamma (u(Y | y1) - v(Y, s)),  u(Y | y1) = (y1 - Y) / (1 - s)

Controlled reverse ODE (sampling, eq. 17 as the diffusers community pipeline cites it), toward the image's latent y0,
with eta_i = eta on the steps i in [start, stop) counted from the first sampled step, 0 elsewhere::

    dX/d(1 - s) = -v(X, s) + eta_i ((y0 - X) / s + v(X, s))      i.e.   dX/ds = v + eta_i ((X - y0) / s - v)

Each Euler step evaluates the field where the latent sits. gamma = 0 is plain Euler inversion, eta = 0 plain Euler
sampling; gamma = 1 lands on y1 at s = 1, eta = 1 on the whole run lands on y0 at s = 0 (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..ddim import FlowSchedule, flow_x, flow_z
from ..guidance import GuidanceRule
from .base import Guided
from .rf_solver import VelocityFn, euler_update


def forward_field(v: Tensor, y: Tensor, y1: Tensor, s: float, gamma: float) -> Tensor:
    """The controlled forward field v + gamma ((y1 - Y) / (1 - s) - v) at sigma s < 1 (eq. 8)."""
    toward_noise = (y1 - y) / (1 - s)  # u_t(Y_t | y1): the straight path from Y_t to y1
    return v + gamma * (toward_noise - v)


def reverse_field(v: Tensor, x: Tensor, y0: Tensor, s: float, eta: float | Tensor) -> Tensor:
    """The controlled reverse field as dX/ds, v + eta ((X - y0) / s - v) at sigma s > 0 (eq. 17; its dX/dt with
    t = 1 - s is minus this)."""
    toward_image = (x - y0) / s  # minus v_t(X_t | y0) = (y0 - X_t) / (1 - t): the straight path to y0, as dX/ds
    return v + eta * (toward_image - v)


def eta_at(step: int, eta: float, start: int, stop: int) -> float:
    """eta_i: ``eta`` on the sampled steps i (0: the first) with start <= i < stop, 0 elsewhere (Alg. 2)."""
    return eta if start <= step < stop else 0.0


def rf_invert(velocity: VelocityFn, y0: Tensor, sigmas, y1: Tensor, gamma: float) -> tuple[Tensor, int]:
    """The controlled forward ODE from y0 at sigmas[0] = 0 up the ascending ``sigmas`` by Euler steps (Alg. 1): the
    trajectory (N + 1, ...) and the number of velocity evaluations (N)."""
    y, trajectory = y0, [y0]
    for s, s_to in zip(sigmas[:-1], sigmas[1:]):
        s, ds = float(s), float(s_to) - float(s)
        y = euler_update(y, forward_field(velocity(y, s), y, y1, s, gamma), ds)
        trajectory.append(y)
    return torch.stack(trajectory), len(sigmas) - 1


def rf_sample(velocity: VelocityFn, x: Tensor, sigmas, y0: Tensor, eta: float, start: int = 0,
              stop: int | None = None) -> tuple[Tensor, int]:
    """The controlled reverse ODE from x at sigmas[0] down the descending ``sigmas`` by Euler steps (Alg. 2), eta on
    the steps [start, stop) (None: to the end): the end latents and the number of velocity evaluations."""
    stop = len(sigmas) if stop is None else stop
    for i, (s, s_to) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        s, ds = float(s), float(s_to) - float(s)
        x = euler_update(x, reverse_field(velocity(x, s), x, y0, s, eta_at(i, eta, start, stop)), ds)
    return x, len(sigmas) - 1


@dataclass
class ControlledStep:
    """RF-Inversion's controlled reverse step for the sampling loop, level k -> k - 1 (one guided evaluation): the
    Euler step of :func:`reverse_field` toward ``y0`` (each row's image latent), eta on the steps [int(eta_start M),
    int(eta_stop M)) of the M steps the run samples, counted from its first. Rows with eta 0 (``rows`` False)
    take the plain Euler step. Only the guidance rule's combination applies."""

    y0: Tensor
    """(B, C, h, w) each row's image latent (z0: at s = 0, z = x)."""
    eta: float
    eta_start: float = 0.0
    """The fraction of the sampled steps after which eta starts."""
    eta_stop: float = 0.0
    """The fraction of the sampled steps at which it stops."""
    rows: Tensor | None = None
    """(B,) bool: the rows controlled; None: all."""
    top: int | None = None
    evaluations: int = 0

    def start(self, z: Tensor, level: int) -> None:
        self.top, self.evaluations = level, 0
        self.first, self.stop = int(self.eta_start * level), int(self.eta_stop * level)

    def map_companions(self, fn: Callable[[Tensor], Tensor]) -> None:
        pass

    def __call__(self, z: Tensor, k: int, guided: Guided, rule: GuidanceRule,
                 schedule: FlowSchedule) -> tuple[Tensor, Tensor | None]:
        eps, _, x0 = guided(z, k, need_x0=True)
        self.evaluations += 1
        s, s_to = schedule.sigmas[k], schedule.sigmas[k - 1]
        eta = torch.full((z.shape[0], 1, 1, 1), eta_at(self.top - k, self.eta, self.first, self.stop),
                         dtype=z.dtype, device=z.device)
        if self.rows is not None:
            eta = eta * self.rows.to(device=z.device, dtype=z.dtype).view(-1, 1, 1, 1)
        x = flow_x(z, s)
        field = reverse_field(eps - x0, x, self.y0.to(z), float(s), eta)
        return flow_z(euler_update(x, field, float(s_to - s)), s_to), None
