"""Trajectory tracking: optimise a per-step unconditional embedding so that CFG sampling follows the DDIM
(w = 1) inversion trajectory. The shared core of null-text inversion and latent-TOP, pure torch.

For k = N .. 1 (NPI paper §3.3, eq. 4; latent-TOP §2.2 "trajectory optimization"):
    min_{u_k} || ddim_step(z̄_k, cfg(eps(z̄_k, t_k, u_k), eps(z̄_k, t_k, C), w)) - z*_{k-1} ||²
with a fresh optimiser per step, u_k warm-started from u_{k+1}, then z̄_{k-1} = that step without grad.
latent-TOP additionally learns a noise bias b on z̄_N = z*_N + b, jointly with u_N at the first step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..ddim import Schedule
from ..guidance import cfg
from ..errors import check_at_least, check_finite, check_fraction
from ..optim import AdamState, early_stop_threshold, masked_adam_step, still_active

PredFn = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
"""pred_fn(z, t, emb) -> (eps, x0): the model's prediction (:meth:`diffinv.backbone.Backbone.predict`); the step
reads x0 only at a level of alpha 0, where it is not a function of eps."""


@dataclass
class TrackingSchedule:
    """Inner-loop settings, the same numbers the NTI reference uses (written there for 50 steps)."""

    num_inner_steps: int = 10
    lr: float = 1e-2
    lr_decay: float = 0.01
    epsilon: float = 1e-5
    delta: float = 2e-5
    lr_floor: float = 0.5
    schedule_steps: int | None = 50
    """The step count the reference's numbers are written for. At N steps the i-th step counts as step
    i * schedule_steps / N, so the lr falls from lr to lr / 2 and the stop threshold grows by the same amount over
    any N; below schedule_steps the lr is also multiplied by schedule_steps / N (fewer steps, each must move its
    embedding further: from the null prompt, 10 iterations at 1e-2 do not converge in 10 or 20 steps). Exactly
    the reference at N = schedule_steps. None: the reference's numbers as they are, at any N."""

    def __post_init__(self) -> None:
        """Refuse settings that silently break the optimisation (a negative lr undoes it: NTI reconstructed at
        3.9 dB), named as the methods' options."""
        check_finite({"lr": self.lr, "lr_decay": self.lr_decay, "lr_floor": self.lr_floor,
                      "early_stop_epsilon": self.epsilon, "early_stop_delta": self.delta})
        check_at_least("num_inner_steps", self.num_inner_steps, 0,
                       hint="Adam iterations per step at most; reference: 10; 0: no optimisation")
        check_at_least("lr", self.lr, 0, strict=True, hint="the Adam learning rate; reference: 0.01")
        check_at_least("lr_decay", self.lr_decay, 0, hint="reference: 0.01; 0 keeps the lr constant")
        check_fraction("lr_floor", self.lr_floor, "the lowest lr as a fraction of lr; reference: 0.5")
        check_at_least("early_stop_epsilon", self.epsilon, 0, hint="reference: 1e-05; 0 and 0 disable early stopping")
        check_at_least("early_stop_delta", self.delta, 0, hint="reference: 2e-05")
        check_at_least("schedule_steps", self.schedule_steps, 1, hint="reference: 50; null: the formulas verbatim")

    def progress(self, i: int, num_steps: int) -> float:
        """The i-th step (i = 0 at t = T) of ``num_steps``, in the reference's step units."""
        return i if self.schedule_steps is None else i * self.schedule_steps / num_steps

    def lr_at(self, i: int, num_steps: int) -> float:
        """lr s max(lr_floor, 1 - lr_decay i') at i' = :meth:`progress`, s = max(1, schedule_steps / N): the
        reference's 1e-2 (1 - i / 100) at 50 steps. The floor (half the lr) only binds with ``schedule_steps``
        none beyond 50 steps, where the reference's formula would reach 0 (and NTI stop optimising)."""
        scale = 1.0 if self.schedule_steps is None else max(1.0, self.schedule_steps / num_steps)
        return self.lr * scale * max(self.lr_floor, 1 - self.lr_decay * self.progress(i, num_steps))

    def threshold_at(self, i: int, num_steps: int) -> float:
        """Early-stop level epsilon + i' delta at i' = :meth:`progress` (reference: 1e-5 + i 2e-5 at 50 steps)."""
        return early_stop_threshold(self.progress(i, num_steps), self.epsilon, self.delta)


class LaggedFlag:
    """A device-side boolean read one iteration late on CUDA (an event, a pinned copy: no stream sync);
    read at once on the CPU, where reading costs nothing."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.value, self.buf, self.event = True, None, None

    def push(self, flag: Tensor) -> None:
        if not self.cuda:
            self.value = bool(flag)
            return
        self.read()
        self.buf = torch.empty((), dtype=torch.bool, pin_memory=True)
        self.buf.copy_(flag, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def read(self) -> bool:
        if self.cuda and self.event is not None:
            self.event.synchronize()
            self.value, self.event = bool(self.buf), None
        return self.value


def per_sample_mse(a: Tensor, b: Tensor) -> Tensor:
    return ((a - b) ** 2).flatten(1).mean(1)


def track_trajectory(
    pred_fn: PredFn,
    schedule: Schedule,
    trajectory: Tensor,
    cond: Tensor,
    uncond_init: Tensor,
    guidance_scale: float,
    settings: TrackingSchedule,
    noise_bias: Tensor | None = None,
) -> dict[str, Tensor]:
    """Optimise per-step unconditional embeddings (and, if given, the noise bias at the first step).

    Args:
        trajectory: (N + 1, B, C, h, w) DDIM inversion trajectory z*_0 .. z*_N.
        cond: (B, L, D) source-prompt embeddings.
        uncond_init: (B, L, D) start of u_N (the null embedding for NTI; latent-TOP's chosen start).
        noise_bias: (B, C, h, w) start of latent-TOP's noise bias; None: no noise bias (NTI).

    Returns ``unconditional`` (B, N, L, D) with [:, k-1] the embedding of the step from level k, ``z_T``
    (B, C, h, w) the start latent, ``step_loss`` (B, N) the loss after each step's optimisation and
    ``inner_iterations`` (B, N) the updates each image used at each step (both in optimisation order: [:, 0] is
    the step from t = T), and ``z_0`` the end of the tracked trajectory (what sampling with these embeddings
    reaches).
    """
    n, B = schedule.num_steps, cond.shape[0]
    dev = cond.device
    emb = uncond_init.detach().clone()
    bias = None if noise_bias is None else noise_bias.detach().clone()
    z = trajectory[n] if bias is None else trajectory[n] + bias
    embs, losses, iterations = [], [], []
    for i, k in enumerate(range(n, 0, -1)):
        t = schedule.timesteps[k - 1]
        target = trajectory[k - 1]

        def step(z: Tensor, emb: Tensor, cond_pred: tuple[Tensor, Tensor]) -> Tensor:
            """The CFG step from level k (NPI eq. 1, 2) with the unconditional embedding ``emb``."""
            eps_u, x0_u = pred_fn(z, t, emb)
            eps = cfg(eps_u, cond_pred[0], guidance_scale)
            return schedule.move(z, eps, cfg(x0_u, cond_pred[1], guidance_scale), k, k - 1)

        with_bias = bias is not None and i == 0  # the noise bias only acts through the first step
        emb = emb.detach().clone().requires_grad_(True)  # warm start from u_{k+1}, in storage of its own
        params = [emb] + ([bias.requires_grad_(True)] if with_bias else [])
        states = [AdamState.zeros_like(p) for p in params]
        threshold = settings.threshold_at(i, n)
        lr = settings.lr_at(i, n)
        active = torch.ones(B, dtype=torch.bool, device=dev)
        used = torch.zeros(B, dtype=torch.long, device=dev)
        flag = LaggedFlag(dev)
        if not with_bias:
            with torch.no_grad():
                pred_c = pred_fn(z, t, cond)  # the conditional branch once per step (NTI reference)
        for _ in range(settings.num_inner_steps):
            # 1. The CFG DDIM step with the current embedding (NPI eq. 4), and its distance to z*_{k-1}.
            zt = trajectory[n] + bias if with_bias else z
            pc = pred_fn(zt, t, cond) if with_bias else pred_c
            loss = per_sample_mse(step(zt, emb, pc), target)
            # 2. A masked Adam step on the images still active (the reference steps before it checks the loss).
            grads = torch.autograd.grad(loss.sum(), params)
            for p, g, s in zip(params, grads, states):
                masked_adam_step(p, g, s, lr, active)
            used += active.long()
            # 3. Per-sample early stopping on that loss: < epsilon + i delta, decided on the device.
            active = still_active(active, loss, threshold)
            flag.push(active.any())
            if not flag.read():
                break
        # 4. Advance without grad, with the embedding as optimised.
        with torch.no_grad():
            emb = emb.detach()  # the masked Adam updated it in place; the next step works on a copy
            if with_bias:
                bias = bias.detach()
                z = trajectory[n] + bias
                z_T = z
            z = step(z, emb, pred_fn(z, t, cond) if with_bias else pred_c)
            losses.append(per_sample_mse(z, target))
        embs.append(emb)
        iterations.append(used)
    return {
        # optimised from t = T down; stored by level (index k-1 = the step from level k), as the sampler reads it
        "unconditional": torch.stack(embs[::-1], dim=1),
        "z_T": trajectory[n] if bias is None else z_T,
        "step_loss": torch.stack(losses, dim=1),
        "inner_iterations": torch.stack(iterations, dim=1),
        "z_0": z,
    }
