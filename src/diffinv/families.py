"""Model families: what differs between SD 1.x/2.x, SDXL and SD 3 / 3.5, behind one small interface.

A family says which components a diffusers folder holds, loads them, turns prompts into one *conditioning
tensor* per prompt, calls the denoiser with it, gives the noise prediction eps that the DDIM solver needs (from
ε-, v- or flow-velocity prediction) and the schedule of an N-step run. The methods, editors and the sampler only
ever see that tensor (B, L, D): its first rows are the text tokens the cross-attention (SD 3: joint attention)
reads, and a family may append a row of its own (SDXL, SD 3: the pooled text embedding). So null-text inversion
optimises the whole of it (the pooled embedding too), negative-prompt inversion swaps it whole, and
Prompt-to-Prompt sees the token rows only, through ``unet.set_attn_processor``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import torch
from torch import Tensor

from .ddim import Schedule, make_schedule
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

    def eps(self, backbone, z: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """The noise prediction the DDIM solver needs, from the denoiser's output."""

    def schedule(self, backbone, num_steps: int) -> Schedule:
        """Timesteps and DDIM levels of an N-step run."""

    def max_steps(self, backbone) -> int:
        """The most steps the model's scheduler allows."""


class Diffusion:
    """The ε/v-prediction families (SD 1.x/2.x, SDXL): the training schedule's alphas, DDIM on them."""

    def eps(self, backbone, z: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """eps_theta, converted from v-prediction (or x0-prediction) where the scheduler config says so."""
        out = self.denoise(backbone, z, t, cond).to(z.dtype)
        kind = backbone.scheduler.config.prediction_type
        if kind == "epsilon":
            return out
        a = backbone.alphas_cumprod[t].to(z.dtype)
        if kind == "v_prediction":
            return a.sqrt() * out + (1 - a).sqrt() * z
        if kind == "sample":
            return (z - a.sqrt() * out) / (1 - a).sqrt()
        raise DiffinvError(f"unsupported prediction_type {kind!r} in the model's scheduler config")

    def schedule(self, backbone, num_steps: int) -> Schedule:
        """The scheduler's own N timesteps (spacing, offset), levels at its alphas_cumprod; level 0 at its final
        alpha (1 with set_alpha_to_one)."""
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


@dataclass
class StableDiffusion3:
    """SD 3 / 3.5: a transformer trained for rectified flow, x_s = (1 - s) x0 + s eps, predicting v = eps - x0.

    Conditioning (B, 77 + T + 1, J) as diffusers' SD3 pipeline builds it: CLIP-L's and CLIP-G's penultimate
    states side by side, zero-padded to T5's width J, then T5's T = ``t5_tokens`` states (zeros where the model
    has no T5: diffusers' "T5 off"); the last row holds both CLIPs' pooled embeddings.

    The solver stays DDIM: in the coordinates z = x / sqrt((1 - s)^2 + s^2) a rectified-flow latent is a
    variance-preserving one with alpha = (1 - s)^2 / ((1 - s)^2 + s^2), the noise is eps = x + (1 - s) v, and
    the DDIM step between two levels is exactly the Euler step x' = x + (s' - s) v (both are linear in x0 and eps
    with the same coefficients). So every method and editor runs unchanged; level 0 (s = 0) is the latent itself.
    The one difference: DDIM's x0 = (z - sqrt(1 - alpha) eps) / sqrt(alpha) needs alpha > 0, so the top level is
    s = ``max_sigma`` (0.999) rather than 1: a start 1e-3 away from pure noise (sampling differs from diffusers'
    SD 3 pipeline by 1e-3 of the latents' scale, tests/test_families.py). Closer to 1 divides float32 noise by
    sqrt(alpha) ~ 1 - s at the top level: at 1 - 1e-4, latent-TOP's result on the tiny SD 3 moved by 0.029 with
    its batch neighbours (tests/test_batch_independence.py); at 0.999 it stays within 2e-4.
    """

    name: ClassVar[str] = "SD 3/3.5"
    components: ClassVar[tuple[str, ...]] = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                             "transformer", "scheduler")
    t5_tokens: int = 256
    max_sigma: float = 0.999

    def load(self, source: str, kw: dict, wkw: dict) -> dict:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        parts = {
            "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32, **wkw),
            "unet": SD3Transformer2DModel.from_pretrained(source, subfolder="transformer", torch_dtype=torch.float32,
                                                          **wkw),
            "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler", **kw),
        }
        for sub in ("text_encoder", "text_encoder_2"):
            parts[sub] = CLIPTextModelWithProjection.from_pretrained(source, subfolder=sub, dtype=torch.float32,
                                                                     **wkw)
        for sub in ("tokenizer", "tokenizer_2"):
            parts[sub] = CLIPTokenizer.from_pretrained(source, subfolder=sub, **kw)
        if parts["scheduler"].config.get("use_dynamic_shifting", False):
            raise DiffinvError(f"{source}'s scheduler uses dynamic shifting (resolution-dependent), which diffinv "
                               "does not support yet; SD 3 and 3.5 use a fixed shift")
        try:
            from transformers import AutoTokenizer, T5EncoderModel

            parts["text_encoder_3"] = T5EncoderModel.from_pretrained(source, subfolder="text_encoder_3",
                                                                     dtype=torch.float32, **wkw)
            parts["tokenizer_3"] = AutoTokenizer.from_pretrained(source, subfolder="tokenizer_3", **kw)
        except Exception as e:  # noqa: BLE001 - T5 is optional (diffusers: text_encoder_3=None)
            warnings.warn(f"{source}: T5 (text_encoder_3) not loaded ({type(e).__name__}); running with T5 off, "
                          "as diffusers allows: prompts are read by the two CLIP encoders only", stacklevel=2)
            parts["text_encoder_3"] = parts["tokenizer_3"] = None
        return parts

    def encode(self, backbone, prompts: list[str]) -> Tensor:
        states, pooled = _clip_states(backbone, prompts)
        width = backbone.unet.config.joint_attention_dim
        if backbone.text_encoder_3 is None:
            t5 = torch.zeros(len(prompts), self.t5_tokens, width, device=backbone.device)
        else:
            ids = backbone.tokenizer_3(prompts, padding="max_length", max_length=self.t5_tokens, truncation=True,
                                       add_special_tokens=True, return_tensors="pt").input_ids.to(backbone.device)
            t5 = backbone.text_encoder_3(ids)[0].float()
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

    def sigma(self, backbone, t: Tensor) -> Tensor:
        return torch.as_tensor(t, device=backbone.device).double() / backbone.scheduler.config.num_train_timesteps

    def eps(self, backbone, z: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """eps = x + (1 - s) v at x = z sqrt((1 - s)^2 + s^2) (the class docstring)."""
        s = self.sigma(backbone, t)
        x = z * ((1 - s) ** 2 + s**2).sqrt().to(z.dtype)
        v = self.denoise(backbone, x, t, cond).to(z.dtype)
        return x + (1 - s).to(z.dtype) * v

    def schedule(self, backbone, num_steps: int) -> Schedule:
        """The scheduler's N sigmas (its shift applied), the top one at most ``max_sigma``; timesteps s * 1000."""
        scheduler = backbone.scheduler
        scheduler.set_timesteps(num_steps)
        total = scheduler.config.num_train_timesteps
        sigmas = torch.sort(scheduler.sigmas[:num_steps].double().cpu().clamp(max=self.max_sigma)).values
        timesteps = torch.sort(scheduler.timesteps.float().cpu().clamp(max=float(self.max_sigma * total))).values
        if len(torch.unique(timesteps)) != num_steps:
            raise DiffinvError(f"{num_steps} steps give repeated timesteps on this flow-matching schedule")
        signal, noise = (1 - sigmas) ** 2, sigmas**2
        alphas = torch.cat([torch.ones(1, dtype=torch.float64), signal / (signal + noise)])
        return Schedule(timesteps=timesteps, alphas=alphas)

    def max_steps(self, backbone) -> int:
        return int(backbone.scheduler.config.num_train_timesteps)


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


def family_of(source: str, local: bool, kw: dict) -> Family:
    """The family of a diffusers folder or hub id: its pipeline class, else its sub-folders."""
    index = model_index(source, local, kw)
    cls = str(index.get("_class_name", ""))
    folders = {p.name for p in Path(source).iterdir() if p.is_dir()} if local else set(index)
    if "StableDiffusion3" in cls or "transformer" in folders and "unet" not in folders:
        return StableDiffusion3()
    if "XL" in cls or "text_encoder_2" in folders:
        return StableDiffusionXL(force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)))
    return StableDiffusion()
