"""Model families: what differs between SD 1.x/2.x and SDXL, behind one small interface.

A family says which components a diffusers folder holds, loads them, turns prompts into one *conditioning
tensor* per prompt, and calls the denoiser with it. The methods, editors and the sampler only ever see that
tensor (B, L, D): its first rows are the text tokens the cross-attention reads, and a family may append rows
of its own (SDXL: the pooled text embedding). So null-text inversion optimises the whole of it (for SDXL the
pooled embedding too), negative-prompt inversion swaps it whole, and Prompt-to-Prompt sees the token rows only,
through ``unet.set_attn_processor``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import torch
from torch import Tensor

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


def _tokens(tokenizer, prompts: list[str], device) -> Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def _load_vae_unet_scheduler(source: str, kw: dict, wkw: dict) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    return {
        "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32, **wkw),
        "unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=torch.float32, **wkw),
        # any scheduler config (PNDM, Euler, DDIM) gives the training schedule; diffinv's solver is DDIM's
        "scheduler": DDIMScheduler.from_pretrained(source, subfolder="scheduler", **kw),
    }


@dataclass
class StableDiffusion:
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
class StableDiffusionXL:
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
        states, pooled = [], None
        for tokenizer, encoder in ((backbone.tokenizer, backbone.text_encoder),
                                   (backbone.tokenizer_2, backbone.text_encoder_2)):
            out = encoder(_tokens(tokenizer, prompts, backbone.device), output_hidden_states=True)
            states.append(out.hidden_states[-2].float())
            pooled = out[0].float()  # the last encoder's projected pooled embedding (text_embeds)
        tokens = torch.cat(states, dim=-1)
        B, L, D = tokens.shape
        if pooled.shape[-1] > D:
            raise DiffinvError(f"SDXL's pooled embedding ({pooled.shape[-1]}) is wider than its token states ({D})")
        cond = torch.cat([tokens, torch.nn.functional.pad(pooled, (0, D - pooled.shape[-1]))[:, None]], dim=1)
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
    """The family of a diffusers folder or hub id: its pipeline class, else its sub-folders. SD 3 (flow matching)
    is refused in one line."""
    index = model_index(source, local, kw)
    cls = str(index.get("_class_name", ""))
    folders = {p.name for p in Path(source).iterdir() if p.is_dir()} if local else set(index)
    if "StableDiffusion3" in cls or "transformer" in folders and "unet" not in folders:
        raise DiffinvError(f"{source} is a Stable Diffusion 3 (flow matching, {cls or 'a transformer'}) model: not "
                           "supported yet; use an SD 1.x/2.x or SDXL model")
    if "XL" in cls or "text_encoder_2" in folders:
        return StableDiffusionXL(force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)))
    return StableDiffusion()
