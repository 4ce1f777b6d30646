"""SDXL: two CLIP text encoders, the pooled embedding and the added time ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .diffusion import Diffusion, _load_vae_unet_scheduler
from .family import _clip_states, _with_pooled_row, pipeline_class


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

    @classmethod
    def detect(cls, index: dict, folders: set[str], transformer_class: str) -> StableDiffusionXL | None:
        """An SDXL pipeline class, else a second text encoder; the model's own force_zeros_for_empty_prompt."""
        if "XL" in pipeline_class(index) or "text_encoder_2" in folders:
            return cls(force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)))
        return None

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
