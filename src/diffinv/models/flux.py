"""FLUX.1 (dev, schnell): rectified flow, a transformer on 2x2-packed latents, CLIP-L's pooled output and T5."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from ..errors import DiffinvError
from .conditioning import Conditioning, Segment, TextLayout
from .family import _load_t5, _t5_states, _tokens, pipeline_class
from .flow import Flow, _load_flow_core


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

    Conditioning: tokens (B, T, J), T5's T = ``max_sequence_length`` token states (``text_encoder_2``); pooled,
    CLIP-L's pooled output (``text_encoder``, CLIPTextModel's pooler_output). The
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

    @classmethod
    def detect(cls, index: dict, folders: set[str], transformer_class: str) -> Flux | None:
        """A FLUX pipeline class or a FluxTransformer2DModel."""
        if "Flux" in pipeline_class(index) or transformer_class == "FluxTransformer2DModel":
            return cls()
        return None

    def load(self, source: str, kw: dict, wkw: dict) -> dict:
        from diffusers import FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer

        parts = _load_flow_core(source, kw, wkw, FluxTransformer2DModel)
        parts["text_encoder"] = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=torch.float32,
                                                              **wkw)
        parts["tokenizer"] = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
        parts["text_encoder_2"], parts["tokenizer_2"] = _load_t5(source, "text_encoder_2", "tokenizer_2", kw, wkw)
        return parts

    def layout(self, backbone) -> TextLayout:
        """T5's ``max_sequence_length`` rows (CLIP gives only the pooled embedding: T5 reads the prompt), then the
        pooled embedding the transformer's ``pooled_projection_dim`` reads."""
        t5 = Segment("t5", 0, self.max_sequence_length, backbone.tokenizer_2, start_token=False)
        config = backbone.unet.config
        return TextLayout((t5,), width=config.joint_attention_dim, pooled=config.pooled_projection_dim)

    def encode(self, backbone, prompts: list[str]) -> Conditioning:
        """FluxPipeline.encode_prompt: T5's states (prompt_embeds) and CLIP's pooled output (pooled_prompt_embeds)."""
        clip = backbone.text_encoder(_tokens(backbone.tokenizer, prompts, backbone.device), output_hidden_states=False)
        t5 = _t5_states(backbone.tokenizer_2, backbone.text_encoder_2, prompts, self.max_sequence_length,
                        backbone.device)
        return Conditioning(t5, clip.pooler_output.float())

    def denoise(self, backbone, z: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
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
                    pooled_projections=cond.pooled.to(dtype),
                    encoder_hidden_states=cond.tokens.to(dtype),
                    txt_ids=torch.zeros(cond.tokens.shape[1], 3, device=z.device, dtype=dtype),
                    img_ids=_image_ids(h // 2, w // 2, z.device, dtype)).sample
        return _unpack(out, h, w)

    def embedded_guidance(self, backbone) -> float | None:
        """``guidance`` where the transformer has a guidance embedding (dev), else None (schnell)."""
        return float(self.guidance) if backbone.unet.config.guidance_embeds else None

    def with_embedded_guidance(self, backbone, value: float) -> "Flux":
        if not backbone.unet.config.guidance_embeds:
            raise DiffinvError(f"embedded_guidance {value}: this FLUX.1 model (schnell) has no guidance embedding")
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise DiffinvError(f"embedded_guidance must be a finite number >= 0, got {value!r} (FluxPipeline: 3.5)")
        return dataclasses.replace(self, guidance=float(value))

    def pipeline_sigmas(self, backbone, num_steps: int) -> np.ndarray | None:
        """FluxPipeline's np.linspace(1.0, 1 / N, N) (None where the scheduler config has use_flow_sigmas)."""
        if backbone.scheduler.config.get("use_flow_sigmas", False):
            return None
        return np.linspace(1.0, 1 / num_steps, num_steps)

    def patch_size(self, backbone) -> int:
        return 2  # the 2x2 packing (the transformer's own patch_size is 1)

    def sample_size(self, backbone) -> int:
        return 128  # FluxPipeline.default_sample_size: 1024 pixels with the 8x VAE
