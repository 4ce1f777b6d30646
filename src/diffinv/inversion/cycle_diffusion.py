"""CycleDiffusion (Wu & De la Torre 2022, "Unifying diffusion models' latent space"): the DPM-Encoder inverts an
image into the latent code of the stochastic DDIM sampler, z_N and the noise of every step, and an edit samples
the target prompt with the same code. A baseline of latent-TOP's robustness experiments.

DPM-Encoder (their §3.1, with the DDIM paper's eq. 7/12/16 at eta):
    z_N ~ q(z_N | z0) = N(sqrt(a_N) z0, (1 - a_N) I)
    z_{k-1} ~ q_sigma(z_{k-1} | z_k, z0) for k = N .. 2, and z_0 = z0
    r_k = z_{k-1} - mean_theta(z_k, k), the sigma_k n_k that makes the sampler step land on z_{k-1}
where mean_theta = sqrt(a_{k-1}) x0_hat + sqrt(1 - a_{k-1} - sigma_k^2) eps~ under CFG at the source guidance
scale. Sampling from z_N with the stored r_k returns z0 exactly in exact arithmetic, for any sigma (the residual
is stored, not r_k / sigma_k, so eta = 0 or a final sigma of 0 need no division). In floating point it is exact
only where the sampler is stable: under CFG 7.5 each step amplifies the previous steps' round-off (measured on
the shapes model, 4 scenes, 50 steps: latent error up to 4e-2 in float32 and 7e-11 in float64 at w = 7.5; 2e-6 in
float32 at w = 1), and the residuals of a CFG-7.5 mean are far from the sigma_k n_k they stand for. So the code is
encoded, and the reconstruction sampled, at ``source_guidance_scale`` (1, as diffusers' CycleDiffusionPipeline);
the edits sample the target prompt at ``guidance_scale``.

``strength`` (diffusers' CycleDiffusionPipeline: 0.8; the authors' demo, the Stable-CycleDiffusion space: 0.7 with
eta 0.1 and 100 steps) starts the DPM-Encoder at level L = int(N strength): z_L ~ q(z_L | z0), the posterior chain
down to z0, residuals of the L steps from L; sampling starts at z_L. 1 (the paper's zero-shot editing from z_N)
by default.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..backbone import BackboneConfig
from ..ddim import Schedule, Variance, posterior_chain, step_residuals, strength_level
from ..editing.prompt_to_prompt import Editor
from ..errors import DiffinvError, check_at_least, check_finite
from ..guidance import cfg_eps
from ..seeds import keyed_normal
from .base import InversionMethod
from .record import Sampling


def dpm_encode(eps_fn: Callable[[Tensor, Tensor], Tensor], z0: Tensor, schedule: Schedule, eta: float,
               noise: Tensor, top: int | None = None) -> tuple[Tensor, Tensor]:
    """The DPM-Encoder: the posterior chain z_0 .. z_N (N + 1, B, ...) (z_0 = z0) and the residuals r_k stored at
    [k - 1] (N, B, ...). ``noise``: (N, B, ...) standard normal draws (one for z_N, one per posterior step);
    ``eps_fn(z, t)``: the guided noise prediction the sampler will use. ``top``: start at that level instead of N
    (a strength below 1): the chain's levels above it hold z_top and the residuals there are zeros."""
    chain = posterior_chain(z0, schedule, eta, noise, top=top)
    return chain, step_residuals(eps_fn, chain, schedule, eta, top=top)


class CycleDiffusion(InversionMethod):
    """CycleDiffusion: DPM-Encoder inversion at the source guidance scale, stochastic DDIM sampling with the
    stored noise. Reconstruction is exact by construction; edits keep the source's noise with the target prompt
    (the paper's zero-shot text-guided editing). Record: the chain as ``trajectory``, the residuals as
    ``extra.step_noise`` (N x latent floats: 3.3 MB per image at SD 512^2, 50 steps), eta and the reconstruction's
    guidance scale in its typed sampling: another method editing the record samples with the same code."""

    method_name = "cycle_diffusion"

    def __init__(self, backbone: BackboneConfig | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, source_guidance_scale: float = 1.0, eta: float = 1.0,
                 strength: float = 1.0, seed: int = 0, editor: Editor | None = None):
        """
        Args:
            backbone: The Stable Diffusion to use; default: the embedded shapes model.
            num_inference_steps: Steps of the encoder and the sampler (the paper's SD editing: 100; we use 50 as
                the other methods).
            guidance_scale: CFG scale w of the edits (the target prompts), sampled with the source's code.
            source_guidance_scale: CFG scale of the encoding and of the reconstruction, which it makes exact (1,
                as diffusers' CycleDiffusionPipeline: under CFG 7.5 the encoded chain amplifies float32 round-off
                step after step, and on the shapes model some reconstructions fell to 16 dB; at 1 the error
                stays near 1e-6 in latent space).
            eta: Stochasticity of the DDIM sampler (DDIM eq. 16): 1 = DDPM's posterior (the paper's); 0 reduces
                the code to z_N and step residuals of a deterministic sampler. diffusers' CycleDiffusionPipeline
                and the authors' demo use 0.1.
            strength: Encode and sample only from level L = int(N strength) of N (at least 1): z_L ~ q(z_L | z0),
                the posterior chain down to z0 (diffusers' CycleDiffusionPipeline: 0.8; the authors' demo: 0.7);
                1: from z_N, the paper's.
            seed: Run seed of the encoder's noise; each item draws its own from (seed, item id).
            editor: How target prompts edit: none (plain prompt swap), Prompt-to-Prompt or SDEdit.
        """
        super().__init__(backbone, num_inference_steps, guidance_scale, editor)
        if not 0 <= eta <= 1:
            raise DiffinvError(f"eta must be in [0, 1], got {eta}")
        check_finite({"source_guidance_scale": source_guidance_scale})
        check_at_least("source_guidance_scale", source_guidance_scale, 0, hint="1 reconstructs exactly")
        if not 0 < strength <= 1:
            raise DiffinvError(f"strength must be in (0, 1], got {strength}")
        self.eta, self.seed, self.source_guidance_scale = eta, seed, source_guidance_scale
        self.strength = strength

    variance: Variance = "ddim"
    """The stochastic step's direction coefficient (:data:`diffinv.ddim.Variance`): DDIM eq. 12/16 here, as the paper
    and diffusers' CycleDiffusionPipeline; DDPM inversion can take its authors' form."""


    noise_key = "dpm-encoder"
    """Key of the per-item noise (with the run seed and the item id)."""

    def chain(self, z0: Tensor, schedule: Schedule, noise: Tensor, top: int) -> Tensor:
        """The latents z_0 .. z_N the code makes the sampler visit: the DPM-Encoder's posterior chain from level
        ``top`` (the levels above it hold z_top, never read)."""
        return posterior_chain(z0, schedule, self.eta, noise, top=top)

    def pinned(self, plan: Sampling) -> dict[str, tuple[object, object]]:
        """The stochastic code's eta and direction form, and the reconstruction's scale (a record of this kind)."""
        if plan.step != "stochastic":
            return {}
        return {"eta": (self.eta, plan.eta), "variance": (self.variance, plan.variance),
                "source_guidance_scale": (self.source_guidance_scale, plan.guidance_scale)}

    def start_level(self, num_steps: int) -> int:
        """The level sampling starts from: L = int(N strength) (N: from z_N)."""
        return strength_level(num_steps, self.strength)

    def invert_latents(self, z0: Tensor, source_emb: Tensor, schedule: Schedule, ids: list[str] | None = None) -> dict:
        ids = ids if ids is not None else [str(b) for b in range(z0.shape[0])]
        null = self.backbone.encode_prompts([""]).expand_as(source_emb)
        noise = torch.stack([keyed_normal((schedule.num_steps, *z0.shape[1:]), self.seed, i, self.noise_key)
                             for i in ids], dim=1).to(z0)
        top = self.start_level(schedule.num_steps)

        def guided_eps(z: Tensor, t: Tensor) -> Tensor:
            return cfg_eps(self.backbone.eps, z, t, source_emb, null, self.source_guidance_scale)

        def guided_x0(z: Tensor, t: Tensor) -> Tensor:  # where alpha is 0 (the sampler does the same)
            return cfg_eps(lambda *a: self.backbone.predict(*a)[1], z, t, source_emb, null, self.source_guidance_scale)

        with torch.no_grad():
            chain = self.chain(z0, schedule, noise, top)
            residuals = step_residuals(guided_eps, chain, schedule, self.eta, top=top, variance=self.variance,
                                       x0_fn=guided_x0)
        # the code any method samples this record with
        sampling = Sampling(step="stochastic", eta=float(self.eta), variance=self.variance,
                            guidance_scale=float(self.source_guidance_scale),
                            start_level=top if top < schedule.num_steps else None)
        return {"trajectory": chain, "extra": {"step_noise": residuals.transpose(0, 1)}, "sampling": sampling}
