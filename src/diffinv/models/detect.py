"""Which family a diffusers folder or hub id is: the registry of families, asked in priority order.

Adding a family: its module (a class with the :class:`~diffinv.models.family.Family` methods and a ``detect``
classmethod) and its line in :data:`FAMILIES`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .family import Family, model_index
from .flux import Flux
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL

FAMILIES: tuple[type, ...] = (Flux, StableDiffusion3, StableDiffusionXL, StableDiffusion)
"""The families in priority order: the first whose ``detect`` recognises the model is its family
(StableDiffusion recognises any: the fallback)."""


def _transformer_class(source: str, local: bool, index: dict) -> str:
    """The class name of the folder's ``transformer``: model_index.json's entry, else (a local folder without one)
    its transformer/config.json's ``_class_name`` ('' where neither says)."""
    entry = index.get("transformer")
    if isinstance(entry, list) and len(entry) == 2:
        return str(entry[1])
    config = Path(source) / "transformer" / "config.json"
    if not local or not config.is_file():
        return ""
    try:
        found = json.loads(config.read_text())
    except (OSError, ValueError):
        return ""
    return str(found.get("_class_name", "")) if isinstance(found, dict) else ""


def family_of(source: str, local: bool, kw: dict) -> Family:
    """The family of a diffusers folder or hub id: its pipeline class or transformer class, else its sub-folders,
    as the first of :data:`FAMILIES` that recognises it."""
    index = model_index(source, local, kw)
    folders = {p.name for p in Path(source).iterdir() if p.is_dir()} if local else set(index)
    transformer = _transformer_class(source, local, index)
    for family in FAMILIES:
        found = family.detect(index, folders, transformer)
        if found is not None:
            return found
    raise AssertionError("StableDiffusion.detect recognises any model")  # unreachable: the fallback is last
