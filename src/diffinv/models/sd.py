"""SD 1.x/2.x: one CLIP text encoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .diffusion import Diffusion, _load_vae_unet_scheduler
from .conditioning import Conditioning, TextLayout
from .family import _clip_segment, _tokens


@dataclass
class StableDiffusion(Diffusion):
    """SD 1.x/2.x: one CLIP text encoder; the conditioning is its last hidden states (B, 77, 768 or 1024)."""

    name: ClassVar[str] = "SD 1.x/2.x"
    components: ClassVar[tuple[str, ...]] = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")

    @classmethod
    def detect(cls, index: dict, folders: set[str], transformer_class: str) -> StableDiffusion:
        """Any model (the fallback, last in :data:`~diffinv.models.detect.FAMILIES`)."""
        return cls()

    def load(self, source: str, kw: dict, wkw: dict) -> dict:
        from transformers import CLIPTextModel, CLIPTokenizer

        return {
            **_load_vae_unet_scheduler(source, kw, wkw),
            "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=torch.float32,
                                                          **wkw),
            "tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw),
        }

    def layout(self, backbone) -> TextLayout:
        """CLIP's token states only (no pooled embedding)."""
        return TextLayout((_clip_segment(backbone),), width=backbone.text_encoder.config.hidden_size)

    def encode(self, backbone, prompts: list[str]) -> Conditioning:
        return Conditioning(backbone.text_encoder(_tokens(backbone.tokenizer, prompts, backbone.device))[0].float(),
                            None)

    def denoise(self, backbone, z: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        dtype = next(backbone.unet.parameters()).dtype
        return backbone.unet(z.to(dtype), t, encoder_hidden_states=cond.tokens.to(dtype)).sample
