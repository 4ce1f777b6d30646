"""Readers of the item sources, each giving :class:`~diffinv.data.items.InputRow` rows: a manifest (captions.jsonl,
the bundled example's included), saved inversion records, PIE-Bench and COCO captions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..errors import DiffinvError
from ..output import DONE_MARKER
from .items import InputRow, _json_type, manifest_row

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "captions.jsonl"


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
    from ..inversion.record import Inversion

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


PIE_BENCH_TYPES = {"0": "random", "1": "change object", "2": "add object", "3": "delete object",
                   "4": "change attribute content", "5": "change attribute pose", "6": "change attribute color",
                   "7": "change attribute material", "8": "change background", "9": "change style"}
"""PIE-Bench's ten editing types by ``editing_type_id`` (its image folders: ``0_random_140``, ``1_change_object_80``,
..., ``9_change_style_80``)."""


def pie_bench_annotations(path: str | Path) -> dict[str, dict]:
    """{key: entry} of PIE-Bench's ``mapping_file.json``; ``path`` is the benchmark's folder or the file."""
    path = Path(path)
    mapping = path / "mapping_file.json" if path.is_dir() or not path.suffix else path
    if not mapping.is_file():
        raise DiffinvError(f"no PIE-Bench mapping file at {mapping} (expected <root>/mapping_file.json and "
                           "<root>/annotation_images/)")
    entries = read_json(mapping.read_text(), str(mapping))
    if not isinstance(entries, dict):
        raise DiffinvError(f"{mapping}: expected an object of entries, got {_json_type(entries)}")
    bad = next((k for k, e in entries.items() if not isinstance(e, dict)), None)
    if bad is not None:
        raise DiffinvError(f"{mapping}: entry {bad} is {_json_type(entries[bad])}, expected an object")
    return entries


def pie_bench_rows(root: str | Path) -> list[InputRow]:
    """Rows of PIE-Bench (``root/mapping_file.json`` + ``root/annotation_images/``): the source prompt is
    ``original_prompt``, the single target is ``editing_prompt`` with its ``[ ]`` markers stripped."""
    root = Path(root)
    mapping = root / "mapping_file.json"
    entries = pie_bench_annotations(root)
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
