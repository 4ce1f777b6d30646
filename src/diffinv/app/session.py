"""The browser editor's work without the browser: invert one image once, then edit it any number of times.

:class:`Studio` holds the loaded models (the Python API's :class:`~diffinv.api.Model`; one lock per model: one
request at a time on its device) and the folder the user chose; every browser session has its own
:class:`Session` and its own sub-folder, so nothing passes between two sessions. The Gradio page
(:mod:`diffinv.app.ui`) is a thin layer over :meth:`Studio.invert`, :meth:`Studio.edit` and
:meth:`Studio.load_record`, which invert, edit and load through the Python API (:mod:`diffinv.api`): an edit made
here equals the API's and the CLI's edit of the same image, prompts and settings.
"""

from __future__ import annotations

import re
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from .. import api
from ..backbone import EMBEDDED_MODEL, Backbone
from ..data import check_prompt
from ..editing.editor import Editor, Row
from ..editing.prompt_to_prompt import PromptToPrompt
from ..editing.sdedit import SDEdit
from ..errors import DiffinvError
from ..guidance import ProximalGuidance
from ..inversion import Inversion, InversionMethod, registry
from ..output import save_png
from ..progress import Progress
from .guard import SESSIONS, ModelMenu

METHODS: dict[str, type[InversionMethod]] = {m.label: m.cls for m in registry.methods(in_app=True)}
"""The methods the page inverts with, by label (the optimizing ones show a progress bar while they optimise);
from :mod:`diffinv.inversion.registry`."""

RECORD_METHODS: dict[str, type[InversionMethod]] = {m.name: m.cls for m in registry.methods()}
"""Every method whose saved records the page can load and edit (by the record's ``method`` field): every
registered one."""

EditorName = Literal["none", "P2P replace", "P2P refine", "P2P reweight", "SDEdit"]
EDITORS: tuple[str, ...] = EditorName.__args__
MAX_EDITS = 64
"""Edits kept per session; older ones leave the gallery (their files stay in the session's folder)."""

def _quiet(fraction: float, what: str) -> None:
    return None


@dataclass
class InvertSettings:
    """What the Invert button runs."""

    model: str = EMBEDDED_MODEL
    """One of the server's models, by the name the page shows (see :class:`~diffinv.app.guard.ModelMenu`)."""
    method: str = "NPI"
    """One of :data:`METHODS`."""
    steps: int = 50
    """DDIM steps of inversion and sampling."""
    guidance_scale: float = 7.5
    """CFG scale of reconstruction and edits (ProxNPI: the scale of its proximal guidance)."""
    quantile: float = 0.7
    """ProxNPI's threshold quantile (ignored by the other methods)."""


@dataclass
class EditSettings:
    """What the Edit button runs on the session's inversion."""

    target_prompt: str
    editor: str = "none"
    """One of :data:`EDITORS`: none (the target prompt alone, the source prompt as negative where the method says
    so), Prompt-to-Prompt replace / refine / reweight, or SDEdit."""
    reweight_words: str = ""
    """P2P reweight: words of the target prompt whose attention is scaled (comma- or space-separated)."""
    reweight_scale: float = 2.0
    blend_words: str = ""
    """P2P local blend: source and target words whose region alone may change; empty: no local blend."""
    cross_replace_steps: float = 0.8
    self_replace_steps: float = 0.4
    sdedit_strength: float = 0.5
    show_mask: bool = False
    """ProxNPI: also return the edit's mask (where the proximal operator let the edit act, averaged over steps)."""


@dataclass
class Picture:
    """One image the page shows: its file, a caption and the seconds it took."""

    path: Path
    caption: str
    seconds: float = 0.0


@dataclass
class Inverted:
    """What Invert (or Load) produced."""

    source: Picture
    reconstruction: Picture
    psnr: float
    record: Path
    warnings: list[str] = field(default_factory=list)


@dataclass
class Edited:
    image: Picture
    mask: Picture | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class Session:
    """One browser session's state: its folder, its current inversion and its edits (never shared)."""

    folder: Path
    inverted: api.Inverted | None = None
    """The current inversion (the Python API's: its record re-edits as it was made)."""
    record_path: Path | None = None
    run: Path | None = None
    """The current inversion's sub-folder (one per Invert/Load: a new one never overwrites an older one)."""
    settings: InvertSettings = field(default_factory=InvertSettings)
    edits: list[Picture] = field(default_factory=list)
    runs: int = 0

    @property
    def record(self) -> Inversion | None:
        return None if self.inverted is None else self.inverted.record

    def files(self) -> list[Path]:
        """The current inversion's downloadable files: its record, source, reconstruction and edits."""
        if self.run is None:
            return []
        return sorted(p for p in self.run.iterdir() if p.suffix in (".png", ".safetensors"))

    def gallery(self) -> list[Picture]:
        """The source, then every edit (and mask) in order."""
        if self.run is None:
            return []
        return [Picture(self.run / "source.png", "source"), *self.edits]


def split_words(text: str) -> list[str]:
    """'cat, dog' or 'cat dog' -> ['cat', 'dog']."""
    return [w for w in re.split(r"[,\s]+", text or "") if w]


def build_editor(settings: EditSettings) -> Editor | None:
    """The editor the settings name (None: a plain prompt swap); bad values raise a one-line DiffinvError."""
    name = settings.editor
    if name not in EDITORS:
        raise DiffinvError(f"unknown editor {name!r}: choose one of {', '.join(EDITORS)}")
    if name == "none":
        return None
    if name == "SDEdit":
        return SDEdit(strength=float(settings.sdedit_strength))
    reweight = split_words(settings.reweight_words) if name == "P2P reweight" else []
    if name == "P2P reweight" and not reweight:
        raise DiffinvError("P2P reweight needs the words to reweight (e.g. 'red')")
    return PromptToPrompt(
        mode="replace" if name == "P2P replace" else "refine",
        cross_replace_steps=float(settings.cross_replace_steps),
        self_replace_steps=float(settings.self_replace_steps),
        reweight_words=reweight or None,
        reweight_scale=float(settings.reweight_scale),
        local_blend_words=split_words(settings.blend_words) or None,
    )


def _number(value, what: str, low: float, high: float, integer: bool = False) -> float | int:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise DiffinvError(f"{what} must be a number, got {value!r}") from None
    if not low <= x <= high or (integer and x != int(x)):
        kind = "a whole number" if integer else "a number"
        raise DiffinvError(f"{what} must be {kind} in [{low:g}, {high:g}], got {value!r}")
    return int(x) if integer else x


def _write_png(image: Tensor, path: Path) -> Path:
    """Write atomically (temporary file, then rename): a page never sees half a PNG."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    save_png(image, tmp)
    tmp.replace(path)
    return path


def _caught(found: list[warnings.WarningMessage]) -> list[str]:
    seen: list[str] = []
    for w in found:
        text = str(w.message).splitlines()[0]
        if text not in seen:
            seen.append(text)
    return seen


class Studio:
    """The models and the folder of one ``diffinv serve``; the sessions' work runs here.

    Args:
        folder: Where everything is written (a sub-folder per browser session); nothing is written elsewhere.
        device: 'cpu', 'cuda', 'cuda:1', ... or 'auto' (the GPU where there is one).
        max_models: Models kept loaded at once; loading another drops the least recently used (when idle).
        models: The models sessions may use (``--model.backbone.pretrained`` values), the default first; no
            other model is ever loaded, whatever a form or a record names.
        max_side: The longest image side a session may invert, and a record's source image may have, in pixels.
    """

    def __init__(self, folder: str | Path, device: str = "auto", max_models: int = 1,
                 models: list[str] | tuple[str, ...] = (EMBEDDED_MODEL,), max_side: int = 2048):
        self.folder = Path(folder).expanduser().resolve()
        self.models = ModelMenu(models)
        self.max_side = int(max_side)
        self.folder.mkdir(parents=True, exist_ok=True)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except RuntimeError as e:
            raise DiffinvError(f"unknown device {device!r} ({e})") from None
        self.max_models = max(1, int(max_models))
        self._models: OrderedDict[str, api.Model] = OrderedDict()
        self._locks: dict[str, threading.Lock] = {}
        self._pool = threading.Lock()

    # --- models -----------------------------------------------------------------------------------------------
    def _lock(self, model: str) -> threading.Lock:
        with self._pool:
            return self._locks.setdefault(model, threading.Lock())

    def model(self, model: str) -> api.Model:
        """The loaded model (loaded on first use; a missing one raises a one-line DiffinvError). Only the
        server's models are ever loaded: ``model`` is one of :attr:`models`, by name or by value."""
        model = self.models.pretrained(model)
        with self._pool:
            if model in self._models:
                self._models.move_to_end(model)
                return self._models[model]
            for old in list(self._models):
                if len(self._models) < self.max_models:
                    break
                lock = self._locks.get(old)
                if lock is None or not lock.locked():
                    del self._models[old]
        loaded = api.load(model, device=str(self.device))
        with self._pool:
            self._models[model] = loaded
        return loaded

    def backbone(self, model: str) -> Backbone:
        """The loaded model's backbone (:meth:`model`)."""
        return self.model(model).backbone

    @staticmethod
    def options(entry: registry.Method, quantile: float) -> dict:
        """The method's page settings beyond steps and guidance (ProxNPI's quantile)."""
        return {"proximal": ProximalGuidance(quantile=quantile)} if entry.proximal else {}

    # --- sessions ---------------------------------------------------------------------------------------------
    def session(self, key: str) -> Session:
        """A new session whose files go to ``<folder>/sessions/<key>``."""
        safe = re.sub(r"[^A-Za-z0-9_-]+", "_", key or "session")[:64] or "session"
        return Session(folder=self.folder / SESSIONS / safe)

    def _check_side(self, width: int, height: int, what: str) -> None:
        """Refuse an image over the server's ``max_side`` before any work."""
        if max(width, height) > self.max_side:
            raise DiffinvError(f"the {what} is {width}x{height} pixels; this server takes at most {self.max_side} "
                               "pixels a side (--max_side)")

    def _image_side(self, image: Path) -> None:
        """The image's size from its header (nothing decoded) against ``max_side``; an unreadable file is left to
        the usual image checks, which say what is wrong with it."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(image) as im:
                width, height = im.size
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            return
        self._check_side(width, height, "image")

    def _new_run(self, session: Session) -> Path:
        session.runs += 1
        run = session.folder / f"inversion-{session.runs:03d}"
        while run.exists():
            session.runs += 1
            run = session.folder / f"inversion-{session.runs:03d}"
        run.mkdir(parents=True)
        return run

    def _publish(self, session: Session, run: Path, inverted: api.Inverted, settings: InvertSettings,
                 seconds: float, found: list[str]) -> Inverted:
        """Write the run's files (the record last), then make it the session's current inversion."""
        _write_png(inverted.source_tensor, run / "source.png")
        _write_png(inverted.reconstruction_tensor, run / "reconstruction.png")
        path = inverted.save(run / "inversion.safetensors")
        value = inverted.psnr
        session.inverted, session.record_path, session.run, session.settings = inverted, path, run, settings
        session.edits = []
        return Inverted(
            source=Picture(run / "source.png", "source"),
            reconstruction=Picture(run / "reconstruction.png", f"reconstruction, {value:.2f} dB", seconds),
            psnr=value, record=path, warnings=found)

    def invert(self, session: Session, image: str | Path | None, caption: str, settings: InvertSettings,
               progress: Progress = _quiet) -> Inverted:
        """Check and invert one image with its caption; the session's current inversion becomes it."""
        if image is None or not str(image).strip():
            raise DiffinvError("no image: upload one first")
        if settings.method not in METHODS:
            raise DiffinvError(f"unknown method {settings.method!r}: choose one of {', '.join(METHODS)}")
        steps = _number(settings.steps, "steps", 1, 1000, integer=True)
        scale = _number(settings.guidance_scale, "guidance scale", 0, 100)
        quantile = _number(settings.quantile, "ProxNPI quantile", 0, 1)
        model = self.models.name_of((settings.model or "").strip() or self.models.names[0])
        settings = InvertSettings(model, settings.method, steps, scale, quantile)
        caption = check_prompt(caption, "the caption")
        self._image_side(Path(image))
        entry = registry.by_label(settings.method)
        progress(0.0, f"loading {model}")
        with self._lock(model):
            loaded = self.model(model)
            with warnings.catch_warnings(record=True) as found:
                warnings.simplefilter("always")
                t0 = time.perf_counter()
                inverted = loaded.invert(Path(image), caption, method=entry.name, steps=steps, guidance_scale=scale,
                                         id="image", progress=progress, **self.options(entry, quantile))
                seconds = time.perf_counter() - t0
            run = self._new_run(session)
        progress(1.0, "done")
        return self._publish(session, run, inverted, settings, seconds, _caught(found))

    def load_record(self, session: Session, path: str | Path, progress: Progress = _quiet) -> Inverted:
        """Load a saved inversion record (from this page or ``diffinv predict``/``fit``) and reconstruct it."""
        if path is None or not str(path).strip():
            raise DiffinvError("no record: upload a .safetensors inversion record")
        record = Inversion.load(path)
        if record.method not in RECORD_METHODS:
            raise DiffinvError(f"the record was made by method {record.method!r}, which the page cannot edit "
                               f"(it edits {', '.join(RECORD_METHODS)})")
        try:
            model = self.models.name_of(record.model)
        except DiffinvError as e:
            raise DiffinvError(f"the record's model: {e}") from None
        self._check_side(record.source_image.shape[-1], record.source_image.shape[-2], "record's source image")
        entry = registry.by_name(record.method)
        name = entry.label if entry.in_app else record.method
        settings = InvertSettings(model, name, record.num_steps, record.guidance_scale)
        progress(0.0, f"loading {model}")
        with self._lock(model):
            loaded = self.model(model)
            with warnings.catch_warnings(record=True) as found:
                warnings.simplefilter("always")
                t0 = time.perf_counter()
                inverted = loaded.load_inversion(path, progress=progress, record=record,
                                                 **self.options(entry, settings.quantile))
                seconds = time.perf_counter() - t0
            run = self._new_run(session)
        return self._publish(session, run, inverted, settings, seconds, _caught(found))

    def edit(self, session: Session, settings: EditSettings, progress: Progress = _quiet) -> Edited:
        """Edit the session's current inversion with one target prompt (no new inversion)."""
        inverted = session.inverted
        if inverted is None or session.run is None:
            raise DiffinvError("nothing to edit yet: invert an image (or load a record) first")
        target = check_prompt(settings.target_prompt, "the target prompt")
        editor = build_editor(settings)
        with self._lock(session.settings.model):
            inverted.model = self.model(session.settings.model)  # the loaded one: never keep an evicted copy alive
            masks: list[Tensor] = []

            def observe(rows: list[Row], k: int, z: Tensor, keep: Tensor | None) -> None:
                if keep is not None:
                    masks.extend(1 - keep[r].float().cpu() for r, row in enumerate(rows) if row.is_edit)

            with warnings.catch_warnings(record=True) as found:
                warnings.simplefilter("always")
                edited = inverted.edit(target, editor, progress=progress, observe=observe)
            image, seconds = edited.tensor, edited.seconds
        number = len(list(session.run.glob("edit-[0-9][0-9][0-9].png"))) + 1
        name = f"edit-{number:03d}"
        label = settings.editor if settings.editor != "none" else "prompt"
        picture = Picture(_write_png(image, session.run / f"{name}.png"),
                          f"{target} ({label}, {seconds:.1f} s)", seconds)
        mask = None
        if settings.show_mask and masks:
            m = torch.stack(masks).mean((0, 1))[None]  # (1, h, w): the share of steps and channels edited
            big = torch.nn.functional.interpolate(m[None], size=image.shape[-2:], mode="nearest")[0]
            mask = Picture(_write_png(big.expand(3, -1, -1), session.run / f"{name}-mask.png"),
                           f"edit mask of '{target}' (white: edited)", 0.0)
        session.edits = [*session.edits, picture, *([mask] if mask else [])][-MAX_EDITS:]
        progress(1.0, "done")
        return Edited(picture, mask, _caught(found))
