"""SDXL: two CLIP text encoders, the pooled embedding and the added time ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .diffusion import Diffusion, _load_vae_unet_scheduler
from .conditioning import Conditioning, TextLayout
from .family import _clip_segment, _clip_states, pipeline_class


@dataclass
class StableDiffusionXL(Diffusion):
    """SDXL: two CLIP text encoders, the pooled embedding and the added time ids (as diffusers' SDXL pipeline).

    Conditioning: tokens (B, 77, D1 + D2), both encoders' penultimate hidden states side by side (what the
    cross-attention reads); pooled (B, P), the second encoder's pooled, projected embedding. The time ids (original size, crop top-left, target size) are the latents' own size
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

    def layout(self, backbone) -> TextLayout:
        """CLIP's token rows (both encoders side by side), then the pooled embedding the UNet's added embedding
        reads (its input width less the six time ids' embeddings)."""
        unet = backbone.unet
        return TextLayout((_clip_segment(backbone),),
                          width=backbone.text_encoder.config.hidden_size + backbone.text_encoder_2.config.hidden_size,
                          pooled=unet.config.projection_class_embeddings_input_dim
                          - 6 * unet.config.addition_time_embed_dim)

    def encode(self, backbone, prompts: list[str]) -> Conditioning:
        states, pooled = _clip_states(backbone, prompts)
        tokens, pooled = torch.cat(states, dim=-1), pooled[-1]  # the second encoder's pooled
        if self.force_zeros_for_empty_prompt:
            empty = torch.tensor([not p for p in prompts], device=tokens.device)
            tokens = torch.where(empty.view(-1, 1, 1), torch.zeros_like(tokens), tokens)
            pooled = torch.where(empty.view(-1, 1), torch.zeros_like(pooled), pooled)
        return Conditioning(tokens, pooled)

    def denoise(self, backbone, z: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        unet = backbone.unet
        dtype = next(unet.parameters()).dtype
        h, w = z.shape[-2] * backbone.vae_scale_factor, z.shape[-1] * backbone.vae_scale_factor
        time_ids = torch.tensor([h, w, 0, 0, h, w], device=z.device, dtype=dtype).expand(z.shape[0], 6)
        added = {"text_embeds": cond.pooled.to(dtype), "time_ids": time_ids}
        return unet(z.to(dtype), t, encoder_hidden_states=cond.tokens.to(dtype), added_cond_kwargs=added).sample
