"""SD 3 / 3.5: rectified flow, a joint-attention transformer, two CLIPs and (optionally) T5."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import DiffinvError
from .conditioning import Conditioning, Segment, TextLayout
from .family import _clip_segment, _clip_states, _has, _load_t5, _t5_states, first_line, pipeline_class
from .flow import Flow, _load_flow_core


@dataclass
class StableDiffusion3(Flow):
    """SD 3 / 3.5: rectified flow (:class:`Flow`), a joint-attention transformer in patches, two CLIPs and T5.

    Conditioning as diffusers' SD3 pipeline builds it: tokens (B, 77 + T, J), CLIP-L's and CLIP-G's penultimate
    states side by side, zero-padded to T5's width J, then T5's T = ``t5_tokens`` states (zeros where the model
    has no T5: diffusers' "T5 off"); pooled, both CLIPs' pooled embeddings side by side (however wider than J).
    ``t5``: the folder has a T5 (its model_index.json lists a text_encoder_3): it must load, else the load stops.
    """

    name: ClassVar[str] = "SD 3/3.5"
    components: ClassVar[tuple[str, ...]] = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                             "transformer", "scheduler")
    default_max_shift: ClassVar[float] = 1.16
    t5_tokens: int = 256
    t5: bool = False

    @classmethod
    def detect(cls, index: dict, folders: set[str], transformer_class: str) -> StableDiffusion3 | None:
        """An SD 3 pipeline class, else a transformer and no unet; ``t5`` where the model has a text_encoder_3."""
        if "StableDiffusion3" in pipeline_class(index) or "transformer" in folders and "unet" not in folders:
            return cls(t5=_has(index, folders, "text_encoder_3"))
        return None

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

    def layout(self, backbone) -> TextLayout:
        """CLIP's 77 rows, then T5's ``t5_tokens`` (no tokenizer where the model has no T5); the pooled embedding
        the transformer's ``pooled_projection_dim`` reads. CLIP's limit reads the prompt (it cuts CLIP's states)."""
        clip = _clip_segment(backbone)
        t5 = Segment("t5", clip.length, self.t5_tokens, backbone.tokenizer_3, start_token=False)
        config = backbone.unet.config
        return TextLayout((clip, t5), width=config.joint_attention_dim, pooled=config.pooled_projection_dim)

    def encode(self, backbone, prompts: list[str]) -> Conditioning:
        states, pooled = _clip_states(backbone, prompts)
        width = backbone.unet.config.joint_attention_dim
        if backbone.text_encoder_3 is None:
            t5 = torch.zeros(len(prompts), self.t5_tokens, width, device=backbone.device)
        else:
            t5 = _t5_states(backbone.tokenizer_3, backbone.text_encoder_3, prompts, self.t5_tokens, backbone.device)
        clip = torch.cat(states, dim=-1)
        tokens = torch.cat([torch.nn.functional.pad(clip, (0, width - clip.shape[-1])), t5], dim=1)
        return Conditioning(tokens, torch.cat(pooled, dim=-1))

    def denoise(self, backbone, z: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        model = backbone.unet
        dtype = next(model.parameters()).dtype
        timestep = torch.as_tensor(t, device=z.device).float().expand(z.shape[0])
        return model(hidden_states=z.to(dtype), encoder_hidden_states=cond.tokens.to(dtype),
                     pooled_projections=cond.pooled.to(dtype), timestep=timestep).sample
