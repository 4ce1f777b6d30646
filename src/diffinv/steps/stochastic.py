"""The stochastic DDIM step with given noise (DDIM paper eq. 12/16): CycleDiffusion's and DDPM inversion's."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..ddim import Schedule, Variance, ddim_mean, direction_sigma
from .deterministic import DeterministicStep


@dataclass
class StochasticStep(DeterministicStep):
    """The step from level k moves to the mean sqrt(a_{k-1}) x0 + sqrt(1 - a_{k-1} - sigma_k^2) eps (eq. 12, sigma_k
    of eq. 16 at ``eta``), plus ``noise[k - 1]``: the sigma_k n_k of a latent code (CycleDiffusion's residuals,
    DDPM inversion's noise maps), one per row. With ``variance='authors'`` the direction coefficient is
    sqrt(1 - a_{k-1} - eta sigma_1^2) instead (edit-friendly DDPM inversion's code; the same at eta = 1)."""

    eta: float
    noise: Tensor
    """(N, B, C, h, w): what is added after the step from level k, at [k - 1]."""
    variance: Variance = "ddim"
    """The direction coefficient's variance (:data:`diffinv.ddim.Variance`): the record's, which its noise absorbs."""

    def land(self, x0: Tensor, eps: Tensor, k: int, schedule: Schedule) -> Tensor:
        sigma = direction_sigma(schedule.alphas[k], schedule.alphas[k - 1], self.eta, self.variance)
        return ddim_mean(x0, eps, schedule.alphas[k - 1].to(x0.dtype), sigma) + self.noise[k - 1]  # eq. 12
