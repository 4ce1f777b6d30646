"""EDICT (Wallace, Gokul & Naik, CVPR 2023, "Exact diffusion inversion via coupled transformations"): two coupled
latent sequences x, y, each DDIM-stepped with the noise predicted from the other, then mixed with weight p; every
operation is affine in the sequence it updates, so inversion is exact by construction.

Sampling, level k -> k - 1 (their eq. 14; the step a_t z + b_t eps is the schedule's: DDIM, :func:`diffinv.ddim.ddim_step`;
on a flow its Euler step, which stays invertible at s = 1)::

    x_inter = step(x_k, eps(y_k, t_k))            y_inter = step(y_k, eps(x_inter, t_k))
    x_{k-1} = p x_inter + (1 - p) y_inter         y_{k-1} = p y_inter + (1 - p) x_{k-1}

Inversion, level k - 1 -> k (their eq. 15), undoes it in reverse order::

    y_inter = (y_{k-1} - (1 - p) x_{k-1}) / p     x_inter = (x_{k-1} - (1 - p) y_inter) / p
    y_k = step^-1(y_inter, eps(x_inter, t_k))     x_k = step^-1(x_inter, eps(y_k, t_k))

eps is the CFG prediction of the source prompt (null prompt as unconditional) at the guidance scale the
reconstruction uses. Sampling is :class:`diffinv.steps.CoupledStep`.

Two options follow the authors' code (salesforce/EDICT ``coupled_stablediffusion`` and ``EDICT_editing``; diffusers'
community ``EDICTPipeline`` has the same defaults); the paper's behaviour is the default:

- ``leapfrog`` (theirs: ``leapfrog_steps=True``): at the steps counted odd from the first sampled one (level k with
  (top - k) odd, top the start level) the y sequence is stepped first, y_inter = step(y_k, eps(x_k)), then
  x_inter = step(x_k, eps(y_inter)); the mixing is unchanged. Our inversion undoes each level in the order its
  sampling step used, so it is exact for any step count. salesforce/EDICT's inversion does the same (it counts
  ``orig_i = len(timesteps) - (i + 1)``); diffusers' ``EDICTPipeline.prepare_latents`` swaps at the even inversion
  steps counted from the lowest level, which undoes its sampler only when the sampled step count is even: there
  the three orders coincide.
- ``strength`` (theirs: ``init_image_strength=0.8``): invert only to level L = int(N strength) and sample the L
  steps from there (their ``t_limit = steps - int(steps * init_image_strength)``).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

from ..backbone import BackboneConfig
from ..ddim import Schedule, strength_level
from ..editing.prompt_to_prompt import Editor
from ..errors import DiffinvError
from ..guidance import cfg
from ..steps.coupled import y_first
from .base import InversionMethod
from .record import Sampling


def edict_invert(pred_fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor | None]], z0: Tensor,
                 schedule: Schedule, p: float, top: int | None = None, leapfrog: bool = False) -> tuple[Tensor, Tensor]:
    """EDICT inversion from x_0 = y_0 = z0 up to level ``top`` (None: N): the x sequence (N + 1, B, ...), whose
    levels above ``top`` hold x_top (never read), and y_top (B, ...). ``pred_fn(z, t)``: the guided (eps, x0) of
    latents z (x0 may be None: the schedule's DDIM step reads eps only; a flow's Euler step needs x0). Each step is
    :meth:`Schedule.move <diffinv.ddim.Schedule.move>` upwards, the inverse of the sampler's. ``leapfrog``: undo the
    authors' alternating order (:func:`~diffinv.steps.coupled.y_first`) of a run sampled from ``top``."""
    top = schedule.num_steps if top is None else top

    def step(z: Tensor, other: Tensor, k: int) -> Tensor:
        eps, x0 = pred_fn(other, schedule.timesteps[k - 1])
        return schedule.move(z, eps, x0, k - 1, k)

    x = y = z0
    xs = [x]
    for k in range(1, top + 1):
        y_inter = (y - (1 - p) * x) / p  # undo the mixing (eq. 15)
        x_inter = (x - (1 - p) * y_inter) / p
        if y_first(top, k, leapfrog):  # sampled y first at this level: undo x first
            x = step(x_inter, y_inter, k)
            y = step(y_inter, x, k)
        else:  # eq. 15
            y = step(y_inter, x_inter, k)
            x = step(x_inter, y, k)
        xs.append(x)
    return torch.stack(xs + [x] * (schedule.num_steps - top)), y


class EDICT(InversionMethod):
    """EDICT with the paper's settings by default (p = 0.93, CFG 3 for inversion, reconstruction and edits, the
    latents in float64 as the authors run them, x first at every step, the whole way to level N). Record: the x
    sequence as ``trajectory`` and y at the start level as ``extra.edict_y_T``, p, the leapfrog order, the start
    level and the CFG scale in its typed sampling; any method samples the record coupled."""

    method_name = "edict"

    def __init__(self, backbone: BackboneConfig | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 3.0, mix: float = 0.93,
                 latent_dtype: Literal["float64", "float32"] = "float64", leapfrog: bool = False,
                 strength: float = 1.0, editor: Editor | None = None):
        """
        Args:
            backbone: The Stable Diffusion to use; default: the embedded shapes model.
            num_inference_steps: DDIM steps of inversion and sampling (the paper: 50).
            guidance_scale: CFG scale of inversion, reconstruction and edits (the paper: 3).
            mix: Mixing weight p of the coupling layers (the paper: 0.93); 1 would decouple the sequences (two
                plain DDIM runs) and lose exactness.
            latent_dtype: Arithmetic of the two sequences and their mixing ('float64' as the authors' code: each
                inverse mixing divides by p, so float32 round-off grows step after step); the UNet keeps its own.
            leapfrog: Step the y sequence first on alternate steps (those counted odd from the first sampled
                step), as the authors' code does (``leapfrog_steps=True``, also diffusers' EDICTPipeline);
                false: x first at every step, the paper's eq. 14/15. Exact either way, for any step count.
            strength: Invert only to level L = int(N strength) of N (at least 1) and sample the L steps from
                there (the authors' editing entry point: ``init_image_strength=0.8``); 1: the whole way, the
                paper's.
            editor: How target prompts edit: none (plain prompt swap), Prompt-to-Prompt or SDEdit.
        """
        super().__init__(backbone, num_inference_steps, guidance_scale, editor)
        if not 0 < mix < 1:
            raise DiffinvError(f"mix must be in (0, 1), got {mix}")
        if not 0 < strength <= 1:
            raise DiffinvError(f"strength must be in (0, 1], got {strength}")
        self.mix, self.latent_dtype = mix, latent_dtype
        self.leapfrog, self.strength = leapfrog, strength

    def pinned(self, plan: Sampling) -> dict[str, tuple[object, object]]:
        """The coupling's mixing weight and update order (a coupled record)."""
        if plan.step != "coupled":
            return {}
        return {"mix": (self.mix, plan.mix), "leapfrog": (self.leapfrog, plan.leapfrog)}

    def check_items(self, items) -> None:
        """Also refuse, before any work, a start level of alpha 0 (a zero-terminal-SNR model's top level): the
        coupled step into it maps both sequences onto the noise prediction, which no inverse step can undo."""
        super().check_items(items)
        if any(i.inversion is None for i in items):
            schedule = self.backbone.schedule(self.num_inference_steps)
            top = strength_level(schedule.num_steps, self.strength)
            if not schedule.invertible_from(top):
                raise DiffinvError(f"EDICT cannot invert to level {top} of this model's schedule: its alpha is 0 (zero "
                                   "terminal SNR), where the coupled step is not invertible; give --model.strength "
                                   f"below 1 (e.g. {1 - 1 / schedule.num_steps:.2f})")

    def invert_latents(self, z0: Tensor, source_emb: Tensor, schedule: Schedule, ids: list[str] | None = None) -> dict:
        null = self.backbone.encode_prompts([""]).expand_as(source_emb)
        z0 = z0.to(getattr(torch, self.latent_dtype))
        top = strength_level(schedule.num_steps, self.strength)

        def guided(z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            """The CFG prediction (eps, x0) of the source prompt, both branches in one call (NPI eq. 1)."""
            eps, x0 = self.backbone.predict(torch.cat([z, z]), t, torch.cat([source_emb, null]))
            B, w = z.shape[0], self.guidance_scale
            return cfg(eps[B:], eps[:B], w), cfg(x0[B:], x0[:B], w)

        with torch.no_grad():
            xs, y_top = edict_invert(guided, z0, schedule, self.mix, top=top, leapfrog=self.leapfrog)
        sampling = Sampling(step="coupled", mix=self.mix, leapfrog=self.leapfrog,
                            start_level=top if top < schedule.num_steps else None,
                            guidance_scale=float(self.guidance_scale))
        return {"trajectory": xs, "extra": {"edict_y_T": y_top}, "sampling": sampling}
