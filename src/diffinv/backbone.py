"""Loads a Stable Diffusion's parts (diffusers layout) and exposes the few operations inversion needs.

Works for any SD 1.x/2.x, SDXL, SD 3/3.5 or FLUX.1 checkpoint in diffusers layout (``vae``, ``text_encoder``,
``tokenizer``, ``unet``, ``scheduler`` folders; SDXL also ``text_encoder_2``, ``tokenizer_2``; SD 3 and FLUX a
``transformer`` for the ``unet``, SD 3 a T5 in ``text_encoder_3``, FLUX in ``text_encoder_2``), from the hub
cache, a local folder, or the embedded shapes model (``"shapes"``). What differs between the families
(components, text conditioning, the denoiser's call, the prediction, the schedule) is in
:mod:`diffinv.models`; ``unet`` is the denoiser whichever it is. The components are loaded one by one (no
safety checker, no pipeline object), frozen, and kept as submodules so Lightning moves them to the right device.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .ddim import Schedule
from .errors import DiffinvError
from .models import Family, StableDiffusion, TextLayout, family_of, first_line

EMBEDDED_MODEL = "shapes"
EMBEDDED_FLOW_MODEL = "shapes-flow"
EMBEDDED_MODELS = {EMBEDDED_MODEL: "model", EMBEDDED_FLOW_MODEL: "flow_model"}
"""The models that ship inside the package, by name: their folders under ``diffinv/shapes/``. "shapes": the
U-Net (SD 1.x layout) on 32x32 scenes; "shapes-flow": the rectified-flow MM-DiT (SD 3 layout) on 48x48 striped
scenes."""
COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")


def embedded_model_path(name: str = EMBEDDED_MODEL) -> Path:
    """Folder of an embedded model (:data:`EMBEDDED_MODELS`; default the U-Net shapes model)."""
    if name not in EMBEDDED_MODELS:
        raise DiffinvError(f"no embedded model {name!r}; the embedded models are {', '.join(EMBEDDED_MODELS)}")
    return Path(__file__).resolve().parent / "shapes" / EMBEDDED_MODELS[name]


@dataclass
class BackboneConfig:
    """Which Stable Diffusion to load."""

    pretrained: str = EMBEDDED_MODEL
    """'shapes' (the embedded offline model), 'shapes-flow' (the embedded flow-matching model, SD 3 layout), a hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5' or
    'stabilityai/stable-diffusion-xl-base-1.0' (taken from the local hub cache; downloaded only when
    HF_HUB_OFFLINE is not set), or a local folder in diffusers layout (SD 1.x/2.x, SDXL, SD 3/3.5 or FLUX.1)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of a hub id."""
    variant: str | None = None
    """Weight variant to load, e.g. 'fp16' for checkpoints that ship '*.fp16.safetensors'."""
    embedded_guidance: float | None = None
    """A guidance-distilled model's guidance scale, given to its transformer's guidance embedding (FLUX.1-dev;
    default: its pipeline's, 3.5); refused on a model without one. Records pin it."""


def _resolve(pretrained: str) -> tuple[str, bool]:
    """(path or hub id to load, is_local_folder)."""
    if pretrained in EMBEDDED_MODELS:
        path = embedded_model_path(pretrained)
        if not (path / "model_index.json").exists():
            flag = " --flow" if pretrained == EMBEDDED_FLOW_MODEL else ""
            raise DiffinvError(
                f"the embedded {pretrained} model is missing from {path}: reinstall diffinv, or train it with "
                f"`python scripts/train_shapes_model.py{flag}`"
            )
        return str(path), True
    path = Path(pretrained).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DiffinvError(f"model path {path} is a file; expected a folder in diffusers layout "
                               f"({', '.join(COMPONENTS)}; SDXL also text_encoder_2, tokenizer_2)")
        return str(path), True
    if pretrained.startswith((".", "/", "~")) or os.sep in pretrained.strip("/").replace("/", "", 1):
        raise DiffinvError(f"model folder {pretrained} does not exist")
    return pretrained, False


def _load_components(source: str, local: bool, config: BackboneConfig) -> tuple[Family, dict]:
    """The model's family and its components by name (one clear error for anything missing or broken)."""
    kw = dict(revision=config.revision)
    family = family_of(source, local, kw)
    if local:
        missing = [c for c in family.components if not (Path(source) / c).is_dir()]
        if missing:
            raise DiffinvError(
                f"model folder {source} lacks {', '.join(missing)}: expected a {family.name} model in diffusers "
                f"layout with the sub-folders {', '.join(family.components)}"
            )

    def load_all(local_files_only: bool):
        kw = dict(revision=config.revision, local_files_only=local_files_only)
        wkw = dict(kw, variant=config.variant)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return family.load(source, kw, wkw)

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        return family, _load_or_explain(load_all, source, local)
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
        transformers_logging.enable_progress_bar()


def _load_or_explain(load_all, source: str, local: bool):
    try:
        return load_all(local_files_only=True)
    except Exception as cached_error:  # noqa: BLE001 - turned into one clear message below
        if local or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            error = cached_error
        else:
            try:
                return load_all(local_files_only=False)
            except Exception as download_error:  # noqa: BLE001
                error = download_error
    where = f"folder {source}" if local else f"hub model '{source}'"
    what = first_line(error) if isinstance(error, DiffinvError) else f"{type(error).__name__}: {first_line(error)}"
    raise DiffinvError(
        f"could not load the Stable Diffusion {where}: {what}. "
        + (
            "Check that the folder holds the model's components as saved by diffusers."
            if local
            else f"Download it where there is network (`hf download {source}`), then pass the downloaded folder "
            "with --model.backbone.pretrained, or use the embedded model ('shapes')."
        )
    )


def _training_alphas(scheduler) -> Tensor:
    """The training schedule's alphas_cumprod, float64 (empty for flow matching, which has none)."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    return torch.zeros(0, dtype=torch.float64) if alphas is None else alphas.clone().double()


class Backbone(nn.Module):
    """A frozen Stable Diffusion: VAE, text encoder + tokenizer, UNet, and its noise schedule.

    ``components``: the family's other parts by name (SDXL's ``text_encoder_2``, ``tokenizer_2``; SD 3's
    ``text_encoder_3``, ``tokenizer_3``, None where it has no T5; ...), each an attribute of that name (the
    modules among them submodules). Every family has a ``text_encoder`` and a ``tokenizer`` (the backbone reads
    the tokenizer's limit itself)."""

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, name: str = "custom",
                 family: Family | None = None, **components):
        super().__init__()
        self.vae, self.text_encoder, self.unet = vae, text_encoder, unet
        for key, part in components.items():
            setattr(self, key, part)
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.name = name
        self.family = family or StableDiffusion()
        self.requires_grad_(False)
        self.eval()
        self.register_buffer("alphas_cumprod", _training_alphas(scheduler), persistent=False)
        self._prompt_cache: dict[str, Tensor] = {}
        self._watchers: list[Callable[[Tensor], None]] = []

    @contextmanager
    def watch(self, fn: Callable[[Tensor], None]) -> Iterator[None]:
        """Within the block, ``fn(t)`` is told the timestep of every prediction (:meth:`predict`), as the schedule
        gives it (before a family rescales it for its denoiser: FLUX's t / 1000): progress reports."""
        self._watchers.append(fn)
        try:
            yield
        finally:
            self._watchers.remove(fn)

    @classmethod
    def load(cls, config: BackboneConfig | None = None) -> "Backbone":
        config = config or BackboneConfig()
        source, local = _resolve(config.pretrained)
        family, parts = _load_components(source, local, config)
        backbone = cls(name=config.pretrained, family=family, **parts)
        if config.embedded_guidance is not None:
            backbone.family = family.with_embedded_guidance(backbone, config.embedded_guidance)
        return backbone

    def _apply(self, fn, recurse: bool = True):
        """Moves and casts the modules; the noise schedule follows the device but stays float64 (under
        ``bf16-true``/``16-true`` Lightning casts every floating tensor: alpha of level 1 would round to 1.0 and
        the schedule stop being monotone)."""
        super()._apply(fn, recurse)
        if self.alphas_cumprod.dtype != torch.float64:
            self.alphas_cumprod = _training_alphas(self.scheduler).to(self.alphas_cumprod.device)
        return self

    def train(self, mode: bool = True) -> "Backbone":
        return super().train(False)  # always frozen: no dropout, no norm updates

    # --- geometry -------------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's factor times the denoiser's patch size (SD 3's
        patch_size, FLUX's 2x2 packing: 2)."""
        return self.vae_scale_factor * self.family.patch_size(self)

    @property
    def native_resolution(self) -> int:
        return self.family.sample_size(self) * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    # --- images <-> latents -----------------------------------------------------------------------------------
    def encode_image(self, images: Tensor) -> Tensor:
        """Latents z0 (B, C, H/f, W/f) of images (B, 3, H, W) in [0, 1]: the posterior mean, scaled."""
        vae = self.vae
        x = (images * 2 - 1).to(device=self.device, dtype=next(vae.parameters()).dtype)
        z = vae.encode(x).latent_dist.mean.float()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (z - shift) * vae.config.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] from latents. Runs in float32 (fp16 VAE decoding overflows to NaN)."""
        vae = self.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        z = latents.float() / vae.config.scaling_factor + shift
        with torch.autocast(device_type=self.device.type, enabled=False):
            x = vae.decode(z.to(next(vae.parameters()).dtype)).sample.float()
        return ((x + 1) / 2).clamp(0, 1)

    # --- text -------------------------------------------------------------------------------------------------
    @functools.cached_property
    def layout(self) -> TextLayout:
        """How the family lays a prompt's conditioning out as one (R, D) tensor (:meth:`Family.layout`)."""
        return self.family.layout(self)

    @property
    def max_prompt_tokens(self) -> int:
        """The token limit of the text encoder that reads the prompt (:attr:`TextLayout.prompt_reader`)."""
        return self.layout.prompt_reader[1]

    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """Text conditioning (B, R, D) laid out by :attr:`layout`, computed once per distinct prompt and cached.

        A prompt longer than the limit of the encoder that reads it (CLIP's 77; FLUX's T5, 512) is truncated with a
        warning naming it.
        """
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache or (
            self._prompt_cache[p].is_inference() and not torch.is_inference_mode_enabled())]
        if missing:
            tokenizer, limit = self.layout.prompt_reader
            special = len(tokenizer("", verbose=False).input_ids)  # CLIP: start and end tokens; T5: the end one
            for p in missing:
                n = len(tokenizer(p, truncation=False, verbose=False).input_ids)
                if n > limit:
                    warnings.warn(
                        f"prompt {p!r} is {n} tokens long, over the text encoder's limit of {limit}: it is truncated "
                        f"to its first {limit - special} words/pieces",
                        stacklevel=2,
                    )
            with torch.no_grad():
                emb = self.layout.pack(*self.family.encode(self, missing))
            self._prompt_cache.update(zip(missing, emb))
        return torch.stack([self._prompt_cache[p].to(self.device) for p in prompts])

    # --- noise ------------------------------------------------------------------------------------------------
    def predict(self, z: Tensor, t: Tensor, emb: Tensor, alpha: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(eps, x0): the noise and clean-latent predictions in DDIM coordinates for latents z at the level whose
        alpha is ``alpha`` (0-d float64; None: the timestep t's own level), under timestep t and conditioning
        ``emb`` (B, R, D, laid out by :attr:`layout`): the model's own output converted by its family
        (:meth:`diffinv.models.Family.predict`)."""
        for fn in self._watchers:
            fn(t)
        return self.family.predict(self, z, t, self.layout.unpack(emb), alpha)

    @contextmanager
    def embedded_guidance_of(self, value: float | None) -> Iterator[None]:
        """Within the block a guidance-distilled denoiser is given ``value`` (None: its own; a model without a
        guidance embedding refuses any other in one line)."""
        if value is None:
            yield
            return
        family = self.family
        self.family = family.with_embedded_guidance(self, value)
        try:
            yield
        finally:
            self.family = family

    def eps(self, z: Tensor, t: Tensor, emb: Tensor, alpha: Tensor | None = None) -> Tensor:
        """The noise prediction eps_theta(z, t, emb) the DDIM solver needs: ``predict(...)[0]``."""
        return self.predict(z, t, emb, alpha)[0]

    @functools.cached_property
    def max_steps(self) -> int:
        """The most steps the scheduler allows (found once: the scheduler's config does not change)."""
        return self.family.max_steps(self)

    def prompt_warnings(self, prompts: list[str]) -> list[str]:
        """Warnings a user should see about prompts on this model before it runs: the embedded shapes models
        ("shapes", "shapes-flow") know only the words of their world, and spell any other word out letter by
        letter."""
        if self.name not in EMBEDDED_MODELS:
            return []
        from .shapes.world import VOCABULARY

        unknown = sorted({w for p in prompts for w in p.lower().replace(",", " ").replace(".", " ").split()}
                         - set(VOCABULARY))
        if not unknown:
            return []
        return [f"the embedded shapes model only knows its shapes world ({len(VOCABULARY)} words: sizes, colours, "
                f"shapes, backgrounds); {len(unknown)} word(s) of the prompts are unknown to it "
                f"({', '.join(unknown[:6])}{'...' if len(unknown) > 6 else ''}), so real photos give meaningless "
                "results: pass a real Stable Diffusion with --model.backbone.pretrained (a hub id or a folder)"]

    def schedule(self, num_steps: int, latent_size: tuple[int, int] | None = None) -> Schedule:
        """Timesteps and levels of an N-step run, per the model's scheduler config and family, for latents of
        ``latent_size`` (h, w) (None: the model's native size; resolution-dependent shifting reads it: SD 3 with
        use_dynamic_shifting, FLUX.1-dev)."""
        most = self.max_steps
        if not 1 <= num_steps <= most:
            config = self.scheduler.config
            raise DiffinvError(f"num_inference_steps must be in 1..{most} for this model's scheduler "
                               f"({config.num_train_timesteps} training timesteps, "
                               f"'{getattr(config, 'timestep_spacing', 'linspace')}' spacing), got {num_steps}")
        return self.family.schedule(self, num_steps, latent_size).to(self.device)
