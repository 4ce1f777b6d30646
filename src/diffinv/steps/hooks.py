"""The post-step hooks of a sampling run: each a small object the loop calls after every step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import DiffinvError
from .base import Step, StepHook


@dataclass
class Snap(StepHook):
    """DirectInversion (Ju et al. 2024, Alg. 1): the rows ``rows`` are put back onto their inversion trajectory
    after every step, the step's result plus z*_{k-1} minus it, i.e. exactly z*_{k-1}."""

    rows: Tensor
    """(B,) bool: the rows snapped (the reconstruction rows)."""
    trajectory: Tensor
    """(N + 1, B, C, h, w) each row's inversion trajectory."""

    def after(self, z: Tensor, k: int, mask: Tensor | None, step: Step) -> Tensor:
        return torch.where(self.rows.to(z.device).view(-1, 1, 1, 1), self.trajectory[k - 1], z)


@dataclass
class Controlled(StepHook):
    """An editor's attention controller (Prompt-to-Prompt's, RF-Edit's value store; already installed on the
    denoiser): told before each step which step of the run it is, counted from the first step sampled (the run
    starts at level ``top``: step 0 is the step from ``top``, as the authors' code counts), and given the latents
    after it (local blend), those of every sequence the step carries."""

    controller: object
    top: int

    def before(self, k: int) -> None:
        self.controller.step = self.top - k

    def after(self, z: Tensor, k: int, mask: Tensor | None, step: Step) -> Tensor:
        index = self.top - k
        step.map_companions(lambda y: self.controller.after_step(y, index))
        return self.controller.after_step(z, index)


@dataclass
class Observe(StepHook):
    """Told the level k a step left, the new latents and the guidance's mask; it cannot change the result."""

    fn: Callable[[int, Tensor, Tensor | None], None]

    def after(self, z: Tensor, k: int, mask: Tensor | None, step: Step) -> Tensor:
        self.fn(k, z, mask)
        return z


@dataclass
class Finite(StepHook):
    """Stops the run at the first step whose latents hold NaN or infinity (a model whose prediction cannot be
    converted at some level, a half-precision overflow, a broken record): never decoded, never written."""

    num_steps: int
    timesteps: Tensor

    def after(self, z: Tensor, k: int, mask: Tensor | None, step: Step) -> Tensor:
        if not bool(torch.isfinite(z).all()):
            bad = [int(b) for b in (~torch.isfinite(z.flatten(1))).any(1).nonzero().flatten()]
            raise DiffinvError(f"sampling produced NaN or infinite latents at the step from level {k} of "
                               f"{self.num_steps} (timestep {int(self.timesteps[k - 1])}) in row(s) {bad}: the "
                               "model's prediction is not finite there (a zero-SNR or half-precision issue?); "
                               "nothing was written for this batch")
        return z
