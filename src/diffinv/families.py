"""Model families: what differs between SD 1.x/2.x, SDXL, SD 3 / 3.5 and FLUX.1, behind one small interface.

A family says which components a diffusers folder holds, loads them, turns prompts into one *conditioning
tensor* per prompt, calls the denoiser with it, gives the noise and clean-latent predictions (eps, x0) that the
DDIM solver needs (from ε-, v-, sample or flow-velocity prediction) and the schedule of an N-step run. The
methods, editors and the sampler only ever see that tensor (B, L, D): its first rows are the text tokens the
cross-attention (SD 3, FLUX: joint attention) reads, and a family may append a row of its own (SDXL, SD 3,
FLUX: the pooled text embedding). So null-text inversion optimises the whole of it (the pooled embedding too),
negative-prompt inversion swaps it whole, and Prompt-to-Prompt sees the token rows only, through
``unet.set_attn_processor``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
import torch
from torch import Tensor

from .ddim import FlowSchedule, Schedule, make_schedule, predict_x0
from .errors import DiffinvError


class Family(Protocol):
    """One Stable Diffusion family (see the module docstring)."""

    name: ClassVar[str]
    components: ClassVar[tuple[str, ...]]
    """The sub-folders a diffusers folder of this family must hold."""

    def load(self, source: str, kw: dict, wkw: dict) -> dict:
        """The components by name (``from_pretrained`` with ``kw``; weights with ``wkw``, which adds the variant)."""

    def encode(self, backbone, prompts: list[str]) -> Tensor:
        """(B, L, D) float32 conditioning of the prompts (already checked against the tokenizer's limit)."""

    def denoise(self, backbone, z: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """The denoiser's raw output for latents z (B, C, h, w) at timestep t under conditioning ``cond``."""

    def predict(self, backbone, z: Tensor, t: Tensor, cond: Tensor,
                alpha: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(eps, x0): the DDIM-coordinate noise and clean-latent predictions for latents z that sit at the level
        whose alpha is ``alpha`` (a 0-d float64 tensor; None: the timestep t's own level, the sampling case),
        under timestep t; z = sqrt(alpha) x0 + sqrt(1 - alpha) eps."""

    def eps(self, backbone, z: Tensor, t: Tensor, cond: Tensor, alpha: Tensor | None = None) -> Tensor:
        """The noise prediction the DDIM solver needs: ``predict(...)[0]``."""

    def schedule(self, backbone, num_steps: int, latent_size: tuple[int, int] | None = None) -> Schedule:
        """Timesteps and DDIM levels of an N-step run on latents of ``latent_size`` (h, w) (None: the model's
        native size; only resolution-dependent schedules read it)."""

    def max_steps(self, backbone) -> int:
        """The most steps the model's scheduler allows."""

    def patch_size(self, backbone) -> int:
        """Latent sides must be multiples of this (the denoiser's patches: SD 3's patch_size, FLUX's 2x2 packing)."""

    def sample_size(self, backbone) -> int:
        """The model's native latent side."""


class Diffusion:
    """The ε/v-prediction families (SD 1.x/2.x, SDXL): the training schedule's alphas, DDIM on them."""

    def predict(self, backbone, z: Tensor, t: Tensor, cond: Tensor,
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

    def eps(self, backbone, z: Tensor, t: Tensor, cond: Tensor, alpha: Tensor | None = None) -> Tensor:
        """eps_theta: ``predict(...)[0]`` (at the timestep's alphas_cumprod whatever ``alpha`` is)."""
        return self.predict(backbone, z, t, cond, alpha)[0]

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


def _tokens(tokenizer, prompts: list[str], device) -> Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def _clip_states(backbone, prompts: list[str]) -> tuple[list[Tensor], list[Tensor]]:
    """Both CLIP encoders' penultimate hidden states and first outputs (SDXL, SD 3), float32. The first output of
    an encoder with a projection is its projected pooled embedding (text_embeds); SDXL's first encoder has none
    and SDXL reads the second's only."""
    states, pooled = [], []
    for tokenizer, encoder in ((backbone.tokenizer, backbone.text_encoder),
                               (backbone.tokenizer_2, backbone.text_encoder_2)):
        out = encoder(_tokens(tokenizer, prompts, backbone.device), output_hidden_states=True)
        states.append(out.hidden_states[-2].float())
        pooled.append(out[0].float())
    return states, pooled


def _with_pooled_row(tokens: Tensor, pooled: Tensor, family: str) -> Tensor:
    """(B, L, D) token states and (B, P) pooled embedding as one (B, L + 1, D) conditioning, the pooled embedding
    in the first P entries of the last row (the rest zero)."""
    width = tokens.shape[-1]
    if pooled.shape[-1] > width:
        raise DiffinvError(f"{family}'s pooled embedding ({pooled.shape[-1]}) is wider than its token states ({width})")
    return torch.cat([tokens, torch.nn.functional.pad(pooled, (0, width - pooled.shape[-1]))[:, None]], dim=1)


def _load_vae_unet_scheduler(source: str, kw: dict, wkw: dict) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    return {
        "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32, **wkw),
        "unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=torch.float32, **wkw),
        # any scheduler config (PNDM, Euler, DDIM) gives the training schedule; diffinv's solver is DDIM's
        "scheduler": DDIMScheduler.from_pretrained(source, subfolder="scheduler", **kw),
    }


@dataclass
class StableDiffusion(Diffusion):
    """SD 1.x/2.x: one CLIP text encoder; the conditioning is its last hidden states (B, 77, 768 or 1024)."""

    name: ClassVar[str] = "SD 1.x/2.x"
    components: ClassVar[tuple[str, ...]] = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")

    def load(self, source: str, kw: dict, wkw: dict) -> dict:
        from transformers import CLIPTextModel, CLIPTokenizer

        return {
            **_load_vae_unet_scheduler(source, kw, wkw),
            "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=torch.float32,
                                                          **wkw),
            "tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw),
        }

    def encode(self, backbone, prompts: list[str]) -> Tensor:
        return backbone.text_encoder(_tokens(backbone.tokenizer, prompts, backbone.device))[0].float()

    def denoise(self, backbone, z: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        dtype = next(backbone.unet.parameters()).dtype
        return backbone.unet(z.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample


@dataclass
class StableDiffusionXL(Diffusion):
    """SDXL: two CLIP text encoders, the pooled embedding and the added time ids (as diffusers' SDXL pipeline).

    Conditioning (B, 77 + 1, D1 + D2): rows 0..76 are both encoders' penultimate hidden states side by side (what
    the cross-attention reads); row 77 holds the second encoder's pooled, projected embedding in its first P
    entries (the rest zero). The time ids (original size, crop top-left, target size) are the latents' own size
    in pixels with no crop: the image as diffinv fitted it. The empty prompt is all zeros where the model says
    so (``force_zeros_for_empty_prompt``, SDXL base: true), as the pipeline's negative prompt.
    """

    name: ClassVar[str] = "SDXL"
    components: ClassVar[tuple[str, ...]] = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                             "unet", "scheduler")
    force_zeros_for_empty_prompt: bool = True

    def load(self, source: str, kw: dict, wkw: dict) -> dict:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        return {
            **_load_vae_unet_scheduler(source, kw, wkw),
            "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=torch.float32,
                                                          **wkw),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2",
                                                                          dtype=torch.float32, **wkw),
            "tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw),
            "tokenizer_2": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kw),
        }

    def encode(self, backbone, prompts: list[str]) -> Tensor:
        states, pooled = _clip_states(backbone, prompts)
        cond = _with_pooled_row(torch.cat(states, dim=-1), pooled[-1], self.name)  # the second encoder's pooled
        if self.force_zeros_for_empty_prompt:
            empty = torch.tensor([not p for p in prompts], device=cond.device).view(-1, 1, 1)
            cond = torch.where(empty, torch.zeros_like(cond), cond)
        return cond

    def denoise(self, backbone, z: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        unet = backbone.unet
        dtype = next(unet.parameters()).dtype
        pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        h, w = z.shape[-2] * backbone.vae_scale_factor, z.shape[-1] * backbone.vae_scale_factor
        time_ids = torch.tensor([h, w, 0, 0, h, w], device=z.device, dtype=dtype).expand(z.shape[0], 6)
        added = {"text_embeds": cond[:, -1, :pooled_dim].to(dtype), "time_ids": time_ids}
        return unet(z.to(dtype), t, encoder_hidden_states=cond[:, :-1].to(dtype), added_cond_kwargs=added).sample


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
class Flow:
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
    FlowSchedule`), invertible at s = 1. ``max_sigma`` < 1 clamps the top level (the 0.999 of diffinv before
    0.2: sampling 1e-3 off the pipelines, at most 333 steps at shift 3).
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

    def predict(self, backbone, z: Tensor, t: Tensor, cond: Tensor,
                alpha: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(eps, x0) at the latent's own level s: x = z sqrt((1 - s)^2 + s^2), v = transformer(x, t),
        eps = x + (1 - s) v, x0 = x - s v (the class docstring)."""
        s = self.sigma(backbone, t, alpha)
        x = z * ((1 - s) ** 2 + s**2).sqrt().to(z.dtype)
        v = self.denoise(backbone, x, t, cond).to(z.dtype)
        return x + (1 - s).to(z.dtype) * v, x - s.to(z.dtype) * v

    def eps(self, backbone, z: Tensor, t: Tensor, cond: Tensor, alpha: Tensor | None = None) -> Tensor:
        """eps = x + (1 - s) v: ``predict(...)[0]``."""
        return self.predict(backbone, z, t, cond, alpha)[0]

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


def _load_t5(source: str, encoder: str, tokenizer: str, kw: dict, wkw: dict) -> tuple:
    """The T5 encoder and its tokenizer from the sub-folders ``encoder`` and ``tokenizer``: T5TokenizerFast, the
    class both pipelines declare (AutoTokenizer would look for a model config.json in the tokenizer's folder, which
    a hub snapshot read offline does not have)."""
    from transformers import T5EncoderModel, T5TokenizerFast

    return (T5EncoderModel.from_pretrained(source, subfolder=encoder, dtype=torch.float32, **wkw),
            T5TokenizerFast.from_pretrained(source, subfolder=tokenizer, **kw))


def _t5_states(tokenizer, encoder, prompts: list[str], length: int, device) -> Tensor:
    """T5's last hidden states (B, length, J) float32, as the SD 3 and FLUX pipelines' ``_get_t5_prompt_embeds``:
    padded to ``length`` tokens (max_length, truncation, with the closing </s>)."""
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                    return_tensors="pt").input_ids.to(device)
    return encoder(ids, output_hidden_states=False)[0].float()


def first_line(error: Exception) -> str:
    """The error's message's first line, at most 300 characters (one-line error reports)."""
    return (str(error).splitlines() or [""])[0][:300]


@dataclass
class StableDiffusion3(Flow):
    """SD 3 / 3.5: rectified flow (:class:`Flow`), a joint-attention transformer in patches, two CLIPs and T5.

    Conditioning (B, 77 + T + 1, J) as diffusers' SD3 pipeline builds it: CLIP-L's and CLIP-G's penultimate
    states side by side, zero-padded to T5's width J, then T5's T = ``t5_tokens`` states (zeros where the model
    has no T5: diffusers' "T5 off"); the last row holds both CLIPs' pooled embeddings. ``t5``: the folder has a
    T5 (its model_index.json lists a text_encoder_3): it must load, else the load stops.
    """

    name: ClassVar[str] = "SD 3/3.5"
    components: ClassVar[tuple[str, ...]] = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                             "transformer", "scheduler")
    default_max_shift: ClassVar[float] = 1.16
    t5_tokens: int = 256
    t5: bool = False

    def load(self, source: str, kw: dict, wkw: dict) -> dict:
        from diffusers import SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        parts = _load_flow_core(source, kw, wkw, SD3Transformer2DModel)
        for sub in ("text_encoder", "text_encoder_2"):
            parts[sub] = CLIPTextModelWithProjection.from_pretrained(source, subfolder=sub, dtype=torch.float32,
                                                                     **wkw)
        for sub in ("tokenizer", "tokenizer_2"):
            parts[sub] = CLIPTokenizer.from_pretrained(source, subfolder=sub, **kw)
        parts["text_encoder_3"] = parts["tokenizer_3"] = None  # diffusers' "T5 off"
        if self.t5:
            try:
                parts["text_encoder_3"], parts["tokenizer_3"] = _load_t5(source, "text_encoder_3", "tokenizer_3",
                                                                         kw, wkw)
            except Exception as e:  # noqa: BLE001 - one line naming the folder and the error
                raise DiffinvError("the model has a T5 text encoder (text_encoder_3), which did not "
                                   f"load: {type(e).__name__}: {first_line(e)}") from e
        return parts

    def encode(self, backbone, prompts: list[str]) -> Tensor:
        states, pooled = _clip_states(backbone, prompts)
        width = backbone.unet.config.joint_attention_dim
        if backbone.text_encoder_3 is None:
            t5 = torch.zeros(len(prompts), self.t5_tokens, width, device=backbone.device)
        else:
            t5 = _t5_states(backbone.tokenizer_3, backbone.text_encoder_3, prompts, self.t5_tokens, backbone.device)
        clip = torch.cat(states, dim=-1)
        tokens = torch.cat([torch.nn.functional.pad(clip, (0, width - clip.shape[-1])), t5], dim=1)
        return _with_pooled_row(tokens, torch.cat(pooled, dim=-1), self.name)

    def denoise(self, backbone, z: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        model = backbone.unet
        dtype = next(model.parameters()).dtype
        pooled = cond[:, -1, : model.config.pooled_projection_dim]
        timestep = torch.as_tensor(t, device=z.device).float().expand(z.shape[0])
        return model(hidden_states=z.to(dtype), encoder_hidden_states=cond[:, :-1].to(dtype),
                     pooled_projections=pooled.to(dtype), timestep=timestep).sample


def _pack(z: Tensor) -> Tensor:
    """FluxPipeline._pack_latents: (B, C, h, w) -> (B, (h/2)(w/2), 4C), each 2x2 patch one token."""
    b, c, h, w = z.shape
    return z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """FluxPipeline._unpack_latents: (B, (h/2)(w/2), 4C) -> (B, C, h, w), the inverse of :func:`_pack`."""
    b, _, d = tokens.shape
    return tokens.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def _image_ids(h: int, w: int, device, dtype) -> Tensor:
    """FluxPipeline._prepare_latent_image_ids(h, w): (h w, 3) position ids (0, row, column) of the packed tokens."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


@dataclass
class Flux(Flow):
    """FLUX.1 (dev, schnell): rectified flow (:class:`Flow`), a transformer on 2x2-packed 16-channel latents, as
    diffusers' FluxPipeline.

    Conditioning (B, T + 1, J): T5's T = ``max_sequence_length`` token states (``text_encoder_2``), then a row
    holding CLIP-L's pooled output (``text_encoder``, CLIPTextModel's pooler_output) in its first entries. The
    latents stay (B, 16, h, w): ``denoise`` packs them into 2x2 patches with their position ids and unpacks the
    velocity. ``guidance``: FLUX.1-dev's embedded guidance scale, given to the transformer where its config has
    ``guidance_embeds`` (schnell has none). Sampling sigmas as the pipeline's: linspace(1, 1/N, N), shifted by
    the resolution-dependent mu.
    """

    name: ClassVar[str] = "FLUX.1"
    components: ClassVar[tuple[str, ...]] = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                             "transformer", "scheduler")
    default_max_shift: ClassVar[float] = 1.15
    max_sequence_length: int = 512
    guidance: float = 3.5

    def load(self, source: str, kw: dict, wkw: dict) -> dict:
        from diffusers import FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer

        parts = _load_flow_core(source, kw, wkw, FluxTransformer2DModel)
        parts["text_encoder"] = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=torch.float32,
                                                              **wkw)
        parts["tokenizer"] = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
        parts["text_encoder_2"], parts["tokenizer_2"] = _load_t5(source, "text_encoder_2", "tokenizer_2", kw, wkw)
        return parts

    def encode(self, backbone, prompts: list[str]) -> Tensor:
        """FluxPipeline.encode_prompt: T5's states (prompt_embeds) and CLIP's pooled output (pooled_prompt_embeds)."""
        clip = backbone.text_encoder(_tokens(backbone.tokenizer, prompts, backbone.device), output_hidden_states=False)
        t5 = _t5_states(backbone.tokenizer_2, backbone.text_encoder_2, prompts, self.max_sequence_length,
                        backbone.device)
        return _with_pooled_row(t5, clip.pooler_output.float(), self.name)

    def denoise(self, backbone, z: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """The pipeline's transformer call on the packed latents (timestep t / 1000, text ids zeros, image ids the
        packed grid), unpacked to (B, 16, h, w)."""
        model = backbone.unet
        dtype = next(model.parameters()).dtype
        b, _, h, w = z.shape
        guidance = (torch.full((b,), self.guidance, device=z.device, dtype=torch.float32)
                    if model.config.guidance_embeds else None)
        out = model(hidden_states=_pack(z.to(dtype)),
                    timestep=torch.as_tensor(t, device=z.device).expand(b).to(dtype) / 1000,
                    guidance=guidance,
                    pooled_projections=cond[:, -1, : model.config.pooled_projection_dim].to(dtype),
                    encoder_hidden_states=cond[:, :-1].to(dtype),
                    txt_ids=torch.zeros(cond.shape[1] - 1, 3, device=z.device, dtype=dtype),
                    img_ids=_image_ids(h // 2, w // 2, z.device, dtype)).sample
        return _unpack(out, h, w)

    def pipeline_sigmas(self, backbone, num_steps: int) -> np.ndarray | None:
        """FluxPipeline's np.linspace(1.0, 1 / N, N) (None where the scheduler config has use_flow_sigmas)."""
        if backbone.scheduler.config.get("use_flow_sigmas", False):
            return None
        return np.linspace(1.0, 1 / num_steps, num_steps)

    def patch_size(self, backbone) -> int:
        return 2  # the 2x2 packing (the transformer's own patch_size is 1)

    def sample_size(self, backbone) -> int:
        return 128  # FluxPipeline.default_sample_size: 1024 pixels with the 8x VAE


def model_index(source: str, local: bool, kw: dict) -> dict:
    """The folder's or the cached hub model's model_index.json ({} where there is none)."""
    try:
        if local:
            path = Path(source) / "model_index.json"
        else:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(source, "model_index.json", revision=kw.get("revision"))
            path = Path(found) if isinstance(found, str) else None
        return json.loads(path.read_text()) if path is not None and path.is_file() else {}
    except (OSError, ValueError) as e:
        warnings.warn(f"could not read {source}'s model_index.json ({e}); guessing the model family", stacklevel=2)
        return {}


def _transformer_class(source: str, local: bool, index: dict) -> str:
    """The class name of the folder's ``transformer``: model_index.json's entry, else (a local folder without one)
    its transformer/config.json's ``_class_name`` ('' where neither says)."""
    entry = index.get("transformer")
    if isinstance(entry, list) and len(entry) == 2:
        return str(entry[1])
    config = Path(source) / "transformer" / "config.json"
    if not local or not config.is_file():
        return ""
    try:
        return str(json.loads(config.read_text()).get("_class_name", ""))
    except (OSError, ValueError):
        return ""


def _has(index: dict, folders: set[str], component: str) -> bool:
    """Whether the model has ``component``: model_index.json names a class for it (diffusers writes [null, null]
    for one left out), else (no entry) the folder has its sub-folder."""
    entry = index.get(component)
    if entry is not None:
        return isinstance(entry, list) and any(e is not None for e in entry)
    return component in folders


def family_of(source: str, local: bool, kw: dict) -> Family:
    """The family of a diffusers folder or hub id: its pipeline class or transformer class, else its sub-folders."""
    index = model_index(source, local, kw)
    cls = str(index.get("_class_name", ""))
    folders = {p.name for p in Path(source).iterdir() if p.is_dir()} if local else set(index)
    if "Flux" in cls or _transformer_class(source, local, index) == "FluxTransformer2DModel":
        return Flux()
    if "StableDiffusion3" in cls or "transformer" in folders and "unet" not in folders:
        return StableDiffusion3(t5=_has(index, folders, "text_encoder_3"))
    if "XL" in cls or "text_encoder_2" in folders:
        return StableDiffusionXL(force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)))
    return StableDiffusion()
