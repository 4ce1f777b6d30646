"""Per-sample optimisation primitives, pure torch, free of host syncs.

Null-text inversion and latent-TOP optimise one set of parameters per image, batched. Two images must not
influence each other (batching never changes a result), and an image that met its stopping rule must stay put
while others go on. ``torch.optim.Adam`` cannot do the latter (its momentum keeps moving a parameter whose
gradient is zero), so the update is written out here, masked per sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class AdamState:
    """Adam's moments for a (B, ...) parameter; ``steps`` counts each sample's own updates."""

    exp_avg: Tensor
    exp_avg_sq: Tensor
    steps: Tensor = field(default=None)  # (B,)

    @classmethod
    def zeros_like(cls, param: Tensor) -> "AdamState":
        return cls(torch.zeros_like(param), torch.zeros_like(param),
                   torch.zeros(param.shape[0], device=param.device, dtype=param.dtype))


def masked_adam_step(param: Tensor, grad: Tensor, state: AdamState, lr: float | Tensor, active: Tensor,
                     betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """One Adam step (Kingma & Ba, with bias correction, as torch.optim.Adam) on the samples where ``active``.

    param, grad: (B, ...); active: (B,) bool. Inactive samples keep their parameters and moments unchanged.
    """
    b1, b2 = betas
    shape = (-1,) + (1,) * (param.dim() - 1)
    a = active.to(param.dtype).view(shape)
    steps = state.steps + active.to(state.steps.dtype)
    m = torch.lerp(state.exp_avg, grad, (1 - b1) * a)
    v = torch.lerp(state.exp_avg_sq, grad * grad, (1 - b2) * a)
    t = steps.clamp(min=1).view(shape)
    update = lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    with torch.no_grad():
        param.sub_(a * update)
    state.exp_avg, state.exp_avg_sq, state.steps = m, v, steps


def early_stop_threshold(step_index: float, epsilon: float, delta: float) -> float:
    """NTI's per-step stopping level: stop once loss < epsilon + i * delta at the i-th step (i = 0 at t = T)."""
    return epsilon + step_index * delta


def still_active(active: Tensor, loss: Tensor, threshold: float) -> Tensor:
    """Samples that keep optimising: those active and not yet below the threshold (decided on device)."""
    return active & (loss.detach() >= threshold)
