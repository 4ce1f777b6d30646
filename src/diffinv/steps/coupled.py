"""EDICT's coupled step (Wallace et al. 2023, eq. 14): two sequences, each DDIM-stepped with the other's noise
prediction, then mixed; optionally in the authors' leapfrog order (the y sequence first on alternate steps)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from ..ddim import Schedule
from ..guidance import GuidanceRule
from .base import Guided


def y_first(top: int, k: int, leapfrog: bool) -> bool:
    """Whether the step between levels k and k - 1 of a run from level ``top`` updates the y sequence first: never
    in the paper's order (eq. 14/15, x first at every step); in the authors' leapfrog order at the steps counted
    odd from the first sampled one, i.e. where (top - k) is odd. Sampling and inversion (:func:`~diffinv.inversion.
    edict.edict_invert`) both ask this of each level, so either undoes the other for any step count."""
    return leapfrog and (top - k) % 2 == 1


@dataclass
class CoupledStep:
    """From the pair (x_k, y_k), level k -> k - 1 (eq. 14)::

        x_inter = step(x_k, eps(y_k))          y_inter = step(y_k, eps(x_inter))
        x_{k-1} = p x_inter + (1 - p) y_inter  y_{k-1} = p y_inter + (1 - p) x_{k-1}

    With ``leapfrog`` (the authors' code, salesforce/EDICT ``leapfrog_steps=True``), at the levels where
    :func:`y_first` holds the two DDIM steps swap, the mixing stays::

        y_inter = step(y_k, eps(x_k))          x_inter = step(x_k, eps(y_inter))

    Two guided denoiser calls per step; the rule's corrections do not apply (EDICT has none). The loop's latents are
    the x sequence; y starts at ``y_start`` (None: at the loop's start latents, a run from a lower level)."""

    mix: float
    y_start: Tensor | None = None
    leapfrog: bool = False
    """Alternate the update order (the authors' code); False: x first at every step (the paper's eq. 14)."""
    y: Tensor | None = None
    top: int | None = None
    """The level the run started from (set by :meth:`start`): the leapfrog order counts steps from it."""

    def start(self, z: Tensor, level: int) -> None:
        self.y = z if self.y_start is None else self.y_start
        self.top = level

    def map_companions(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.y = fn(self.y)

    def __call__(self, z: Tensor, k: int, guided: Guided, rule: GuidanceRule,
                 schedule: Schedule) -> tuple[Tensor, Tensor | None]:
        p = self.mix

        def step(z: Tensor, other: Tensor) -> Tensor:
            """z moved with the other sequence's guided prediction by the schedule's own step (DDIM; a flow's Euler
            step, which stays invertible at s = 1)."""
            eps, _, x0 = guided(other, k, need_x0=True)
            return schedule.move(z, eps, x0, k, k - 1)

        if y_first(self.top, k, self.leapfrog):
            y_inter = step(self.y, z)  # the authors' odd steps: y first
            x_inter = step(z, y_inter)
        else:
            x_inter = step(z, self.y)  # eq. 14
            y_inter = step(self.y, x_inter)
        x = p * x_inter + (1 - p) * y_inter
        self.y = p * y_inter + (1 - p) * x
        return x, None
