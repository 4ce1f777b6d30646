"""Inputs: images with their source and target prompts, as a LightningDataModule.

Images are read once, up front (so a bad file stops the run before anything is written), with EXIF orientation
applied and any mode converted to 8-bit RGB (grayscale, palette, CMYK, 16-bit; transparency is composited on
white). Resizing to the model happens in the method, which knows the model: the shorter side is scaled to
``resolution`` (default: the model's native size), then each side is centre-cropped down to a multiple of the
VAE's downsampling factor.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from .errors import DiffinvError
from .output import DONE_MARKER, check_item_id, finished_items, identity, is_line_field
from .seeds import keyed_seed

EXAMPLES = Path(__file__).resolve().parent / "examples" / "captions.jsonl"
MIN_RESOLUTION = 16
"""The smallest ``--data.resolution``: below it the embedded model's latents are 2x2 or less and its UNet has one
value per normalisation group (an error), and no model gives a usable image."""


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


def load_image(path: str | Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, upright per its EXIF orientation."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            _warn_if_animated(im, path)
            im = ImageOps.exif_transpose(im)
    except FileNotFoundError:
        raise DiffinvError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DiffinvError(f"cannot read image {path}: not an image file or corrupt ({e})") from None
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / hi * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    im = im.convert("RGB")
    if min(im.size) < 1:
        raise DiffinvError(f"image {path} is empty ({im.size[0]}x{im.size[1]})")
    return np.asarray(im, dtype=np.uint8).copy()


def _warn_if_animated(im, path: Path) -> None:
    """One warning naming an image file of several frames (animated GIF, WebP, APNG; multi-page TIFF): only its
    first frame is inverted."""
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        kind = "animated" if getattr(im, "is_animated", False) else "multi-page"
        warnings.warn(f"image {path} is {kind} ({frames} frames): only its first frame is used; save the frame you "
                      "mean as a still image to choose another")


def fit_to_model(image: np.ndarray, resolution: int, factor: int, square: bool = False) -> np.ndarray:
    """Scale the shorter side to ``resolution``, then centre-crop each side to a multiple of ``factor``.

    ``square`` first centre-crops to a square (the NPI paper's COCO protocol).
    """
    from PIL import Image

    h, w = image.shape[:2]
    if square and h != w:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        image, h, w = image[top : top + s, left : left + s], s, s
    scale = resolution / min(h, w)
    nh, nw = max(factor, round(h * scale)), max(factor, round(w * scale))
    if (nh, nw) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.LANCZOS))
    ch, cw = nh - nh % factor, nw - nw % factor
    top, left = (nh - ch) // 2, (nw - cw) // 2
    return np.ascontiguousarray(image[top : top + ch, left : left + cw])


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


def read_json(text: str, where: str):
    """``text`` parsed as JSON; what Python's json cannot read (invalid JSON, an integer of thousands of digits,
    lists or objects nested thousands deep) is one line naming ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DiffinvError(f"{where}: not valid JSON ({e.msg})") from None
    except ValueError as e:  # Python's limit on the digits of an integer
        digits = max((len(m) for m in re.findall(r"\d+", text)), default=0)
        raise DiffinvError(f"{where}: a number of {digits} digits, more than can be read ({e.args[0].split(';')[0]}):"
                           " write it as a string") from None
    except RecursionError:
        raise DiffinvError(f"{where}: lists or objects nested too deeply to read: flatten it") from None


def read_manifest(path: str | Path) -> list[InputRow]:
    """Rows of a captions.jsonl (UTF-8, a byte-order mark allowed), one JSON object per line (see
    :data:`MANIFEST_KEYS`), image paths resolved against the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise DiffinvError(f"manifest {path} does not exist" if not path.exists() else f"manifest {path} is not a file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DiffinvError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the manifest as "
                           "UTF-8") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        obj = read_json(line, f"{path}:{n}")
        rows.append(manifest_row(obj, path.parent, f"{path}:{n}"))
    if not rows:
        raise DiffinvError(f"manifest {path} has no items")
    return rows


def record_rows(path: str | Path, target_prompts: list[str]) -> list[InputRow]:
    """Rows that edit saved Inversion records: ``path`` is one record or a folder of a previous run
    (``<id>/inversion.safetensors``). Target prompts: ``target_prompts`` if given, else those saved with it."""
    from .inversion.record import Inversion

    path = Path(path)
    files = [path] if path.is_file() else []
    if path.is_dir():
        files = sorted(p for p in path.glob(f"*/{DONE_MARKER}") if not p.parent.name.startswith("."))
    if not files:
        raise DiffinvError(f"no inversion records at {path} (expected a record file or a folder of <id>/{DONE_MARKER})")
    rows = []
    for f in files:
        rec = Inversion.load(f)
        saved = json.loads(rec.meta.get("target_prompts", "[]"))
        rows.append(InputRow(where=str(f), source_prompt=rec.source_prompt, target_prompts=target_prompts or saved,
                        inversion=f, id=f.parent.name if f.name == DONE_MARKER else f.stem, record=rec))
    return rows


_EDIT_MARKERS = re.compile(r"[\[\]]")


def pie_bench_mask(rle: list[int], shape: tuple[int, int] = (512, 512)) -> np.ndarray:
    """PIE-Bench's edit mask (True = edited region) from its run-length pairs (start, length) over the flattened
    512x512 image; the one-pixel border is set, as the benchmark's own decoder does against annotation errors."""
    flat = np.zeros(shape[0] * shape[1], dtype=bool)
    for start, length in zip(rle[0::2], rle[1::2]):
        flat[start : start + length] = True
    mask = flat.reshape(shape)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask


def pie_bench_rows(root: str | Path) -> list[InputRow]:
    """Rows of PIE-Bench (``root/mapping_file.json`` + ``root/annotation_images/``): the source prompt is
    ``original_prompt``, the single target is ``editing_prompt`` with its ``[ ]`` markers stripped."""
    root = Path(root)
    mapping = root / "mapping_file.json"
    if not mapping.is_file():
        raise DiffinvError(f"no PIE-Bench mapping file at {mapping} (expected <root>/mapping_file.json and "
                           "<root>/annotation_images/)")
    entries = read_json(mapping.read_text(), str(mapping))
    if not isinstance(entries, dict):
        raise DiffinvError(f"{mapping}: expected an object of entries, got {_json_type(entries)}")
    rows = []
    for key, e in sorted(entries.items()):
        try:
            rows.append(InputRow(
                image=root / "annotation_images" / e["image_path"],
                source_prompt=_EDIT_MARKERS.sub("", e["original_prompt"]).strip(),
                target_prompts=[" ".join(_EDIT_MARKERS.sub("", e["editing_prompt"]).split())],
                id=key,
                where=f"{mapping}:{key}",
                meta={"editing_type_id": str(e.get("editing_type_id", "")), "blended_word": e.get("blended_word", ""),
                      "editing_instruction": e.get("editing_instruction", ""), "mask_rle": e.get("mask", [])},
            ))
        except (KeyError, TypeError) as err:
            raise DiffinvError(f"{mapping}: entry {key} lacks {err}") from None
    return rows


def coco_rows(captions: str | Path, images: str | Path | None, count: int | None, seed: int) -> list[InputRow]:
    """Rows of COCO captions (``captions_val*.json``): ``count`` random images (seeded; all if None), each with
    its first caption (lowest annotation id) as source prompt. ``images``: the image folder (default: beside the
    captions file, ``val2017``/``val2014`` by the file's name)."""
    captions = Path(captions)
    if not captions.is_file():
        raise DiffinvError(f"COCO captions file {captions} does not exist")
    data = read_json(captions.read_text(), str(captions))
    try:
        files = {im["id"]: im["file_name"] for im in data["images"]}
        first: dict[int, tuple[int, str]] = {}
        for a in data["annotations"]:
            if a["image_id"] not in first or a["id"] < first[a["image_id"]][0]:
                first[a["image_id"]] = (a["id"], a["caption"])
    except (KeyError, TypeError) as e:
        raise DiffinvError(f"{captions} is not a COCO captions file ({e})") from None
    if images is None:
        split = "val2014" if "2014" in captions.name else "val2017"
        images = captions.parent / split
    ids = sorted(i for i in files if i in first)
    if count is not None:
        rng = np.random.default_rng(seed)
        ids = sorted(rng.choice(ids, size=min(count, len(ids)), replace=False).tolist())
    return [InputRow(image=Path(images) / files[i], source_prompt=" ".join(first[i][1].split()), id=f"coco-{i}",
                     where=f"{captions}:image {i}") for i in ids]


def build_items(rows: list[InputRow], resolution: int | None, square: bool, max_aspect: float | None = None) -> list[Item]:
    """Read and check every row's image and prompts (any problem: one line naming the row); ids made unique.
    ``max_aspect``: refuse an image whose long side is more than this many times its short one (unless
    ``square`` crops it)."""
    items, seen = [], set()
    for row in rows:
        if row.inversion is not None and row.record is None:
            from .inversion.record import Inversion

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
        image = load_image(row.image)
        h, w = image.shape[:2]
        if max_aspect is not None and not square and max(h, w) > max_aspect * min(h, w):
            raise DiffinvError(
                f"image {row.image} is {w}x{h}, {max(h, w) / min(h, w):.0f}:1, over --data.max_aspect {max_aspect:g}: "
                "its short side would be scaled to the model's size and the long one to many times it; crop it, "
                "or pass --data.square true (centre square) or a larger --data.max_aspect")
        items.append(Item(uid, image, source, targets, resolution, square, meta=row.meta))
    return items


@dataclass
class Perturbation:
    """Perturbed inputs, to measure robustness (latent-TOP §3.1-3.2): noisy pixels, a changed caption. Every draw
    is seeded per (seed, item id), so an item is perturbed the same alone or in any batch."""

    pixel_noise: float = 0.0
    """Standard deviation (0-255 scale) of Gaussian noise added to each image at its own size, then rounded and
    clipped to 8 bits (the paper: 5, 10, 20). PSNR is then measured against the noisy image the method sees."""
    caption: Literal["none", "drop_word", "replace_word"] = "none"
    """'drop_word': one word of 3+ letters removed from the source prompt; 'replace_word': one word found in
    ``neighbours`` replaced by its neighbour (the paper: 'teddy bear' -> 'brown toy bear')."""
    neighbours: dict[str, str] = field(default_factory=dict)
    """Word -> synonym-like neighbour for 'replace_word' (e.g. {"big": "large"}); an item with none of these
    words keeps its caption (said in one line)."""
    seed: int = 0
    """Seed of the noise and of the word drawn."""

    def check(self) -> None:
        """Refuse settings that cannot apply (called by the data module, which reports it in one line)."""
        if self.pixel_noise < 0:
            raise DiffinvError(f"perturb.pixel_noise must be >= 0, got {self.pixel_noise}")
        if self.caption == "replace_word" and not self.neighbours:
            raise DiffinvError("perturb.caption 'replace_word' needs perturb.neighbours, e.g. '{\"big\": \"large\"}'")

    def apply(self, item: Item) -> Item:
        """The item with its image and source prompt perturbed; what changed goes into its metadata."""
        rng = np.random.default_rng(keyed_seed(self.seed, item.id, "perturb"))
        meta = dict(item.meta)
        image, prompt = item.image, item.source_prompt
        if self.pixel_noise > 0:
            noisy = image.astype(np.float64) + rng.normal(0.0, self.pixel_noise, image.shape)
            image = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
            meta["pixel_noise"] = self.pixel_noise
        words = prompt.split()
        if self.caption == "drop_word":
            candidates = [k for k, w in enumerate(words) if len(w.strip(".,;:!?")) >= 3]
            if candidates and len(words) > 1:
                k = candidates[rng.integers(len(candidates))]
                prompt = " ".join(words[:k] + words[k + 1:])
        elif self.caption == "replace_word":
            candidates = [k for k, w in enumerate(words) if w.lower() in self.neighbours]
            if candidates:
                k = candidates[rng.integers(len(candidates))]
                prompt = " ".join(words[:k] + [self.neighbours[words[k].lower()]] + words[k + 1:])
        if prompt != item.source_prompt:
            meta["caption_before_perturbation"] = item.source_prompt
        return Item(item.id, image, prompt, item.target_prompts, item.resolution, item.square, item.inversion, meta)


def collate(items: list[Item | None]) -> list[Item]:
    return [i for i in items if i is not None]


class ItemList(torch.utils.data.Dataset):
    """The items; index -1 is "no item" (a padding slot of :class:`ShardSampler`)."""

    def __init__(self, items: list[Item]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Item | None:
        return None if index < 0 else self.items[index]


class ShardSampler(DistributedSampler):
    """Process r of R takes items r, r + R, ...: every item exactly once (Lightning's training sampler pads with
    repeated items, which two processes would then both write). Shards are filled up to equal length with
    "no item" slots, so every process runs the same number of steps (DDP's collectives stay in step)."""

    def __init__(self, dataset: ItemList, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = -(-len(dataset) // num_replicas)

    def __iter__(self):
        own = list(range(self.rank, len(self.dataset), self.num_replicas))
        return iter(own + [-1] * (self.num_samples - len(own)))

    def __len__(self) -> int:
        return self.num_samples


class InversionData(L.LightningDataModule):
    """Images and prompts to invert and edit: one from the command line, a manifest, saved inversion records,
    PIE-Bench, COCO captions, or (given none) the bundled example."""

    def __init__(
        self,
        image: str | None = None,
        source_prompt: str | None = None,
        target_prompts: list[str] | None = None,
        manifest: str | None = None,
        resolution: int | None = None,
        square: bool = False,
        records: str | None = None,
        pie_bench: str | None = None,
        coco_captions: str | None = None,
        coco_images: str | None = None,
        limit: int | None = None,
        seed: int = 0,
        batch_size: int = 1,
        perturb: Perturbation | None = None,
        max_aspect: float = 4.0,
        output_dir: str | None = None,
    ):
        """
        Args:
            image: One image file to invert (with ``source_prompt``). Neither this nor ``manifest``: the bundled
                shapes example.
            source_prompt: Caption of ``image``.
            target_prompts: Edit prompts for ``image``; none = reconstruction only.
            manifest: A captions.jsonl, one JSON object per line: {"image": path (relative to the manifest's
                folder), "source_prompt": str, "target_prompts": [str, ...], "id": optional name}.
            resolution: Shorter image side after resizing; default: the model's native size (512 for SD 1.x).
            square: Centre-crop images to a square first (the NPI paper's COCO protocol).
            records: Edit saved inversions instead of inverting: a record file or the --output_dir of an earlier
                run (its <id>/inversion.safetensors); targets from --data.target_prompts, else the saved ones.
            pie_bench: PIE-Bench's folder (mapping_file.json + annotation_images/): 700 images, one edit each.
            coco_captions: A COCO captions_val*.json: reconstruction of its images with their first caption (the NPI
                paper's protocol: --data.limit 100 --data.square true --data.resolution 512).
            coco_images: COCO's image folder (default: val2017 or val2014 beside the captions file).
            limit: Use this many items: the first ones (COCO: a random draw seeded by ``seed``).
            seed: Seed of the COCO draw.
            batch_size: Images inverted together in one step.
            perturb: Perturb the inputs (pixel noise, a dropped or replaced caption word) to measure robustness;
                none: the inputs as they are.
            max_aspect: Refuse images whose long side is over this many times the short one (a 10000x20 panorama
                would become 32x16000 on the shapes model, 512x256000 on SD): crop them, or use ``square``.
            output_dir: Set by the CLI's --output_dir: items already finished there are skipped, not redone.
        """
        super().__init__()
        if sum(x is not None for x in (image, manifest, records, pie_bench, coco_captions)) > 1:
            raise DiffinvError("give one of --data.image (with --data.source_prompt), --data.manifest, --data.records, "
                               "--data.pie_bench or --data.coco_captions")
        if limit is not None and limit < 1:
            raise DiffinvError(f"limit must be >= 1, got {limit}")
        if image is None and records is None and (source_prompt is not None or target_prompts):
            raise DiffinvError("--data.source_prompt/--data.target_prompts need --data.image")
        if image is not None and source_prompt is None:
            raise DiffinvError("--data.image needs --data.source_prompt (a caption of the image)")
        if batch_size < 1:
            raise DiffinvError(f"batch_size must be >= 1, got {batch_size}")
        if resolution is not None and resolution < MIN_RESOLUTION:
            raise DiffinvError(f"--data.resolution must be at least {MIN_RESOLUTION} pixels (the shorter image side; "
                               f"leave it out for the model's native size), got {resolution}")
        if not max_aspect >= 1:
            raise DiffinvError(f"max_aspect must be >= 1, got {max_aspect}")
        self.image, self.source_prompt, self.target_prompts = image, source_prompt, list(target_prompts or [])
        self.manifest, self.resolution, self.square, self.records = manifest, resolution, square, records
        self.pie_bench, self.coco_captions, self.coco_images = pie_bench, coco_captions, coco_images
        self.limit, self.seed = limit, seed
        self.batch_size, self.output_dir = batch_size, output_dir
        self.perturb, self.max_aspect = perturb, max_aspect
        self.run_settings: dict | None = None
        """Set by the CLI: the options of this run that change a result (stored with each item, compared on a
        rerun before an item is skipped)."""
        if perturb is not None:
            perturb.check()
        if perturb is not None and records is not None:
            raise DiffinvError("--data.perturb perturbs images to invert: it does not apply to --data.records")
        self.items: list[Item] | None = None
        self.skipped: list[str] = []

    def rows(self) -> list[InputRow]:
        """The items' rows; ``limit`` keeps the first ones (COCO: a seeded random draw)."""
        if self.coco_captions is not None:
            return coco_rows(self.coco_captions, self.coco_images, self.limit, self.seed)
        if self.pie_bench is not None:
            rows = pie_bench_rows(self.pie_bench)
        elif self.records is not None:
            rows = record_rows(self.records, self.target_prompts)
        elif self.image is not None:
            rows = [InputRow(where="--data.image", image=Path(self.image).expanduser(), source_prompt=self.source_prompt,
                        target_prompts=self.target_prompts)]
        else:
            rows = read_manifest(self.manifest or EXAMPLES)
        return rows[: self.limit]

    def prepare_data(self) -> None:
        """Once, before the processes start: make OUTPUT_DIR/metrics.jsonl hold exactly the finished items' lines
        (:func:`diffinv.output.reconcile_metrics`: a run killed part-way leaves it one item behind or ahead)."""
        if self.output_dir is not None and Path(self.output_dir).is_dir():
            from .output import reconcile_metrics

            restored, dropped = reconcile_metrics(Path(self.output_dir))
            if restored or dropped:
                print(f"diffinv: metrics.jsonl in {self.output_dir} now matches its finished items "
                      f"({restored} line(s) restored, {dropped} dropped)")

    def identity(self, item: Item) -> dict:
        """What a rerun compares before skipping ``item`` (:func:`diffinv.output.identity`)."""
        return identity(item.image, item.source_prompt, item.target_prompts, self.run_settings)

    def setup(self, stage: str | None = None) -> None:
        if self.items is not None:
            return
        items = build_items(self.rows(), self.resolution, self.square, self.max_aspect)
        if self.perturb is not None:
            items = [self.perturb.apply(i) for i in items]
            unchanged = [i.id for i in items
                         if self.perturb.caption != "none" and "caption_before_perturbation" not in i.meta]
            if unchanged:
                print(f"diffinv: {len(unchanged)} item(s) have no word to {self.perturb.caption.replace('_', ' ')}: "
                      f"their captions are unchanged ({', '.join(unchanged[:5])}{'...' if len(unchanged) > 5 else ''})")
        if self.output_dir is not None:
            done = set(finished_items(Path(self.output_dir), {i.id: self.identity(i) for i in items}))
            self.skipped = sorted(done)
            items = [i for i in items if i.id not in done]
            if done:
                print(f"diffinv: skipping {len(done)} item(s) already finished in {self.output_dir} with these "
                      f"settings ({', '.join(self.skipped[:5])}{'...' if len(done) > 5 else ''}); delete their "
                      "folders to redo them")
        lone = [i.id for i in items if not i.target_prompts]
        if lone:
            print(f"diffinv: {len(lone)} item(s) have no target prompts and are only reconstructed "
                  f"({', '.join(lone[:5])}{'...' if len(lone) > 5 else ''})")
        self.items = items

    def _loader(self) -> DataLoader:
        data, sampler = ItemList(self.items), None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sampler = ShardSampler(data, torch.distributed.get_world_size(), torch.distributed.get_rank())
        return DataLoader(data, batch_size=self.batch_size, shuffle=False, sampler=sampler, collate_fn=collate)

    predict_dataloader = _loader
    train_dataloader = _loader


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255
