"""The output contract: what diffinv writes under ``--output_dir``, and the rules that keep a user's files safe.

Layout::

    OUTPUT_DIR/metrics.jsonl              one JSON line per reconstruction / edit of the finished items
                                          (strict JSON: a metric that is not finite is null, see json_line)
    OUTPUT_DIR/<id>/source.png            the image as inverted (after resizing/cropping)
    OUTPUT_DIR/<id>/reconstruction.png
    OUTPUT_DIR/<id>/edit-<k>.png          one per target prompt, k = 0, 1, ...
    OUTPUT_DIR/<id>/metrics.json          the item's metric lines
    OUTPUT_DIR/<id>/inversion.safetensors the Inversion record (written last: its presence marks a finished item)
    OUTPUT_DIR/.diffinv.lock              held by the one run writing here

Rules:

* **One writer.** A run holds an exclusive lock on ``.diffinv.lock`` from before its first write to its end; a
  second run into the same folder stops at once with one line (the processes of one distributed run share it).
* **Nothing diffinv did not write is deleted or truncated.** An item is built in a hidden ``.<id>.partial``
  folder and renamed into place when complete; a folder ``<id>`` that is not a finished item (no record) is
  refused, never replaced; a ``metrics.jsonl`` holding lines that are not diffinv's is refused, never rewritten.
* **A rerun skips only the same work.** Each record stores its item's identity: the input image's digest, the
  prompts and the run's settings (method, model and every option that changes a result). A finished item is
  skipped when all of these match; otherwise the run stops in one line naming the item and what differs.
* **Strict JSON.** metrics.jsonl and each item's metrics.json are read by any JSON reader: a value that is not
  finite (NaN, +inf, -inf) is written ``null`` (:func:`json_line`), never a bare ``NaN`` or ``Infinity``.
* **metrics.jsonl holds each finished item's lines exactly once**, in order of completion:
  :func:`reconcile_metrics` restores the lines a kill cut off, drops those of items no longer there, removes
  duplicates, and changes nothing when there is nothing to change (running it twice is running it once).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

from .errors import DiffinvError

DONE_MARKER = "inversion.safetensors"
INDEX = "metrics.jsonl"
LOCK = ".diffinv.lock"
ITEM_FILES = re.compile(r"(source|reconstruction|edit-\d+)\.png|metrics\.json|\.?inversion\.safetensors(\.tmp)?")
"""Names of the files diffinv writes in an item folder (a leftover ``.<id>.partial`` holding only these is ours)."""
RESERVED_NAMES = (INDEX, LOCK, "lightning_logs")
"""Names at the top of an output folder that are not items: the index, the lock, TensorBoard's logs (``fit``);
with every name starting with '.' (the ``.<id>.partial`` folders, ``.metrics.jsonl.tmp``), never an item's id."""
NAME_MAX = 255
"""Bytes in one file name (Linux, macOS, Windows)."""
MAX_ID_BYTES = NAME_MAX - len(".") - len(".partial")
"""The longest id whose every name fits: the longest one made from an id is its ``.<id>.partial`` folder."""
LINE_FIELDS = frozenset({
    "id", "method", "editor", "edit_with", "model", "kind", "source_prompt", "target_prompt",
    "num_inference_steps", "guidance_scale", "image_size", "image_path",  # what the item was and where its image is
    "inner_iterations", "final_step_loss",  # optimizing methods (diffinv.inversion.result.optimization_summary)
    "pixel_noise", "caption_before_perturbation",  # --data.perturb (diffinv.data.Perturbation.apply)
})
MEASURED = re.compile(r"(psnr|ssim|mse|lpips|clip_score|clip_similarity|structure_distance|seconds|evaluations"
                      r"|shapes_edit|shapes_others)(_\w*)?")
"""Names of measured fields: the metrics against the source (and their ``_unedited``/``_edited`` variants),
PIE-Bench's structure distance and CLIP similarities, the timings and model evaluations, the bench's shapes-world
scores."""


def is_line_field(key: str) -> bool:
    """True for a field diffinv itself writes in a metrics.jsonl line (:data:`LINE_FIELDS`, :data:`MEASURED`):
    a dataset annotation of that name would replace a measurement or the item's identity, so it is refused."""
    return key in LINE_FIELDS or MEASURED.fullmatch(key) is not None


def check_item_id(item_id: str, where: str) -> None:
    """Refuse, in one line naming ``where``, an item id that cannot be an item's folder: a name the contract
    uses at the top of the folder (:data:`RESERVED_NAMES`, any name starting with '.'), or one too long for a file
    name once made into ``.<id>.partial`` (:data:`MAX_ID_BYTES`)."""
    if item_id.startswith(".") or item_id.casefold() in {n.casefold() for n in RESERVED_NAMES}:
        names = ", ".join(RESERVED_NAMES)
        raise DiffinvError(f"{where}: id {item_id!r} is a name diffinv's output folder uses ({names}, and names "
                           "starting with '.'): give the item another \"id\" (in a manifest) or rename its file")
    size = len(item_id.encode())
    if size > MAX_ID_BYTES:
        shown = item_id if len(item_id) <= 40 else item_id[:20] + "..."
        raise DiffinvError(f"{where}: id {shown!r} is {size} bytes long: at most {MAX_ID_BYTES} fit in a file name "
                           "(the item is built in the folder .<id>.partial); give the item a shorter \"id\" (in a "
                           "manifest) or rename its file")


# --- identity of an item's work --------------------------------------------------------------------------------
def image_digest(image: np.ndarray) -> str:
    """SHA-256 of an (H, W, 3) uint8 image and its shape."""
    h = hashlib.sha256(repr(tuple(image.shape)).encode())
    h.update(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
    return h.hexdigest()


def identity(image: np.ndarray, source_prompt: str, target_prompts: list[str], settings: dict | None) -> dict:
    """What makes two runs of an item the same work: its input image, its prompts and the run's settings."""
    return {"image_sha256": image_digest(image), "source_prompt": source_prompt,
            "target_prompts": list(target_prompts), "settings": settings or {}}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def identity_difference(stored: dict, current: dict) -> str | None:
    """None when ``stored`` (from a record) and ``current`` are the same work, else what differs, briefly.
    Settings are compared where both sides have them (records written outside the CLI carry none)."""
    if stored.get("image_sha256") not in (None, current["image_sha256"]):
        return "input image (the file changed)"
    for key in ("source_prompt", "target_prompts"):
        if key in stored and stored[key] != current[key]:
            return f"{key} ({json.dumps(stored[key])} there, {json.dumps(current[key])} here)"
    a, b = _flat(stored.get("settings") or {}), _flat(current.get("settings") or {})
    if a and b:
        diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        if diff:
            shown = "; ".join(f"{k}: {json.dumps(a.get(k))} there, {json.dumps(b.get(k))} here" for k in diff[:2])
            return f"settings ({shown}{'; ...' if len(diff) > 2 else ''})"
    return None


def stored_identity(record: Path) -> dict:
    """The identity a finished item's record holds (older records: their prompts), read from its metadata only."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(record), framework="pt") as f:
            metadata = f.metadata() or {}
        meta = json.loads(metadata.get("meta", "{}"))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:  # RecursionError: a RuntimeError
        raise DiffinvError(f"{record} is corrupt ({e}): delete the folder {record.parent} to redo that item") from None
    if "identity" in meta:
        return json.loads(meta["identity"])
    out = {"source_prompt": metadata.get("source_prompt")}
    if "target_prompts" in meta:
        out["target_prompts"] = json.loads(meta["target_prompts"])
    return out


def finished_items(output_dir: Path, wanted: dict[str, dict]) -> list[str]:
    """Ids of ``wanted`` (id -> identity) already finished in ``output_dir`` with the same identity (to skip).
    Refuses, in one line and before anything runs, an item whose folder is not a finished diffinv item (it may be
    the user's) or whose finished result is other work (other prompts, image or settings)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    done, foreign, other = [], [], []
    for item_id, ident in wanted.items():
        folder = output_dir / item_id
        if not folder.exists():
            continue
        record = folder / DONE_MARKER
        if not record.is_file():
            foreign.append(folder)
            continue
        diff = identity_difference(stored_identity(record), ident)
        if diff is None:
            done.append(item_id)
        else:
            other.append((folder, diff))
    if foreign:
        raise DiffinvError(
            f"{foreign[0]} exists and is not a finished diffinv item (no {DONE_MARKER})"
            + (f", nor are {len(foreign) - 1} more" if len(foreign) > 1 else "")
            + ": diffinv does not overwrite it; move it away or choose another --output_dir")
    if other:
        folder, diff = other[0]
        raise DiffinvError(
            f"{folder} holds a finished result of other work: {diff}"
            + (f" ({len(other) - 1} more item(s) differ too)" if len(other) > 1 else "")
            + "; choose another --output_dir, or delete those folders to redo them")
    return done


# --- the folder and its lock ------------------------------------------------------------------------------------
def resolve_output_dir(output_dir: str | Path) -> Path:
    """The output folder as every part of a run uses it (check, lock, writer, data, TensorBoard's logs): ``~``
    expanded, made absolute. Refuses an empty one in one line (it would mean the current folder)."""
    if not str(output_dir).strip():
        raise DiffinvError("--output_dir is empty: give a folder (e.g. --output_dir outputs; '.' for the current "
                           "folder)")
    return Path(output_dir).expanduser().resolve()


def check_output_dir(output_dir: str | Path) -> None:
    """Refuse, before any work and in one line, an output folder diffinv cannot write (empty, a file, a read-only
    folder) or whose metrics.jsonl is not diffinv's."""
    path = resolve_output_dir(output_dir)
    if path.exists() and not path.is_dir():
        raise DiffinvError(f"--output_dir {path} is an existing file, not a folder: give a folder")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise DiffinvError(f"--output_dir {path} cannot be created: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DiffinvError(f"--output_dir {path} is not writable ({probe} is read-only for this user): "
                           "give a folder you can write")
    if (path / INDEX).is_file():
        read_index(path / INDEX)


class OutputLock:
    """The exclusive lock of one output folder (``OUTPUT_DIR/.diffinv.lock``, flock: released by the kernel when
    the process ends, however it ends)."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir).expanduser() / LOCK
        self.fd: int | None = None
        self.created: Path | None = None  # the topmost folder acquire() created (removed again if left empty)

    def acquire(self) -> "OutputLock":
        top = self.path.parent
        while not top.parent.exists():
            top = top.parent
        self.created = None if top.exists() else top
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DiffinvError(f"cannot write to --output_dir {self.path.parent}: {os_reason(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DiffinvError(f"{self.path.parent} is being written by another diffinv run (pid {self._holder()}):"
                                   " wait for it to end, or choose another --output_dir") from None
            self._remove_if_unused()
            raise DiffinvError(f"cannot lock --output_dir {self.path.parent}: {os_reason(e)}") from None
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            self.release()
            raise DiffinvError(f"cannot write to --output_dir {self.path.parent}: {os_reason(e)}") from None
        return self

    def _holder(self) -> str:
        """The pid the lock file names (written by the run holding it), or 'unknown'."""
        try:
            return self.path.read_text(errors="replace").strip()[:32] or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        """Unlock; a folder this lock created and nothing else was written to is removed (a run that stopped on an
        error before writing leaves nothing behind)."""
        if self.fd is None:
            return
        self._remove_if_unused()
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def _remove_if_unused(self) -> None:
        """Remove the folders :meth:`acquire` created if they hold nothing but the lock file."""
        try:
            if self.created is not None and [p.name for p in self.path.parent.iterdir()] == [LOCK]:
                self.path.unlink()
                folder = self.path.parent
                while True:
                    folder.rmdir()
                    if folder == self.created:
                        break
                    folder = folder.parent
        except OSError:
            pass  # not empty after all: kept


# --- writing and reconciling ------------------------------------------------------------------------------------
def os_reason(e: OSError) -> str:
    """The operating system's reason for ``e``, as a clause ("no space left on device")."""
    reason = e.strerror or (os.strerror(e.errno) if e.errno else str(e))
    return reason[:1].lower() + reason[1:]


@contextmanager
def writing_results(output_dir: Path) -> Iterator[None]:
    """Turn an OSError while writing into ``output_dir`` (a full disk, a folder turned read-only) into one line
    naming the folder and the reason; what was finished before stays as it is."""
    try:
        yield
    except OSError as e:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        where = f" (at {Path(e.filename).name})" if e.filename else ""
        raise DiffinvError(
            f"cannot write results to {output_dir}: {os_reason(e)}{where}; the items finished so far are kept: "
            + ("free some space" if full else "make the folder writable")
            + " (or choose another --output_dir) and run the same command again to do the rest") from None


NOT_FINITE_TAGS = frozenset({"inf", "+inf", "-inf", "nan"})
"""The strings a metric that is not finite may arrive as (the writer's PSNR: "inf" for identical images)."""


def _finite_or_null(value, measured: bool):
    """``value`` with every float that is not finite made None, searched through dicts and lists; where
    ``measured`` (a metric's field), the strings of :data:`NOT_FINITE_TAGS` too (a caption "nan" stays)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if measured and isinstance(value, str) and value.lower() in NOT_FINITE_TAGS:
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v, measured) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v, measured) for v in value]
    return value


def strict_line(line: dict) -> dict:
    """A metric line as diffinv writes it: every value that is not finite (NaN, +inf, -inf, or a metric's "inf"
    or "nan" string) is None, i.e. JSON ``null``."""
    return {k: _finite_or_null(v, MEASURED.fullmatch(k) is not None) for k, v in line.items()}


def json_line(line: dict) -> str:
    """``line`` as one line of metrics.jsonl (strict JSON, no newline; an item's metrics.json holds the same
    :func:`strict_line` values).

    ``null`` in a measured field means "not finite": identical images give PSNR inf (MSE 0), a metric of a
    degenerate image may be NaN; any JSON reader accepts it, and a mean over a column must skip it (as
    ``diffinv bench`` does, counting such values as not finite). Written with ``allow_nan=False``: a bare ``NaN``
    or ``Infinity`` can never reach the file."""
    return json.dumps(strict_line(line), allow_nan=False)


def append_lines(output_dir: Path, lines: list[dict]) -> None:
    """Append one item's lines to metrics.jsonl (flock: the processes of a distributed run share the file); a
    write that fails part-way is cut back, leaving no partial line. Each line is strict JSON (:func:`json_line`):
    ``null`` means not finite (identical images give PSNR inf)."""
    with open(output_dir / INDEX, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            size = os.fstat(f.fileno()).st_size
            try:
                f.write("".join(json_line(line) + "\n" for line in lines))
                f.flush()
                os.fsync(f.fileno())
            except OSError:
                with suppress(OSError):
                    os.ftruncate(f.fileno(), size)
                raise
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def to_pil(image):
    """(3, H, W) float image in [0, 1] -> an 8-bit PIL image (what the PNGs hold)."""
    from PIL import Image

    return Image.fromarray((image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def save_png(image, path: Path) -> None:
    """(3, H, W) float image in [0, 1] -> 8-bit PNG."""
    to_pil(image).save(path)


def write_item(output_dir: Path, item_id: str, images: dict, lines: list[dict], record) -> None:
    """Write one finished item: ``images`` (file name -> (3, H, W) tensor), its metric lines and its record (an
    Inversion, saved last), built in ``.<id>.partial`` and renamed into place, then its lines appended to
    metrics.jsonl. An OSError (full disk, read-only folder) ends in one line (:func:`writing_results`)."""
    with writing_results(output_dir):
        output_dir.mkdir(parents=True, exist_ok=True)
        final, tmp = output_dir / item_id, output_dir / f".{item_id}.partial"
        if tmp.exists():
            _remove_partial(tmp)
        tmp.mkdir()
        try:
            for name, image in images.items():
                save_png(image, tmp / name)
            strict = [strict_line(x) for x in lines]
            (tmp / "metrics.json").write_text(json.dumps(strict, indent=1, allow_nan=False) + "\n")
            record.save(tmp / DONE_MARKER)
            publish_item(tmp, final)
        except BaseException:  # a stop (signal, full disk) part-way: leave no half-built item behind
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        append_lines(output_dir, lines)  # fails: the item is whole, the next run's reconcile restores its lines


def _holds_only_ours(folder: Path) -> bool:
    """A folder holding nothing but the files diffinv writes in an item (:data:`ITEM_FILES`)."""
    return folder.is_dir() and all(ITEM_FILES.fullmatch(p.name) for p in folder.iterdir())


def _remove_partial(tmp: Path) -> None:
    """Remove an interrupted run's ``.<id>.partial`` folder, only if it holds nothing but diffinv's files."""
    if not _holds_only_ours(tmp):
        raise DiffinvError(f"{tmp} holds files diffinv did not write: diffinv does not delete it; move it away")
    shutil.rmtree(tmp)


def publish_item(tmp: Path, final: Path) -> None:
    """Rename a complete ``.<id>.partial`` folder into place; never replaces an existing folder."""
    if final.exists():
        raise DiffinvError(f"{final} appeared while its item was computed: diffinv does not overwrite it (is another "
                           "program writing into this folder?)")
    os.replace(tmp, final)


def _is_ours(line: dict) -> bool:
    return isinstance(line, dict) and {"id", "kind", "image_path"} <= set(line)


def _index_text(index: Path) -> str:
    try:
        return index.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DiffinvError(f"{index} was not written by diffinv (not UTF-8 text): diffinv does not rewrite it; "
                           "move it away or choose another --output_dir") from None


def read_index(index: Path, text: str | None = None) -> tuple[list[dict], list[str]]:
    """The lines of a metrics.jsonl and the item ids in order of first appearance; a last line cut off by a kill
    is left out. Refuses, in one line, a file that holds anything diffinv did not write."""
    text = _index_text(index) if text is None else text
    raw_lines = text.splitlines()
    old, order = [], []
    for n, raw in enumerate(raw_lines, 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON, a number or a nesting too big to read: not diffinv's
            line = None
        if not _is_ours(line):
            if n == len(raw_lines) and not text.endswith("\n") and raw.startswith('{"id": '):
                continue  # the start of a line a kill cut off
            raise DiffinvError(f"{index} line {n} was not written by diffinv: diffinv does not rewrite that file; "
                               "move it away or choose another --output_dir")
        old.append(line)
        if line["id"] not in order:
            order.append(line["id"])
    return old, order


def reconcile_metrics(output_dir: Path) -> tuple[int, int]:
    """Make ``metrics.jsonl`` hold each finished item's lines exactly once (see the module docstring); remove
    leftover ``.<id>.partial`` folders that hold only diffinv's files. Returns (lines restored, lines dropped).
    Refuses, in one line, a metrics.jsonl with lines that are not diffinv's. Call it under :class:`OutputLock`."""
    output_dir = Path(output_dir)
    with writing_results(output_dir):
        return _reconcile(output_dir)


def _reconcile(output_dir: Path) -> tuple[int, int]:
    index = output_dir / INDEX
    for partial in output_dir.glob(".*.partial"):
        if _holds_only_ours(partial):
            shutil.rmtree(partial)  # an item an earlier run was building when it stopped
    finished = {p.parent.name for p in output_dir.glob(f"*/{DONE_MARKER}") if not p.parent.name.startswith(".")}
    if not index.exists() and not finished:
        return 0, 0
    old_text = _index_text(index) if index.exists() else ""
    old, order = read_index(index, old_text)
    order = [i for i in order if i in finished] + sorted(finished - set(order))
    new = []
    for item in order:
        try:
            lines = json.loads((output_dir / item / "metrics.json").read_text())
        except (OSError, ValueError, RecursionError):
            lines = None
        if not isinstance(lines, list) or not all(_is_ours(x) for x in lines):
            seen, lines = set(), []
            for x in old:
                if x["id"] == item and x["image_path"] not in seen:
                    seen.add(x["image_path"])
                    lines.append(x)
        new += lines
    new_text = "".join(json_line(line) + "\n" for line in new)
    if new_text == old_text:
        return 0, 0

    def key(x: dict) -> str:  # compared as written: an older file's bare NaN is the null it is rewritten as
        return json.dumps(strict_line(x), sort_keys=True, allow_nan=False)

    before, after = Counter(key(x) for x in old), Counter(key(x) for x in new)
    tmp = output_dir / f".{INDEX}.tmp"
    try:
        tmp.write_text(new_text)
        os.replace(tmp, index)
    except OSError:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)  # the old metrics.jsonl stays whole
        raise
    return sum((after - before).values()), sum((before - after).values())
