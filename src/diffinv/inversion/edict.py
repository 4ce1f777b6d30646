"""EDICT (Wallace, Gokul & Naik, CVPR 2023, "Exact diffusion inversion via coupled transformations"): two coupled
latent sequences x, y, each DDIM-stepped with the noise predicted from the other, then mixed with weight p; every
operation is affine in the sequence it updates, so inversion is exact by construction.

Sampling, level k -> k - 1 (their eq. 14; the DDIM step a_t z + b_t eps is :func:`diffinv.ddim.ddim_step`)::

    x_inter = step(x_k, eps(y_k, t_k))            y_inter = step(y_k, eps(x_inter, t_k))
    x_{k-1} = p x_inter + (1 - p) y_inter         y_{k-1} = p y_inter + (1 - p) x_{k-1}

Inversion, level k - 1 -> k (their eq. 15), undoes it in reverse order::

    y_inter = (y_{k-1} - (1 - p) x_{k-1}) / p     x_inter = (x_{k-1} - (1 - p) y_inter) / p
    y_k = step^-1(y_inter, eps(x_inter, t_k))     x_k = step^-1(x_inter, eps(y_k, t_k))

eps is the CFG prediction of the source prompt (null prompt as unconditional) at the guidance scale the
reconstruction uses. Sampling is :func:`diffinv.editing.sampler.sample` with ``coupled``.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

from ..backbone import BackboneConfig
from ..ddim import Schedule, ddim_step
from ..editing.prompt_to_prompt import Editor
from ..errors import DiffinvError
from ..guidance import cfg_eps
from .base import InversionMethod
from .record import Inversion


def edict_invert(eps_fn: Callable[[Tensor, Tensor], Tensor], z0: Tensor, schedule: Schedule,
                 p: float) -> tuple[Tensor, Tensor]:
    """EDICT inversion from x_0 = y_0 = z0: the x sequence (N + 1, B, ...) and y_N (B, ...)."""
    x = y = z0
    xs = [x]
    for k in range(1, schedule.num_steps + 1):
        t, a_lo, a_hi = schedule.timesteps[k - 1], schedule.alphas[k - 1].to(z0.dtype), schedule.alphas[k].to(z0.dtype)
        y_inter = (y - (1 - p) * x) / p  # undo the mixing (eq. 15)
        x_inter = (x - (1 - p) * y_inter) / p
        y = ddim_step(y_inter, eps_fn(x_inter, t), a_lo, a_hi)
        x = ddim_step(x_inter, eps_fn(y, t), a_lo, a_hi)
        xs.append(x)
    return torch.stack(xs), y


class EDICT(InversionMethod):
    """EDICT with the paper's settings by default (p = 0.93, CFG 3 for inversion, reconstruction and edits, the
    latents in float64 as the authors run them). Record: the x sequence as ``trajectory`` and y_N as
    ``extra.edict_y_T``, p in its metadata; any method sampling the record samples it coupled."""

    method_name = "edict"

    def __init__(self, backbone: BackboneConfig | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 3.0, mix: float = 0.93,
                 latent_dtype: Literal["float64", "float32"] = "float64", editor: Editor | None = None):
        """
        Args:
            backbone: The Stable Diffusion to use; default: the embedded shapes model.
            num_inference_steps: DDIM steps of inversion and sampling (the paper: 50).
            guidance_scale: CFG scale of inversion, reconstruction and edits (the paper: 3).
            mix: Mixing weight p of the coupling layers (the paper: 0.93); 1 would decouple the sequences (two
                plain DDIM runs) and lose exactness.
            latent_dtype: Arithmetic of the two sequences and their mixing ('float64' as the authors' code: each
                inverse mixing divides by p, so float32 round-off grows step after step); the UNet keeps its own.
            editor: How target prompts edit: none (plain prompt swap), Prompt-to-Prompt or SDEdit.
        """
        super().__init__(backbone, num_inference_steps, guidance_scale, editor)
        if not 0 < mix < 1:
            raise DiffinvError(f"mix must be in (0, 1), got {mix}")
        self.mix, self.latent_dtype = mix, latent_dtype

    def unconditional(self, inversion: Inversion) -> Tensor:
        return self.backbone.encode_prompts([""])[0]

    def invert_latents(self, z0: Tensor, source_emb: Tensor, schedule: Schedule, ids: list[str] | None = None) -> dict:
        null = self.backbone.encode_prompts([""]).expand_as(source_emb)
        z0 = z0.to(getattr(torch, self.latent_dtype))

        def guided_eps(z: Tensor, t: Tensor) -> Tensor:
            return cfg_eps(self.backbone.eps, z, t, source_emb, null, self.guidance_scale)

        with torch.no_grad():
            xs, y_T = edict_invert(guided_eps, z0, schedule, self.mix)
        return {"trajectory": xs, "extra": {"edict_y_T": y_T}, "meta": {"mix": repr(self.mix)}}
