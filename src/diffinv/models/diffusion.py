"""The ε/v-prediction families' shared base (SD 1.x/2.x, SDXL): DDIM on the training schedule's alphas."""

from __future__ import annotations

import torch
from torch import Tensor

from ..ddim import Schedule, make_schedule, predict_x0
from ..errors import DiffinvError
from .conditioning import Conditioning
from .family import NoEmbeddedGuidance


class Diffusion(NoEmbeddedGuidance):
    """The ε/v-prediction families (SD 1.x/2.x, SDXL): the training schedule's alphas, DDIM on them."""

    def predict(self, backbone, z: Tensor, t: Tensor, cond: Conditioning,
                alpha: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(eps, x0) from the denoiser's output per the scheduler config's prediction_type, a_t = alphas_cumprod[t]:

        - epsilon: eps = out, x0 = (z - sqrt(1 - a) eps) / sqrt(a) with a = ``alpha`` (default a_t): NaN at a = 0;
        - v_prediction: eps = sqrt(a_t) v + sqrt(1 - a_t) z, x0 = sqrt(a_t) z - sqrt(1 - a_t) v (diffusers'
          DDIMScheduler.step), exact at a_t = 0 (zero terminal SNR: eps = z, x0 = -v);
        - sample: x0 = out, eps = (z - sqrt(a_t) x0) / sqrt(1 - a_t).
        """
        out = self.denoise(backbone, z, t, cond).to(z.dtype)
        kind = backbone.scheduler.config.prediction_type
        if kind == "epsilon":
            return out, predict_x0(z, out, backbone.alphas_cumprod[t] if alpha is None else alpha)
        a = backbone.alphas_cumprod[t].to(z.dtype)
        if kind == "v_prediction":
            return a.sqrt() * out + (1 - a).sqrt() * z, a.sqrt() * z - (1 - a).sqrt() * out
        if kind == "sample":
            return (z - a.sqrt() * out) / (1 - a).sqrt(), out
        raise DiffinvError(f"unsupported prediction_type {kind!r} in the model's scheduler config")

    def schedule(self, backbone, num_steps: int, latent_size: tuple[int, int] | None = None) -> Schedule:
        """The scheduler's own N timesteps (spacing, offset), levels at its alphas_cumprod; level 0 at its final
        alpha (1 with set_alpha_to_one). The same at every latent size."""
        backbone.scheduler.set_timesteps(num_steps)
        final = float(backbone.scheduler.final_alpha_cumprod)
        return make_schedule(backbone.alphas_cumprod.cpu(), backbone.scheduler.timesteps, final)

    def max_steps(self, backbone) -> int:
        """Every timestep (spacing and offset applied) must index the training schedule (SD's 'leading' spacing
        with steps_offset 1 allows 999 of its 1000)."""
        scheduler = backbone.scheduler
        total = scheduler.config.num_train_timesteps
        for n in range(total, 0, -1):
            try:
                scheduler.set_timesteps(n)
            except ValueError:
                continue
            if int(scheduler.timesteps.max()) < total and int(scheduler.timesteps.min()) >= 0:
                return n
        return 1

    def patch_size(self, backbone) -> int:
        return 1

    def sample_size(self, backbone) -> int:
        sample = backbone.unet.config.sample_size
        return sample if isinstance(sample, int) else sample[0]


def _load_vae_unet_scheduler(source: str, kw: dict, wkw: dict) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    return {
        "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32, **wkw),
        "unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=torch.float32, **wkw),
        # any scheduler config (PNDM, Euler, DDIM) gives the training schedule; diffinv's solver is DDIM's
        "scheduler": DDIMScheduler.from_pretrained(source, subfolder="scheduler", **kw),
    }
