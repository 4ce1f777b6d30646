"""The Inversion record: everything needed to reconstruct or edit an image again later, saved as safetensors."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import Tensor

from ..ddim import Variance
from ..errors import DiffinvError

if TYPE_CHECKING:
    from ..backbone import Backbone

FORMAT = "diffinv.inversion/2"
"""Version 2 adds the typed ``sampling`` entry; version 1 records (sampling read from their method and ``meta``)
stay readable."""
_READABLE = ("diffinv.inversion/1", FORMAT)
_TENSORS = ("z0", "trajectory", "timesteps", "source_image")

StepKind = Literal["ddim", "stochastic", "coupled", "rf_solver", "fireflow", "rf_inversion"]
Unconditional = Literal["null", "source", "learned"]


@dataclass(frozen=True)
class Sampling:
    """How a record is sampled to reproduce its reconstruction: what any method editing it must use. Saved as a
    typed JSON object in the record's metadata."""

    step: StepKind = "ddim"
    """The step rule: deterministic DDIM; 'stochastic' DDIM with the stored noise ``extra.step_noise`` (CycleDiffusion,
    DDPM inversion); 'coupled' EDICT sequences from ``extra.edict_y_T``; on flow models, the flow solvers' steps:
    'rf_solver' (RF-Solver's second-order step), 'fireflow' (FireFlow's reused midpoint), 'rf_inversion'
    (RF-Inversion's controlled reverse ODE toward each row's image latent)."""
    eta: float = 0.0
    """'stochastic': eta of DDIM eq. 16; 'rf_inversion': the controller's strength eta."""
    eta_start: float = 0.0
    """'rf_inversion': the fraction of the sampled steps after which the controller is on (step int(f M) of M)."""
    eta_stop: float = 0.0
    """'rf_inversion': the fraction of the sampled steps at which it stops."""
    variance: Variance = "ddim"
    """'stochastic': how the step's direction coefficient subtracts the variance (:data:`diffinv.ddim.Variance`):
    'ddim' (DDIM eq. 12/16) or 'authors' (edit-friendly DDPM inversion's code); the stored noise absorbs either, so
    the record is sampled with its own. Records without it (version 1, older version 2) read as 'ddim'."""
    mix: float = 0.93
    """'coupled': EDICT's mixing weight p."""
    leapfrog: bool = False
    """'coupled': EDICT's alternating update order (the authors' code): the y sequence is stepped first at the
    levels k with (start level - k) odd, see :mod:`diffinv.inversion.edict`."""
    start_level: int | None = None
    """The level sampling starts from; None: N (DDPM inversion's T - T_skip, EDICT's and CycleDiffusion's
    strength start lower)."""
    guidance_scale: float = 7.5
    """The reconstruction row's classifier-free guidance scale."""
    unconditional: Unconditional = "null"
    """The reconstruction row's unconditional branch: the null prompt, the source prompt (NPI), or the record's
    per-step embeddings (null-text inversion, latent-TOP; they serve the edit rows too)."""
    snap_source: bool = False
    """The reconstruction row is put back onto the trajectory after every step (DirectInversion)."""
    rule: dict | None = None
    """The reconstruction row's guidance corrections beyond classifier-free guidance (ProxNPI's proximal settings),
    None: none."""
    embedded_guidance: float | None = None
    """The guidance value a guidance-distilled denoiser was given (FLUX.1-dev's guidance embedding); None: none, or a
    record made before it was pinned."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Sampling":
        """Read back :meth:`to_json`; a wrong type or an unknown key raises ValueError naming it."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"sampling is {type(data).__name__}, expected an object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"sampling has unknown entries {', '.join(unknown)}")
        return cls(**data)

    def problem(self, num_steps: int) -> str | None:
        """What makes these values unusable for a record of ``num_steps`` steps (the end of a sentence), or None."""
        kinds = {"step": get_args(StepKind), "unconditional": get_args(Unconditional), "variance": get_args(Variance)}
        for name, allowed in kinds.items():
            if getattr(self, name) not in allowed:
                return f"has sampling {name} {getattr(self, name)!r}, expected one of {', '.join(allowed)}"
        for name in ("eta", "mix", "guidance_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return f"has sampling {name} {value!r}, expected a finite number"
        if not 0 <= self.eta <= 1 or not 0 < self.mix < 1 or self.guidance_scale < 0:
            return (f"has sampling eta {self.eta}, mix {self.mix}, guidance_scale {self.guidance_scale}: expected "
                    "eta in [0, 1], mix in (0, 1), guidance_scale >= 0")
        ends = (self.eta_start, self.eta_stop)
        if any(isinstance(e, bool) or not isinstance(e, (int, float)) for e in ends) or not 0 <= ends[0] <= ends[1] <= 1:
            return f"has sampling eta_start, eta_stop {ends}, expected fractions 0 <= start <= stop <= 1"
        level = self.start_level
        if level is not None and (isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= num_steps):
            return f"has sampling start_level {level!r}, expected a level in 1..{num_steps}"
        if not isinstance(self.snap_source, bool) or not isinstance(self.leapfrog, bool):
            return "has sampling snap_source or leapfrog that is not true or false"
        if self.rule is not None and not isinstance(self.rule, dict):
            return f"has sampling rule {self.rule!r}, expected an object or null"
        g = self.embedded_guidance
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g)):
            return f"has sampling embedded_guidance {g!r}, expected a finite number or null"
        return None


def legacy_sampling(method: str, guidance_scale: float, meta: dict, extra: dict, learned: bool) -> Sampling:
    """The sampling of a version-1 record, which kept it in its method name and untyped ``meta`` strings (all made
    before EDICT's leapfrog order and DDPM inversion's authors' variance: those read as off and 'ddim')."""
    step = "stochastic" if "step_noise" in extra else "coupled" if "edict_y_T" in extra else "ddim"
    level = meta.get("start_level")
    return Sampling(
        step=step,
        eta=float(meta.get("eta", 1.0)) if step == "stochastic" else 0.0,
        mix=float(meta.get("mix", 0.93)),
        start_level=None if level is None else int(level),
        guidance_scale=float(meta.get("reconstruction_guidance_scale", guidance_scale)),
        unconditional="learned" if learned else "source" if method in ("npi", "proxnpi") else "null",
        snap_source=method == "direct_inversion",
    )


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
    """Annotations (strings), saved as JSON: the target prompts, the run identity; nothing sampling reads."""
    sampling: Sampling | None = None
    """How to sample it (:class:`Sampling`); None: plain DDIM with the null prompt at ``guidance_scale`` (a record
    made in memory by hand)."""
    path: Path | None = field(default=None, compare=False, repr=False)
    """The file :meth:`load` read it from (None: made in this process); its errors name it. Not saved."""

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def start_latent(self) -> Tensor:
        return self.trajectory[-1] if self.z_T is None else self.z_T

    @property
    def plan(self) -> Sampling:
        """Its sampling, the default one where none was given (a record made by hand)."""
        if self.sampling is not None:
            return self.sampling
        return Sampling(guidance_scale=float(self.guidance_scale),
                        unconditional="learned" if self.unconditional is not None else "null")

    @property
    def start_level(self) -> int:
        """The level sampling starts from: N, or lower where its sampling says so."""
        return self.num_steps if self.plan.start_level is None else self.plan.start_level

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
            "sampling": self.plan.to_json(),
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
        if metadata.get("format") not in _READABLE:
            raise DiffinvError(f"{path} is not a diffinv inversion record (format {metadata.get('format')!r}, "
                               f"expected {FORMAT!r})")
        missing = [k for k in _TENSORS if k not in tensors]
        if missing:
            raise DiffinvError(f"inversion record {path} is incomplete: it lacks {', '.join(missing)}")
        if tensors["timesteps"].dim() != 1 or tensors["trajectory"].dim() < 1:
            raise DiffinvError(f"inversion record {path} is inconsistent: timesteps "
                               f"{tuple(tensors['timesteps'].shape)}, trajectory {tuple(tensors['trajectory'].shape)}")
        n = len(tensors["timesteps"])
        if tensors["trajectory"].shape[0] != n + 1 or tensors["trajectory"].shape[1:] != tensors["z0"].shape:
            raise DiffinvError(f"inversion record {path} is inconsistent: trajectory {tuple(tensors['trajectory'].shape)} "
                               f"for {n} steps and z0 {tuple(tensors['z0'].shape)}")
        try:
            extra = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
            meta = json.loads(metadata.get("meta", "{}"))
            problem = _legacy_meta_problem(meta) if metadata["format"] != FORMAT else None
            if problem is not None:
                raise DiffinvError(f"inversion record {path} {problem}: it was altered or damaged; invert the image "
                                   "again")
            sampling = (Sampling.from_json(metadata["sampling"]) if metadata["format"] == FORMAT
                        else legacy_sampling(metadata["method"], float(metadata["guidance_scale"]), meta, extra,
                                             "unconditional" in tensors))
            record = cls(
                **{k: tensors[k] for k in _TENSORS},
                source_prompt=metadata["source_prompt"],
                method=metadata["method"],
                model=metadata["model"],
                guidance_scale=float(metadata["guidance_scale"]),
                unconditional=tensors.get("unconditional"),
                z_T=tensors.get("z_T"),
                extra=extra,
                meta=meta,
                sampling=sampling,
                path=path,
            )
        except (KeyError, ValueError, TypeError) as e:
            raise DiffinvError(f"inversion record {path} has broken metadata ({e})") from None
        problem = record_problem(record)
        if problem is not None:
            raise DiffinvError(f"inversion record {path} {problem}: it was altered or damaged; invert the image again")
        return record


_SAMPLED_EXTRAS = ("step_noise", "edict_y_T")
"""The ``extra`` tensors sampling reads (the others are diagnostics, e.g. latent-TOP's NaN start losses)."""


def _shape(t: Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def record_problem(record: Inversion) -> str | None:
    """What makes a record unusable whatever the model (wrong types, inconsistent shapes, NaN or infinity in what
    sampling reads, a start level or meta entry that is not a number), as the end of a sentence 'inversion
    record X ...'; None: sound. :meth:`Inversion.load` refuses a record with one; :func:`check_record` adds the
    checks against a model."""
    n = record.num_steps
    latent = tuple(record.z0.shape)
    if not isinstance(record.meta, dict):
        return f"has meta of type {type(record.meta).__name__}, expected a JSON object (a dict)"
    if record.timesteps.dim() != 1 or n < 1:
        return f"has timesteps of shape {_shape(record.timesteps)}, expected (N,) with N >= 1"
    if record.z0.dim() != 3:
        return f"has a latent z0 of shape {_shape(record.z0)}, expected (C, h, w)"
    image = record.source_image
    if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        return f"has a source image of shape {_shape(image)} and type {image.dtype}, expected (3, H, W) uint8"
    shapes = {"z_T": (record.z_T, latent), "extra.edict_y_T": (record.extra.get("edict_y_T"), latent),
              "extra.step_noise": (record.extra.get("step_noise"), (n, *latent))}
    for name, (t, want) in shapes.items():
        if t is not None and tuple(t.shape) != want:
            return f"has {name} of shape {_shape(t)}, expected {'x'.join(map(str, want))}"
    u = record.unconditional
    if u is not None and (u.dim() != 3 or u.shape[0] != n):
        return f"has an unconditional embedding of shape {_shape(u)}, expected {n}xLxD (one per step)"
    sampled = {"z0": record.z0, "trajectory": record.trajectory, "unconditional": u, "z_T": record.z_T,
               **{f"extra.{k}": record.extra.get(k) for k in _SAMPLED_EXTRAS}}
    for name, t in sampled.items():
        if t is not None and not bool(torch.isfinite(t).all()):
            return f"has NaN or infinite values in {name}"
    if not math.isfinite(record.guidance_scale) or record.guidance_scale < 0:
        return f"has guidance_scale {record.guidance_scale}, expected a finite number >= 0"
    plan = record.plan
    problem = plan.problem(n)
    if problem is not None:
        return problem
    needs = {"stochastic": ("extra.step_noise", record.extra.get("step_noise")),
             "coupled": ("extra.edict_y_T", record.extra.get("edict_y_T"))}
    if plan.step in needs and needs[plan.step][1] is None:
        return f"is sampled with the {plan.step} step but lacks {needs[plan.step][0]}"
    if plan.unconditional == "learned" and record.unconditional is None:
        return "is sampled with learned unconditional embeddings but holds none"
    return None


def check_record(record: Inversion, backbone: "Backbone") -> None:
    """Refuse, before any sampling, a record the model cannot sample (a DiffinvError naming the record's file
    and the problem): latents with another channel count than the model's VAE, latents whose size does not fit
    the stored source image (H / f x W / f, f the VAE's factor), an unconditional embedding of another shape than
    the model's conditioning, timesteps of another schedule; and whatever :meth:`Inversion.load` refuses (for a
    record made in memory). The CLI's edit path (``--data.records``) and the browser editor call it."""
    name = f"inversion record {record.path}" if record.path is not None else "the inversion record"
    problem = record_problem(record)
    if problem is not None:
        raise DiffinvError(f"{name} {problem}: it was altered or damaged; invert the image again")
    c, h, w = record.z0.shape
    channels = int(backbone.vae.config.latent_channels)
    if c != channels:
        raise DiffinvError(f"{name} holds {c}-channel latents; this model's ({backbone.name}) have {channels}: edit "
                           "it with the model it was made with (--model.backbone.pretrained)")
    f = backbone.vae_scale_factor
    height, width = record.source_image.shape[-2:]
    if (h * f, w * f) != (height, width):
        raise DiffinvError(f"{name} holds {h}x{w} latents for a {height}x{width} source image; this model's VAE "
                           f"(factor {f}) needs {height // f}x{width // f}: it was altered or made with another "
                           "model; invert the image again")
    if record.unconditional is not None:
        want = tuple(backbone.encode_prompts([""]).shape[1:])
        got = tuple(record.unconditional.shape[1:])
        if got != want:
            raise DiffinvError(f"{name} holds unconditional embeddings of shape {'x'.join(map(str, got))} per step; "
                               f"this model's ({backbone.name}) conditioning is {'x'.join(map(str, want))}: edit it "
                               "with the model it was made with (--model.backbone.pretrained)")
    made, now = record.plan.embedded_guidance, backbone.family.embedded_guidance(backbone)
    if made is not None and made != now:
        raise DiffinvError(f"{name} was made with the denoiser's embedded guidance {made:g}, and this model gives it "
                           f"{'none' if now is None else f'{now:g}'}: load the model with embedded_guidance {made:g} "
                           f"(--model.backbone.embedded_guidance {made:g}; diffinv.load(..., embedded_guidance={made:g}))")
    n = record.num_steps
    if not 1 <= n <= backbone.max_steps or not torch.equal(backbone.schedule(n, latent_size=(h, w)).timesteps.cpu(),
                                                            record.timesteps.cpu()):  # (h, w): FLUX.1-dev's mu
        raise DiffinvError(f"{name}'s {n} timesteps do not match this model's {n}-step schedule: edit it with the "
                           "model and scheduler it was made with (--model.backbone.pretrained)")


def _legacy_meta_problem(meta) -> str | None:
    """What makes a version-1 record's untyped sampling entries unreadable (the end of a sentence), or None."""
    if not isinstance(meta, dict):
        return f"has meta of type {type(meta).__name__}, expected a JSON object (a dict)"
    for key in ("eta", "mix", "reconstruction_guidance_scale"):
        if key in meta:
            try:
                value = float(meta[key])
            except (TypeError, ValueError):
                return f"has meta {key} {meta[key]!r}, expected a number"
            if not math.isfinite(value):
                return f"has meta {key} {value}, expected a finite number"
    if "start_level" in meta:
        level = meta["start_level"]
        if not (isinstance(level, (str, int)) and str(level).strip().lstrip("-").isdigit()):
            return f"has meta start_level {level!r}, expected an integer step level"
    return None
