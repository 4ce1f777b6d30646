"""Model families: what differs between SD 1.x/2.x, SDXL, SD 3 / 3.5 and FLUX.1, behind one small interface.

A family says which components a diffusers folder holds, loads them, turns prompts into a typed
:class:`~diffinv.models.conditioning.Conditioning` (token states, pooled embedding), calls the denoiser with it,
gives the noise and clean-latent predictions (eps, x0) that the DDIM solver needs (from ε-, v-, sample or
flow-velocity prediction) and the schedule of an N-step run for an image size. Its
:class:`~diffinv.models.conditioning.TextLayout` says how a conditioning is laid out as the one tensor (B, R, D)
per prompt that the methods, editors and the sampler carry: the token rows of each text encoder in order, then
the pooled embedding's rows. So null-text inversion optimises the whole of it (the pooled embedding too),
negative-prompt inversion swaps it whole, and Prompt-to-Prompt finds a word's token rows through the layout.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import ClassVar, Protocol

import torch
from torch import Tensor

from ..ddim import Schedule
from ..errors import DiffinvError
from .conditioning import Conditioning, Segment, TextLayout


class Family(Protocol):
    """One Stable Diffusion family (see the module docstring)."""

    name: ClassVar[str]
    components: ClassVar[tuple[str, ...]]
    """The sub-folders a diffusers folder of this family must hold."""

    @classmethod
    def detect(cls, index: dict, folders: set[str], transformer_class: str) -> "Family | None":
        """This family, configured for the model, if it is one (else None): from its model_index.json ``index``
        ({} where none), its sub-folders ``folders`` and its transformer's class name ('' where none). Asked in
        the order of :data:`diffinv.models.detect.FAMILIES`."""

    def load(self, source: str, kw: dict, wkw: dict) -> dict:
        """The components by name (``from_pretrained`` with ``kw``; weights with ``wkw``, which adds the variant)."""

    def layout(self, backbone) -> TextLayout:
        """How the family's conditioning is laid out as one tensor: its text encoders' token segments in order,
        the token width, the pooled embedding's width and the segment that reads the prompt."""

    def encode(self, backbone, prompts: list[str]) -> Conditioning:
        """The prompts' float32 conditioning, as the family's pipeline builds it."""

    def denoise(self, backbone, z: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The denoiser's raw output for latents z (B, C, h, w) at timestep t under conditioning ``cond``."""

    def predict(self, backbone, z: Tensor, t: Tensor, cond: Conditioning,
                alpha: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(eps, x0): the DDIM-coordinate noise and clean-latent predictions for latents z that sit at the level
        whose alpha is ``alpha`` (a 0-d float64 tensor; None: the timestep t's own level, the sampling case),
        under timestep t; z = sqrt(alpha) x0 + sqrt(1 - alpha) eps."""

    def schedule(self, backbone, num_steps: int, latent_size: tuple[int, int] | None = None) -> Schedule:
        """Timesteps and DDIM levels of an N-step run on latents of ``latent_size`` (h, w) (None: the model's
        native size; only resolution-dependent schedules read it)."""

    def embedded_guidance(self, backbone) -> float | None:
        """The guidance scale a guidance-distilled denoiser is given (FLUX.1-dev's guidance embedding); None: it
        takes none."""

    def with_embedded_guidance(self, backbone, value: float) -> "Family":
        """This family giving ``value`` to the denoiser's guidance embedding; a one-line DiffinvError where the
        model has none."""

    def max_steps(self, backbone) -> int:
        """The most steps the model's scheduler allows."""

    def patch_size(self, backbone) -> int:
        """Latent sides must be multiples of this (the denoiser's patches: SD 3's patch_size, FLUX's 2x2 packing)."""

    def sample_size(self, backbone) -> int:
        """The model's native latent side."""


def _tokens(tokenizer, prompts: list[str], device) -> Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def _clip_segment(backbone, start: int = 0) -> Segment:
    """The CLIP tokens' segment (``backbone.tokenizer``'s padded length)."""
    return Segment("clip", start, backbone.tokenizer.model_max_length, backbone.tokenizer)


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


class NoEmbeddedGuidance:
    """The families whose denoisers take no guidance value (all but FLUX.1-dev's)."""

    def embedded_guidance(self, backbone) -> float | None:
        return None

    def with_embedded_guidance(self, backbone, value: float):
        raise DiffinvError(f"embedded_guidance {value}: this {self.name} model is not guidance-distilled (its denoiser "
                           "takes no guidance value); use --model.guidance_scale")


def first_line(error: Exception) -> str:
    """The error's message's first line, at most 300 characters (one-line error reports)."""
    return (str(error).splitlines() or [""])[0][:300]


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


def _has(index: dict, folders: set[str], component: str) -> bool:
    """Whether the model has ``component``: model_index.json names a class for it (diffusers writes [null, null]
    for one left out), else (no entry) the folder has its sub-folder."""
    entry = index.get(component)
    if entry is not None:
        return isinstance(entry, list) and any(e is not None for e in entry)
    return component in folders


def pipeline_class(index: dict) -> str:
    """The pipeline class model_index.json names ('' where there is none)."""
    return str(index.get("_class_name", ""))
