"""The deterministic DDIM step (NPI eq. 2), with the guidance rule's corrections of x0 and of the new latent."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..ddim import Schedule, from_x0, predict_x0
from ..guidance import GuidanceRule
from .base import Guided


class DeterministicStep:
    """DDIM through the predicted x0 (ProxNPI Alg. 1 lines 8 and 12): x0 = (z - sqrt(1 - a_k) eps) / sqrt(a_k),
    corrected by the rule (ProxNPI's reconstruction guidance), then z_{k-1} = sqrt(a_{k-1}) x0 + sqrt(1 - a_{k-1})
    eps, corrected by the rule (ProxNPI's inversion guidance)."""

    def start(self, z: Tensor, level: int) -> None:
        pass

    def map_companions(self, fn: Callable[[Tensor], Tensor]) -> None:
        pass

    def x0(self, z: Tensor, k: int, guided: Guided, rule: GuidanceRule,
           schedule: Schedule) -> tuple[Tensor, Tensor, Tensor | None]:
        """(corrected x0, eps, mask) of the step from level k."""
        eps, mask, x0 = guided(z, k)
        if x0 is None:
            x0 = predict_x0(z, eps, schedule.alphas[k].to(z.dtype))
        return rule.correct_x0(x0, int(schedule.timesteps[k - 1]), k, mask), eps, mask

    def land(self, x0: Tensor, eps: Tensor, k: int, schedule: Schedule) -> Tensor:
        """The new latent of level k - 1 from the step's x0 and eps."""
        return from_x0(x0, eps, schedule.alphas[k - 1].to(x0.dtype))

    def __call__(self, z: Tensor, k: int, guided: Guided, rule: GuidanceRule,
                 schedule: Schedule) -> tuple[Tensor, Tensor | None]:
        x0, eps, mask = self.x0(z, k, guided, rule, schedule)
        return rule.correct_z(self.land(x0, eps, k, schedule), int(schedule.timesteps[k - 1]), k, mask), mask
