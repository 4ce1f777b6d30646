"""Edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov & Michaeli, CVPR 2024): the noisy latents x_1 .. x_T
are drawn from x_0 independently (their eq. 6), and the noise maps z_t are whatever makes the DDPM sampler step
from x_t land exactly on x_{t-1} (eq. 5). They are stored, so sampling the source prompt with them reproduces x_0;
an edit samples the target prompt with the same maps, from x_{T - T_skip}. The noise maps and the stochastic
sampler are CycleDiffusion's (:func:`diffinv.ddim.step_residuals`, the stochastic step); only the chain differs.

Where the authors' code (inbarhub/DDPM_inversion, ``ddm_inversion/inversion_utils.py``) differs from the paper:

- At eta < 1 its step's direction coefficient is sqrt(1 - a_{t-1} - eta sigma_t^2) (``reverse_step``:
  ``1 - alpha_prod_t_prev - eta * variance``, sigma_t^2 DDPM's posterior variance) where DDIM eq. 12/16 (ours)
  subtracts sigma_eta^2 = eta^2 sigma_t^2; the same at eta = 1 (the paper's and their default).
  ``variance='authors'`` takes theirs; the noise maps absorb either, so reconstruction stays exact, but an edit
  samples its target prompt with the record's form.
- It zeroes the last step's noise map after inverting (``zs[0] = 0`` where ``zs`` is indexed from t_1, commit
  6b73448; ``zs[-1] = 0`` in the version indexed from t_T, commit 4ed036a: the step t_1 -> 0 either way), so its
  reconstruction lands on that step's mean mu_1, not on x_0. Ours keeps the map of eq. 5 and lands on x_0
  exactly; there is no option for theirs.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from ..backbone import BackboneConfig
from ..ddim import Schedule, independent_chain
from ..editing.prompt_to_prompt import Editor
from ..errors import DiffinvError
from .cycle_diffusion import CycleDiffusion


class DDPMInversion(CycleDiffusion):
    """Edit-friendly DDPM inversion with the paper's settings by default: 100 steps, eta = 1 (DDPM), inversion and
    reconstruction at CFG 3.5, edits at CFG 15 starting T_skip = 36 steps below pure noise. Record: the chain as
    ``trajectory``, the noise maps sigma_t z_t as ``extra.step_noise`` (N x latent floats: 6.6 MB per image at SD
    512^2 and 100 steps, 102 KB at the shapes model's 4x8x8 latents; zeros above the start level, never
    computed), eta, the variance form, the reconstruction's CFG scale and the start level in its typed sampling.

    It takes no ``strength``: ``skip`` is its start level (T - round(skip T), where CycleDiffusion's strength
    starts at int(strength T)), and the whole chain is drawn whatever the start (eq. 6 noises each level on its
    own)."""

    method_name = "ddpm_inversion"
    noise_key = "ddpm-inversion"

    def __init__(self, backbone: BackboneConfig | None = None, num_inference_steps: int = 100,
                 guidance_scale: float = 15.0, source_guidance_scale: float = 3.5, skip: float = 0.36,
                 eta: float = 1.0, variance: Literal["ddim", "authors"] = "ddim", seed: int = 0,
                 editor: Editor | None = None):
        """
        Args:
            backbone: The Stable Diffusion to use; default: the embedded shapes model.
            num_inference_steps: Steps T of the inversion and the sampler (the paper: 100).
            guidance_scale: CFG scale of the edits (the paper: 15).
            source_guidance_scale: CFG scale of the inversion with the source prompt and of the reconstruction
                (the paper: 3.5).
            skip: T_skip as a fraction of the steps: sampling starts at level T - round(skip T) from the stored
                x_{T - T_skip} (the paper: 36 of 100; 0 starts from x_T).
            eta: Stochasticity of the sampler (DDIM eq. 16; the paper: 1, DDPM).
            variance: The sampler's direction coefficient at eta < 1: 'ddim' sqrt(1 - a_{t-1} - eta^2 sigma_t^2)
                (DDIM eq. 12/16, the paper's); 'authors' sqrt(1 - a_{t-1} - eta sigma_t^2) (their code's
                ``reverse_step``). The same at eta = 1.
            seed: Run seed of the noisy latents x_t; each item draws its own from (seed, item id).
            editor: How target prompts edit: none (plain prompt swap), Prompt-to-Prompt or SDEdit.
        """
        super().__init__(backbone, num_inference_steps, guidance_scale, source_guidance_scale, eta=eta, seed=seed,
                         editor=editor)
        if not 0 <= skip < 1:
            raise DiffinvError(f"skip must be in [0, 1), got {skip}")
        if eta == 0:
            raise DiffinvError("eta must be in (0, 1] (eta = 0 leaves no noise to invert), got 0")
        if variance not in ("ddim", "authors"):
            raise DiffinvError(f"variance must be 'ddim' or 'authors', got {variance!r}")
        self.skip, self.variance = skip, variance

    def chain(self, z0: Tensor, schedule: Schedule, noise: Tensor, top: int) -> Tensor:
        return independent_chain(z0, schedule, noise)  # eq. 6 (every level); the maps of eq. 5 are the residuals

    def start_level(self, num_steps: int) -> int:
        return max(1, num_steps - round(self.skip * num_steps))
