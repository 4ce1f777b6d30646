"""The rectified-flow families' shared base (SD 3 / 3.5, FLUX.1): DDIM in rescaled coordinates, the pipelines'
(resolution-dependent) shifted schedules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from ..ddim import FlowSchedule, Schedule, flow_norm
from ..errors import DiffinvError
from .conditioning import Conditioning
from .family import NoEmbeddedGuidance


def calculate_shift(image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float,
                    max_shift: float) -> float:
    """diffusers' ``calculate_shift`` (pipelines/flux/pipeline_flux.py), op for op: the resolution-dependent shift
    mu, linear in the image's token count, base_shift at base_seq_len and max_shift at max_seq_len."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def _flow_sigma(alpha: Tensor) -> Tensor:
    """The rectified-flow sigma of the DDIM level alpha = (1 - s)^2 / ((1 - s)^2 + s^2):
    s = sqrt(1 - alpha) / (sqrt(alpha) + sqrt(1 - alpha)) (no division by zero: the denominator is >= 1)."""
    return (1 - alpha).sqrt() / (alpha.sqrt() + (1 - alpha).sqrt())


@dataclass
class Flow(NoEmbeddedGuidance):
    """The rectified-flow families (SD 3 / 3.5, FLUX.1): a transformer trained on x_s = (1 - s) x0 + s eps,
    predicting v = eps - x0, solved as DDIM in rescaled coordinates.

    In the coordinates z = x / sqrt((1 - s)^2 + s^2) a rectified-flow latent is a variance-preserving one with
    alpha = (1 - s)^2 / ((1 - s)^2 + s^2), the noise is eps = x + (1 - s) v and the clean latent x0 = x - s v.
    The DDIM step from_x0(x0, eps, alpha') between two levels is exactly the Euler step x' = x + (s' - s) v (both
    are linear in x0 and eps with the same coefficients), and it needs no division, so it is exact at s = 1
    (alpha 0). Level 0 (s = 0) and level s = 1 are the latent itself (z = x). So every method and editor runs
    unchanged.

    The schedule starts at s = 1 (``max_sigma`` 1), pure noise, as the pipelines do: there alpha = 0 and x0 is not
    a function of eps, so every step takes ``predict``'s x0 (the sampler, CycleDiffusion's encoder, NTI's and
    latent-TOP's tracking), and EDICT's coupled step is the flow's own Euler step (:class:`diffinv.ddim.
    FlowSchedule`), invertible at s = 1. ``max_sigma`` < 1 clamps the top level (diffinv's earlier 0.999:
    sampling 1e-3 off the pipelines, at most 333 steps at shift 3).
    """

    default_max_shift: ClassVar[float]
    """The pipeline's ``max_shift`` where the scheduler config has none (calculate_shift's call)."""
    max_sigma: float = 1.0

    def sigma(self, backbone, t: Tensor, alpha: Tensor | None = None) -> Tensor:
        """s of the latent, float64: that of its level ``alpha`` (:func:`_flow_sigma`), else t / T (the timestep's
        own level, T = num_train_timesteps)."""
        if alpha is not None:
            return _flow_sigma(torch.as_tensor(alpha, dtype=torch.float64, device=backbone.device))
        return torch.as_tensor(t, device=backbone.device).double() / backbone.scheduler.config.num_train_timesteps

    def predict(self, backbone, z: Tensor, t: Tensor, cond: Conditioning,
                alpha: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(eps, x0) at the latent's own level s: x = z sqrt((1 - s)^2 + s^2), v = transformer(x, t),
        eps = x + (1 - s) v, x0 = x - s v (the class docstring)."""
        s = self.sigma(backbone, t, alpha)
        x = z * flow_norm(s).to(z.dtype)
        v = self.denoise(backbone, x, t, cond).to(z.dtype)
        return x + (1 - s).to(z.dtype) * v, x - s.to(z.dtype) * v

    def pipeline_sigmas(self, backbone, num_steps: int) -> np.ndarray | None:
        """The sigmas the family's pipeline passes to ``set_timesteps`` (None: the scheduler's own linspace)."""
        return None

    def mu(self, backbone, latent_size: tuple[int, int] | None) -> float | None:
        """The resolution-dependent shift where the scheduler config has ``use_dynamic_shifting`` (else None), as
        the pipelines compute it: calculate_shift((h / p) (w / p), base_image_seq_len, max_image_seq_len,
        base_shift, max_shift) for latents (h, w) (default: the native size) in p x p patches."""
        config = backbone.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return None
        side = self.sample_size(backbone)
        h, w = latent_size or (side, side)
        p = self.patch_size(backbone)
        return calculate_shift((h // p) * (w // p), config.get("base_image_seq_len", 256),
                               config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                               config.get("max_shift", self.default_max_shift))

    def schedule(self, backbone, num_steps: int, latent_size: tuple[int, int] | None = None) -> Schedule:
        """The scheduler's own N sigmas as the pipeline sets them (``set_timesteps(N, sigmas=..., mu=...)``: its
        shift, or mu for ``latent_size``), the top one at most ``max_sigma``; timesteps the scheduler's (s T)
        clamped alike; level k's alpha = (1 - s_k)^2 / ((1 - s_k)^2 + s_k^2) (max_sigma 1: the top alpha is 0)."""
        scheduler = backbone.scheduler
        scheduler.set_timesteps(num_steps, sigmas=self.pipeline_sigmas(backbone, num_steps),
                                mu=self.mu(backbone, latent_size))
        total = scheduler.config.num_train_timesteps
        sigmas = torch.sort(scheduler.sigmas[:num_steps].double().cpu().clamp(max=self.max_sigma)).values
        timesteps = torch.sort(scheduler.timesteps.float().cpu().clamp(max=float(self.max_sigma * total))).values
        if len(torch.unique(timesteps)) != num_steps:
            raise DiffinvError(f"{num_steps} steps put several levels at the top level's sigma {self.max_sigma} on "
                               "this flow-matching schedule (repeated timesteps): use fewer steps")
        signal, noise = (1 - sigmas) ** 2, sigmas**2
        alphas = torch.cat([torch.ones(1, dtype=torch.float64), signal / (signal + noise)])
        return FlowSchedule(timesteps=timesteps, alphas=alphas,
                            sigmas=torch.cat([torch.zeros(1, dtype=torch.float64), sigmas]))

    def max_steps(self, backbone) -> int:
        return int(backbone.scheduler.config.num_train_timesteps)

    def patch_size(self, backbone) -> int:
        return int(backbone.unet.config.patch_size)

    def sample_size(self, backbone) -> int:
        return int(backbone.unet.config.sample_size)


def _load_flow_core(source: str, kw: dict, wkw: dict, transformer_class) -> dict:
    """VAE, transformer (as ``unet``) and flow-matching scheduler of a flow family's folder."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    return {
        "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32, **wkw),
        "unet": transformer_class.from_pretrained(source, subfolder="transformer", torch_dtype=torch.float32, **wkw),
        "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler", **kw),
    }
