"""The Python API, for notebooks: load a model, invert images, edit them, save and load inversion records.

    import diffinv
    model = diffinv.load()                                   # the embedded model; or a folder / hub id, any family
    inv = model.invert("cat.png", "a cat on a chair", method="npi", steps=50)   # a path, PIL image, array, tensor
    inv.reconstruction, inv.psnr                             # a PIL image; dB
    edit = inv.edit("a dog on a chair", editor=diffinv.PromptToPrompt(mode="replace"))
    edit.image
    inv.save("cat.safetensors"); diffinv.load_inversion("cat.safetensors", model)

Every method and editor is the one the CLI runs, found in the same registry (:func:`methods`); each option is a
keyword of the method's class (``model.invert(..., method="null_text", num_inner_steps=5)``), checked as the
CLI checks it. Lists invert as one batch, each result the same as alone. For the same settings and item id, the
images and records equal ``diffinv predict``'s or ``fit``'s bit for bit (tests/test_api.py).
"""

from __future__ import annotations

import inspect
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .backbone import EMBEDDED_MODEL, Backbone, BackboneConfig
from .data import InputRow, Item, build_items, check_prompt
from .data.images import rgb_array
from .data.items import MAX_ASPECT
from .editing.editor import Editor
from .errors import DiffinvError
from .inversion import Inversion, InversionMethod, check_record, registry
from .inversion.base import StepObserver
from .metrics import psnr
from .output import DONE_MARKER, to_pil
from .progress import Progress, console_progress, model_progress




def methods() -> dict[str, str]:
    """The inversion methods, ``{name: label}``: what ``method=`` takes (a label or a class name also works)."""
    return {m.name: m.label for m in registry.METHODS}


def _entry(method: str) -> registry.Method:
    """The registered method named ``method``: its name, label or class name, in any case."""
    wanted = str(method).strip().lower()
    for m in registry.METHODS:
        if wanted in (m.name.lower(), m.label.lower(), m.cls.__name__.lower()):
            return m
    raise DiffinvError(f"unknown inversion method {method!r}: one of {', '.join(m.name for m in registry.METHODS)}")


def load(model: str = EMBEDDED_MODEL, device: str = "auto", revision: str | None = None,
         variant: str | None = None, embedded_guidance: float | None = None) -> Model:
    """A model to invert and edit with.

    Args:
        model: 'shapes' (the embedded offline model), a local folder in diffusers layout, or a hub id (read from
            the hub cache; downloaded only where HF_HUB_OFFLINE is not set): SD 1.x/2.x, SDXL, SD 3/3.5, FLUX.1.
        device: 'cpu', 'cuda', 'cuda:1', ... or 'auto' (the GPU where there is one).
        revision: The hub revision of a hub id.
        variant: A weight variant to load, e.g. 'fp16'.
        embedded_guidance: A guidance-distilled model's guidance scale (FLUX.1-dev; default its pipeline's 3.5).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise DiffinvError(f"unknown device {device!r} ({e})") from None
    config = BackboneConfig(pretrained=model, revision=revision, variant=variant, embedded_guidance=embedded_guidance)
    return Model(Backbone.load(config).to(device), config)


def load_inversion(path: str | Path, model: Model, id: str | None = None, **options) -> Inverted:
    """A saved inversion record (from :meth:`Inverted.save`, ``diffinv predict``/``fit`` or the browser editor),
    reconstructed on ``model``. ``id``: the item id its edits' seeded noise is keyed by (SDEdit, FlowEdit); default:
    the id it was inverted under, which the record keeps (records of earlier versions: as the CLI names them, its
    folder's name for ``<id>/inversion.safetensors``, else the file's name). ``options``: the method's settings a record of its kind pins (ProxNPI's
    ``proximal``), where they are not the defaults."""
    return model.load_inversion(path, id=id, **options)


class Model:
    """A loaded model (:func:`load`) and the methods run on it, which share it."""

    def __init__(self, backbone: Backbone, config: BackboneConfig | None = None):
        self.backbone = backbone
        self.config = config or BackboneConfig(pretrained=backbone.name)

    def __repr__(self) -> str:
        return f"diffinv.Model({self.config.pretrained!r}, {self.backbone.family.name}, {self.device})"

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def method(self, method: str | registry.Method = "npi", steps: int = 50, guidance_scale: float | None = None,
               editor: Editor | None = None, **options) -> InversionMethod:
        """The inversion method ``method`` with these settings, on this (already loaded) model."""
        entry = method if isinstance(method, registry.Method) else _entry(method)
        kw = dict(backbone=self.config, num_inference_steps=steps, editor=editor, **options)
        if guidance_scale is not None:
            kw["guidance_scale"] = guidance_scale
        try:
            m = entry.cls(**kw)
        except TypeError as e:
            if "unexpected keyword" not in str(e):
                raise
            allowed = [p for p in inspect.signature(entry.cls).parameters if p not in ("self", "backbone")]
            unknown = sorted(set(options) - set(allowed))
            raise DiffinvError(f"{entry.name} takes no option {', '.join(unknown) or e}: it takes "
                               f"{', '.join(allowed)}") from None
        m._backbone = self.backbone
        m.given = frozenset(options)  # typed here: a record's pinned value that differs is refused, as on the CLI
        return m.to(self.device)

    def invert(self, image, prompt: str | list[str], method: str = "npi", steps: int = 50,
               guidance_scale: float | None = None, targets: list[str] | list[list[str]] = (),
               id: str | list[str] | None = None, progress: bool | Progress = True,
               **options) -> Inverted | list[Inverted]:
        """Invert one image, or a list of them as one batch (each result as alone).

        Args:
            image: A path, a PIL image, an (H, W, 3) / (H, W) array (uint8, or float in [0, 1]) or a (3, H, W)
                tensor; or a list of them.
            prompt: The image's caption (the source prompt); a list with a list of images.
            method: An inversion method (:func:`methods`: 'ddim', 'npi', 'proxnpi', 'null_text', 'latent_top',
                'cycle_diffusion', 'direct_inversion', 'edict', 'ddpm_inversion'; on flow models 'rf_solver',
                'fireflow', 'rf_inversion'; a label such as 'NTI' too).
            steps: The number of sampling steps.
            guidance_scale: Classifier-free guidance scale (the method's default where None).
            targets: Target prompts edited in the same run (plain prompt swap; :meth:`Inverted.edit` for editors),
                a list per image with a list of images.
            id: The item id (seeds the keyed noise of CycleDiffusion, DDPM inversion and SDEdit, as the CLI's
                ``--data`` ids do): a path's file name or 'image' where None.
            progress: Draw a progress bar (or tell this function: ``progress(fraction, what)``).
            options: The method's other settings (e.g. ``num_inner_steps`` for null-text inversion,
                ``proximal=diffinv.ProximalGuidance(quantile=0.7)`` for ProxNPI).
        """
        many = isinstance(image, (list, tuple))
        images, prompts = (list(image), prompt) if many else ([image], [prompt])
        if not isinstance(prompts, (list, tuple)) or len(prompts) != len(images):
            raise DiffinvError(f"{len(images)} image(s) need as many prompts, got "
                               f"{len(prompts) if isinstance(prompts, (list, tuple)) else 'one'}")
        per_image = [list(targets[k]) for k in range(len(images))] if many and targets else \
            [list(targets)] * len(images) if not many else [[] for _ in images]
        ids = list(id) if many and id is not None else [id] * len(images)
        items = _items(images, prompts, per_image, ids)
        entry = _entry(method)
        m = self.method(entry, steps, guidance_scale, **options)
        m.check_items(items)
        phases = ["inverting", "optimising", "sampling"] if entry.optimizes else ["inverting", "sampling"]
        h, w = m.fitted_image(items[0]).shape[:2]
        f = self.backbone.vae_scale_factor  # the timesteps of the image's size (FLUX.1-dev's shift depends on it)
        timesteps = self.backbone.schedule(steps, latent_size=(h // f, w // f)).timesteps
        t0 = time.perf_counter()
        with console_progress(progress) as report, model_progress(self.backbone, timesteps, phases, report), \
                (torch.enable_grad() if entry.optimizes else torch.no_grad()):
            results = m.run_batch(items)
        seconds = (time.perf_counter() - t0) / len(items)
        out = [Inverted(self, r.inversion, r.id, r.source, r.reconstruction, options, seconds,
                        [Edited(t, e, "prompt", seconds) for t, e in zip(r.target_prompts, r.edits)])
               for r in results]
        return out if many else out[0]

    def load_inversion(self, path: str | Path, id: str | None = None, progress: bool | Progress = False,
                       record: Inversion | None = None, **options) -> Inverted:
        """See :func:`load_inversion`; ``progress``: as :meth:`invert`'s; ``record``: the record already read from
        ``path`` (by a caller that checked it first: the browser editor), so that what was checked is what runs."""
        record = Inversion.load(path) if record is None else record
        path = Path(path)
        item_id = id or record.meta.get("item_id") or (path.parent.name if path.name == DONE_MARKER else path.stem)
        if record.model != self.config.pretrained:
            warnings.warn(f"{path} was made with model {record.model!r}, reconstructed with "
                          f"{self.config.pretrained!r}", stacklevel=2)
        check_record(record, self.backbone)
        t0 = time.perf_counter()
        [reconstruction] = _sample(self, record, [], None, options, progress, item_id)
        return Inverted(self, record, item_id, record.source_image.float() / 255, reconstruction, options,
                        time.perf_counter() - t0)


@dataclass
class Edited:
    """One edit of an inversion."""

    prompt: str
    tensor: Tensor = field(repr=False)
    """(3, H, W) in [0, 1], on the CPU."""
    editor: str
    """What made it: 'prompt' (the prompt swap), 'prompt_to_prompt', 'sdedit', 'flowedit'."""
    seconds: float

    @property
    def image(self):
        """The edit as a PIL image."""
        return to_pil(self.tensor)


@dataclass
class Inverted:
    """An image's inversion: its record, reconstruction and the edits made in the same run; edit it again with
    :meth:`edit`, save it with :meth:`save`."""

    model: Model = field(repr=False)
    record: Inversion = field(repr=False)
    id: str
    source_tensor: Tensor = field(repr=False)
    reconstruction_tensor: Tensor = field(repr=False)
    options: dict = field(default_factory=dict, repr=False)
    seconds: float = 0.0
    edits: list[Edited] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.record.method

    @property
    def source(self):
        """The image as the model saw it (resized, cropped to the model's multiple), a PIL image."""
        return to_pil(self.source_tensor)

    @property
    def reconstruction(self):
        """The reconstruction, a PIL image."""
        return to_pil(self.reconstruction_tensor)

    @property
    def psnr(self) -> float:
        """The reconstruction's PSNR against the source in dB (inf where identical)."""
        return psnr(self.reconstruction_tensor, self.source_tensor)

    def edit(self, target: str | list[str], editor: Editor | None = None, progress: bool | Progress = False,
             observe: StepObserver | None = None) -> Edited | list[Edited]:
        """Edit with one target prompt, or several (one batch), from the inversion (no new inversion): the prompt
        swap, or ``editor`` (``diffinv.PromptToPrompt(...)``, ``diffinv.SDEdit(...)``). ``progress``: as
        :meth:`Model.invert`'s; ``observe``: told every sampling step (the rows, the level left, the latents and
        ProxNPI's unedited-region mask)."""
        many = isinstance(target, (list, tuple))
        targets = [check_prompt(t, f"target prompt {k}") for k, t in enumerate(target if many else [target])]
        t0 = time.perf_counter()
        images = _sample(self.model, self.record, targets, editor, self.options, progress, self.id, observe)
        seconds = (time.perf_counter() - t0) / len(targets)
        name = editor.edit_name if editor is not None else Editor.edit_name
        out = [Edited(t, image, name, seconds) for t, image in zip(targets, images)]
        return out if many else out[0]

    def save(self, path: str | Path) -> Path:
        """Write the record (safetensors) to ``path``; it re-edits as it was inverted (:func:`load_inversion`,
        ``diffinv predict --data.records``)."""
        return self.record.save(path)


def _sample(model: Model, record: Inversion, targets: list[str], editor: Editor | None, options: dict,
            progress: bool | Progress, item_id: str = "image", watch: StepObserver | None = None) -> list[Tensor]:
    """The record's reconstruction (no targets) or its edits, decoded, (3, H, W) on the CPU each: the method that
    made it, with its own step count and guidance scale, as ``diffinv predict`` edits a saved record."""
    entry = registry.by_name(record.method)
    m = model.method(entry, record.num_steps, record.guidance_scale, editor=editor, **options)
    m.check_items([])  # the step count, the method and the editor against the model
    m.check_saved(record)
    if editor is not None:
        editor.check(model.backbone.layout, record.source_prompt, targets)
    for message in model.backbone.prompt_warnings(targets):
        warnings.warn(message, stacklevel=3)
    n = record.num_steps
    with console_progress(progress) as report, torch.no_grad():
        def observe(rows, k, z, keep):
            report(min(0.99, (n - k + 1) / n), f"sampling: step {n - k + 1}/{n}")
            if watch is not None:
                watch(rows, k, z, keep)

        [(reconstruction, edits)] = m.edit([record], [targets], ids=[item_id], observe=observe)
        wanted = edits if targets else [reconstruction]
        return list(model.backbone.decode(torch.stack(wanted).to(model.device)).cpu())


def _items(images: list, prompts: list, targets: list[list[str]], ids: list[str | None]) -> list[Item]:
    """The items of a batch, as the CLI builds them (:func:`~diffinv.data.build_items`: prompts and ids checked,
    ids made unique, over-long images refused, one line naming the bad one): paths read as the CLI reads them,
    arrays, PIL images and tensors converted."""
    rows = []
    for k, (image, prompt, tgt, uid) in enumerate(zip(images, prompts, targets, ids)):
        if isinstance(image, (str, Path)):
            rows.append(InputRow(f"image {image}", prompt, tgt, image=Path(image).expanduser(), id=uid))
        else:
            where = f"image {k}" if len(images) > 1 else "the image"
            rows.append(InputRow(where, prompt, tgt, id=uid or "image", pixels=_rgb(image, where)))
    return build_items(rows, None, False, max_aspect=MAX_ASPECT)


def _rgb(image, what: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a PIL image, an array or a tensor; anything else refused in one line."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        return rgb_array(image, what)
    if isinstance(image, Tensor):
        t = image.detach().cpu()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
            t = t.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
        image = t.numpy()
    if not isinstance(image, np.ndarray):
        raise DiffinvError(f"{what} must be a path, a PIL image, an array or a tensor, got {type(image).__name__}")
    a = image[..., None] if image.ndim == 2 else image
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4) or min(a.shape[:2]) < 1:
        raise DiffinvError(f"{what} has shape {tuple(image.shape)}: expected (H, W), (H, W, 3) or (H, W, 4), or a "
                           "(3, H, W) tensor")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise DiffinvError(f"{what} is {a.dtype}: give uint8 (0-255) or floats in [0, 1] (no NaN)")
        a = np.clip(np.round(a.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.shape[-1] == 4:  # transparency over white, as an image file's
        return rgb_array(Image.fromarray(a, "RGBA"), what)
    return np.ascontiguousarray(a)


__all__ = ["Edited", "Inverted", "Model", "load", "load_inversion", "methods"]
