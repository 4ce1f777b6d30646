"""Inputs: images with their source and target prompts, as a LightningDataModule.

Images are read once, up front (so a bad file stops the run before anything is written), with EXIF orientation
applied and any mode converted to 8-bit RGB (grayscale, palette, CMYK, 16-bit; transparency is composited on
white). Resizing to the model happens in the method, which knows the model: the shorter side is scaled to
``resolution`` (default: the model's native size), then each side is centre-cropped down to a multiple of the
VAE's downsampling factor.

The package's modules, by job: :mod:`.images` (reading and fitting images), :mod:`.items` (the item schema and
its checks), :mod:`.sources` (manifest, saved records, PIE-Bench, COCO), :mod:`.perturb` (perturbed inputs) and
:mod:`.module` (the data module: sharding and resume). Every name is re-exported here:
``from diffinv.data import X`` and the class path ``diffinv.data.InversionData`` work as before.
"""

from __future__ import annotations

from .images import fit_to_model, image_tensor, load_image
from .items import MANIFEST_KEYS, InputRow, Item, build_items, check_prompt, manifest_row
from .module import MIN_RESOLUTION, InversionData, ItemList, ShardSampler, collate
from .perturb import Perturbation
from .sources import EXAMPLES, coco_rows, pie_bench_mask, pie_bench_rows, read_json, read_manifest, record_rows

__all__ = [
    "EXAMPLES", "MANIFEST_KEYS", "MIN_RESOLUTION", "InputRow", "InversionData", "Item", "ItemList", "Perturbation",
    "ShardSampler", "build_items", "check_prompt", "coco_rows", "collate", "fit_to_model", "image_tensor",
    "load_image", "manifest_row", "pie_bench_mask", "pie_bench_rows", "read_json", "read_manifest", "record_rows",
]
