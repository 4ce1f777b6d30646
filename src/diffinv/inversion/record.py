"""The Inversion record: everything needed to reconstruct or edit an image again later, saved as safetensors."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..errors import DiffinvError

FORMAT = "diffinv.inversion/1"
_TENSORS = ("z0", "trajectory", "timesteps", "source_image")


@dataclass
class Inversion:
    """One image's inversion. Latents are (C, h, w); per-step tensors are indexed by the step k = 1..N as [k-1]."""

    z0: Tensor
    """Latent of the source image (level 0)."""
    trajectory: Tensor
    """(N + 1, C, h, w) DDIM (w = 1) inversion trajectory z*_0 .. z*_N."""
    timesteps: Tensor
    """(N,) UNet timesteps t_1 < ... < t_N."""
    source_image: Tensor
    """(3, H, W) uint8: the image that was inverted (after resizing/cropping)."""
    source_prompt: str
    method: str
    model: str
    guidance_scale: float
    unconditional: Tensor | None = None
    """(N, L, D) per-step unconditional embeddings (null-text inversion, latent-TOP); None: the method's rule."""
    z_T: Tensor | None = None
    """Start latent of sampling if it is not trajectory[-1] (latent-TOP's noise bias)."""
    extra: dict[str, Tensor] = field(default_factory=dict)
    """Method-specific tensors (e.g. learned biases), saved as 'extra.<name>'."""
    meta: dict[str, str] = field(default_factory=dict)
    """Method-specific metadata (strings), saved as JSON."""

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def start_latent(self) -> Tensor:
        return self.trajectory[-1] if self.z_T is None else self.z_T

    def save(self, path: str | Path) -> Path:
        """Write atomically (temporary file, then rename): a crash never leaves a half-written record."""
        path = Path(path)
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in _TENSORS}
        if self.unconditional is not None:
            tensors["unconditional"] = self.unconditional.detach().cpu().contiguous()
        if self.z_T is not None:
            tensors["z_T"] = self.z_T.detach().cpu().contiguous()
        tensors |= {f"extra.{k}": v.detach().cpu().contiguous() for k, v in self.extra.items()}
        metadata = {
            "format": FORMAT,
            "source_prompt": self.source_prompt,
            "method": self.method,
            "model": self.model,
            "guidance_scale": repr(float(self.guidance_scale)),
            "num_inference_steps": str(self.num_steps),
            "image_size": json.dumps(list(self.source_image.shape[-2:])),
            "meta": json.dumps(self.meta),
        }
        from safetensors.torch import save_file

        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Inversion":
        """Read a record; a missing, truncated or foreign file raises a DiffinvError naming it."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise DiffinvError(f"inversion record {path} does not exist")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise DiffinvError(f"inversion record {path} is corrupt or not a safetensors file ({e})") from None
        if metadata.get("format") != FORMAT:
            raise DiffinvError(f"{path} is not a diffinv inversion record (format {metadata.get('format')!r}, expected {FORMAT!r})")
        missing = [k for k in _TENSORS if k not in tensors]
        if missing:
            raise DiffinvError(f"inversion record {path} is incomplete: it lacks {', '.join(missing)}")
        n = len(tensors["timesteps"])
        if tensors["trajectory"].shape[0] != n + 1 or tensors["trajectory"].shape[1:] != tensors["z0"].shape:
            raise DiffinvError(f"inversion record {path} is inconsistent: trajectory {tuple(tensors['trajectory'].shape)} "
                               f"for {n} steps and z0 {tuple(tensors['z0'].shape)}")
        try:
            return cls(
                **{k: tensors[k] for k in _TENSORS},
                source_prompt=metadata["source_prompt"],
                method=metadata["method"],
                model=metadata["model"],
                guidance_scale=float(metadata["guidance_scale"]),
                unconditional=tensors.get("unconditional"),
                z_T=tensors.get("z_T"),
                extra={k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")},
                meta=json.loads(metadata.get("meta", "{}")),
            )
        except (KeyError, ValueError) as e:
            raise DiffinvError(f"inversion record {path} has broken metadata ({e})") from None


# --- what a record tells sampling (any method samples any record with it) ---------------------------------


def stochastic_code(inv: Inversion) -> tuple[Tensor, float] | None:
    """(N, C, h, w) noise sigma_k n_k that sampling adds after the step from level k (index k - 1), and the eta of
    that stochastic DDIM, where the record holds them (CycleDiffusion's latent code: any method samples such a
    record with it, edits sharing their source's noise); None: deterministic DDIM."""
    if "step_noise" not in inv.extra:
        return None
    return inv.extra["step_noise"], float(inv.meta.get("eta", 1.0))


def coupled_code(inv: Inversion) -> tuple[Tensor, float] | None:
    """EDICT's second sequence's start y_T and the mixing weight p, where the record holds them (any method then
    samples it with the coupled sampler); None: a single sequence."""
    if "edict_y_T" not in inv.extra:
        return None
    return inv.extra["edict_y_T"], float(inv.meta.get("mix", 0.93))


def start_level(inv: Inversion) -> int:
    """The level sampling starts from: N, or fewer where the record says so (DDPM inversion's T - T_skip: the
    start latent is then the trajectory's latent of that level)."""
    return int(inv.meta.get("start_level", inv.num_steps))
