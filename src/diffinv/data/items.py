"""The item schema: :class:`Item` (an image with its prompts, ready to run) and :class:`InputRow` (one item from
any source, before its image is read); checks of prompts, ids, manifest lines and annotations; and
:func:`build_items`, which turns rows into items."""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DiffinvError
from ..output import check_item_id, is_line_field
from .images import load_image


@dataclass
class Item:
    id: str
    image: np.ndarray
    """(H, W, 3) uint8 RGB, at the file's own size."""
    source_prompt: str
    target_prompts: list[str] = field(default_factory=list)
    resolution: int | None = None
    square: bool = False
    inversion: Path | None = None
    """A saved Inversion record to edit instead of inverting ``image`` again."""
    meta: dict = field(default_factory=dict)
    """Dataset annotations carried along (PIE-Bench: editing_type_id, blended_word, mask RLE, ...)."""


def check_prompt(prompt, what: str) -> str:
    if not isinstance(prompt, str):
        raise DiffinvError(f"{what} must be a string, got {type(prompt).__name__}: {prompt!r}")
    if not prompt.strip():
        raise DiffinvError(f"{what} is empty: give a caption of the image (source) or of the wanted edit (target)")
    return prompt.strip()


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "item"


@dataclass
class InputRow:
    """One item to run, from any source (a manifest line, the command line, a saved record, PIE-Bench, COCO),
    before its image is read; ``where`` names it in messages."""

    where: str
    source_prompt: str | None
    target_prompts: list[str] = field(default_factory=list)
    image: Path | None = None
    inversion: Path | None = None
    id: str | None = None
    meta: dict = field(default_factory=dict)
    record: object | None = None
    """The loaded Inversion where the row edits a saved record."""
    pixels: np.ndarray | None = None
    """The image itself, (H, W, 3) uint8 RGB, where it is in memory rather than a file (the Python API)."""


MANIFEST_KEYS = {
    "image": "path of the image, relative to the manifest's folder",
    "source_prompt": "caption of the image",
    "target_prompts": "edit prompts: a list of strings (or one string)",
    "id": "the name of the item's output folder; default: the image file's name",
    "inversion": "a saved inversion record to edit instead of an image",
    "meta": "an object of annotations carried into metrics.jsonl",
}
"""The keys of a manifest line. Any other key is an annotation, carried into metrics.jsonl like ``meta``'s; a key
that looks like a misspelt one of these (``target_prompt``) is refused, and so is an annotation (here or in
``meta``) named like a field diffinv writes in a line (``psnr``, ``kind``, ``id``:
:func:`diffinv.output.is_line_field`)."""


def _json_type(value) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _check_annotations(annotations: dict, where: str, what: str) -> None:
    """Refuse an annotation named like a field diffinv writes in metrics.jsonl (a measurement such as ``psnr``,
    or the line's identity: ``id``, ``kind``, ``image_path``, ...): it would replace the measured value."""
    for key in annotations:
        if is_line_field(key):
            raise DiffinvError(f"{where}: {what}{key!r} is a field diffinv writes in metrics.jsonl (a measurement or "
                               f"what the line is): an annotation cannot replace it; rename it (e.g. 'my_{key}')")


def manifest_row(obj, folder: Path, where: str) -> InputRow:
    """One manifest line, checked against :data:`MANIFEST_KEYS` (types, required keys, unknown keys)."""
    if not isinstance(obj, dict):
        raise DiffinvError(f"{where}: each line must be a JSON object, got {_json_type(obj)}")
    extra = {k: v for k, v in obj.items() if k not in MANIFEST_KEYS}
    for key in extra:
        near = difflib.get_close_matches(key.lower(), MANIFEST_KEYS, n=1, cutoff=0.75)
        if near:
            raise DiffinvError(f"{where}: unknown key {key!r}: did you mean {near[0]!r}? ({MANIFEST_KEYS[near[0]]})")
    for key in ("image", "inversion", "id", "source_prompt"):
        if key in obj and not isinstance(obj[key], str):
            got = "null" if obj[key] is None else f"{_json_type(obj[key])} ({json.dumps(obj[key])[:60]})"
            raise DiffinvError(f"{where}: \"{key}\" must be a string ({MANIFEST_KEYS[key]}), got {got}"
                               + ("; leave the key out for the default" if key == "id" else ""))
    for key in ("image", "inversion", "id"):
        if key in obj and not obj[key].strip():
            raise DiffinvError(f"{where}: \"{key}\" is empty")
    if not (("image" in obj and "source_prompt" in obj) or "inversion" in obj):
        raise DiffinvError(f"{where}: each line needs at least \"image\" and \"source_prompt\" "
                           "(or \"inversion\": a saved record to edit)")
    targets = obj.get("target_prompts", [])
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise DiffinvError(f"{where}: \"target_prompts\" must be a list of strings, got {json.dumps(targets)[:80]}")
    if not isinstance(obj.get("meta", {}), dict):
        raise DiffinvError(f"{where}: \"meta\" must be an object, got {_json_type(obj['meta'])}")
    _check_annotations(extra, where, "")
    _check_annotations(obj.get("meta", {}), where, '"meta" key ')
    resolve = lambda p: p if p.is_absolute() else folder / p  # noqa: E731
    return InputRow(
        where=where,
        image=resolve(Path(obj["image"]).expanduser()) if "image" in obj else None,
        inversion=resolve(Path(obj["inversion"]).expanduser()) if "inversion" in obj else None,
        source_prompt=obj.get("source_prompt"),
        target_prompts=targets,
        id=obj.get("id"),
        meta=obj.get("meta", {}) | extra,
    )


MAX_ASPECT = 4.0
"""The default refusal of an image whose long side is over this many times its short one (--data.max_aspect, the
Python API)."""


def build_items(rows: list[InputRow], resolution: int | None, square: bool, max_aspect: float | None = None) -> list[Item]:
    """Read and check every row's image and prompts (any problem: one line naming the row); ids made unique.
    ``max_aspect``: refuse an image whose long side is more than this many times its short one (unless
    ``square`` crops it)."""
    items, seen = [], set()
    for row in rows:
        if row.inversion is not None and row.record is None:
            from ..inversion.record import Inversion

            row = dataclasses.replace(row, record=Inversion.load(row.inversion))
            row.source_prompt = row.source_prompt or row.record.source_prompt
        source = check_prompt(row.source_prompt, f"source_prompt ({row.where})")
        if not isinstance(row.target_prompts, list):
            raise DiffinvError(f"target_prompts ({row.where}) must be a list of strings")
        targets = [check_prompt(t, f"target prompt {k} ({row.where})") for k, t in enumerate(row.target_prompts)]
        base = _safe_id(row.id or Path(row.image or row.inversion).stem)
        uid, n = base, 1
        while uid in seen:
            n += 1
            uid = f"{base}-{n}"
        check_item_id(uid, row.where)
        seen.add(uid)
        if row.record is not None:
            image = row.record.source_image.permute(1, 2, 0).numpy()
            items.append(Item(uid, image, source, targets, inversion=Path(row.inversion)))
            continue
        image = row.pixels if row.pixels is not None else load_image(row.image)
        h, w = image.shape[:2]
        if max_aspect is not None and not square and max(h, w) > max_aspect * min(h, w):
            raise DiffinvError(
                f"{f'image {row.image}' if row.image is not None else row.where} is {w}x{h}, {max(h, w) / min(h, w):.0f}:1, over --data.max_aspect {max_aspect:g}: "
                "its short side would be scaled to the model's size and the long one to many times it; crop it, "
                "or pass --data.square true (centre square) or a larger --data.max_aspect")
        items.append(Item(uid, image, source, targets, resolution, square, meta=row.meta))
    return items
