"""The output contract (diffinv.output): reconcile is idempotent and never rewrites a foreign file, an item folder
diffinv did not write is never replaced, the folder lock admits one writer, a rerun skips only the same work."""

import json
import os

import numpy as np
import pytest

from diffinv.errors import DiffinvError
from diffinv.output import (
    LOCK,
    OutputLock,
    check_output_dir,
    finished_items,
    identity,
    identity_difference,
    reconcile_metrics,
)


def line(item, kind="reconstruction", k=None):
    return {"id": item, "kind": kind, "image_path": f"{item}/{'reconstruction' if k is None else f'edit-{k}'}.png"}


def make_item(root, item, lines, done=True, partial=False):
    folder = root / (f".{item}.partial" if partial else item)
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps(lines))
    if done:
        (folder / "inversion.safetensors").write_bytes(b"x")


def index_ids(root):
    return [json.loads(x)["id"] for x in (root / "metrics.jsonl").read_text().splitlines()]


def test_reconcile_restores_cut_lines_drops_unfinished_and_is_idempotent(tmp_path):
    make_item(tmp_path, "a", [line("a")])
    make_item(tmp_path, "b", [line("b"), line("b", "edit", 0)])
    make_item(tmp_path, "c", [line("c")], done=False)  # killed before its record: not finished
    index = tmp_path / "metrics.jsonl"
    index.write_text(json.dumps(line("a")) + "\n" + json.dumps(line("c")) + "\n" + json.dumps(line("b"))[:15])
    assert reconcile_metrics(tmp_path) == (2, 1)  # b's two lines restored, c's dropped, the cut line ignored
    assert index_ids(tmp_path) == ["a", "b", "b"]
    before = (index.read_bytes(), index.stat().st_mtime_ns)
    assert reconcile_metrics(tmp_path) == (0, 0)
    assert (index.read_bytes(), index.stat().st_mtime_ns) == before  # the second run changes nothing at all


def test_reconcile_counts_an_item_once_whatever_was_left_behind(tmp_path):
    """A leftover .X.partial holding a complete record beside a finished X, and duplicated lines of X (two runs
    before the lock existed), end as X's lines once; rerunning reconcile adds nothing."""
    make_item(tmp_path, "x", [line("x"), line("x", "edit", 0)])
    make_item(tmp_path, "x", [line("x"), line("x", "edit", 0)], partial=True)
    twice = [line("x"), line("x", "edit", 0)] * 2
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in twice))
    for _ in range(3):
        reconcile_metrics(tmp_path)
        assert index_ids(tmp_path) == ["x", "x"]
    assert not (tmp_path / ".x.partial").exists()


def test_reconcile_never_rewrites_a_file_diffinv_did_not_write(tmp_path):
    make_item(tmp_path, "a", [line("a")])
    for text in ("my own notes\n", '{"id": "a", "kind": "reconstruction", "image_path": "a/r.png"}\nnotes\n',
                 '{"score": 1}\n', "caf\xe9\n"):
        index = tmp_path / "metrics.jsonl"
        index.write_bytes(text.encode("latin-1"))
        with pytest.raises(DiffinvError, match="was not written by diffinv"):
            reconcile_metrics(tmp_path)
        with pytest.raises(DiffinvError, match="was not written by diffinv"):
            check_output_dir(tmp_path)
        assert index.read_bytes() == text.encode("latin-1")


def test_a_partial_folder_with_foreign_files_is_kept(tmp_path):
    (tmp_path / ".x.partial").mkdir()
    (tmp_path / ".x.partial" / "thesis.tex").write_text("mine")
    reconcile_metrics(tmp_path)
    assert (tmp_path / ".x.partial" / "thesis.tex").read_text() == "mine"


def test_finished_items_skips_only_the_same_work_and_refuses_foreign_folders(tmp_path):
    from diffinv.inversion.record import Inversion
    import torch

    image = np.full((8, 8, 3), 7, dtype=np.uint8)
    settings = {"model": {"class_path": "NPI", "init_args": {"guidance_scale": 7.5}}}
    ident = identity(image, "a red car", ["a blue car"], settings)
    rec = Inversion(z0=torch.zeros(1, 1, 1), trajectory=torch.zeros(2, 1, 1, 1), timesteps=torch.tensor([1]),
                    source_image=torch.zeros(3, 8, 8, dtype=torch.uint8), source_prompt="a red car", method="npi",
                    model="m", guidance_scale=7.5, meta={"identity": json.dumps(ident)})
    (tmp_path / "car").mkdir()
    rec.save(tmp_path / "car" / "inversion.safetensors")
    assert finished_items(tmp_path, {"car": ident, "new": ident}) == ["car"]
    other = [
        identity(image, "a red car", ["a green car"], settings),
        identity(image + 1, "a red car", ["a blue car"], settings),
        identity(image, "a red car", ["a blue car"], {"model": {"class_path": "NPI", "init_args": {"guidance_scale": 5.0}}}),
        identity(image, "a red car", ["a blue car"], {"model": {"class_path": "ProxNPI", "init_args": {}}}),
    ]
    for what, ident2 in zip(["target_prompts", "input image", "guidance_scale", "class_path"], other):
        with pytest.raises(DiffinvError, match=f"holds a finished result of other work: .*{what}"):
            finished_items(tmp_path, {"car": ident2})
    assert identity_difference(json.loads(rec.meta["identity"]), ident) is None
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "photo.jpg").write_bytes(b"user data")
    with pytest.raises(DiffinvError, match="cat exists and is not a finished diffinv item"):
        finished_items(tmp_path, {"cat": ident})
    assert (tmp_path / "cat" / "photo.jpg").read_bytes() == b"user data"
    (tmp_path / "car" / "inversion.safetensors").write_bytes(b"\x00" * 10)  # a corrupt record names itself
    with pytest.raises(DiffinvError, match="inversion.safetensors is corrupt.*delete the folder"):
        finished_items(tmp_path, {"car": ident})


def test_lock_admits_one_writer_and_leaves_no_trace_of_a_run_that_wrote_nothing(tmp_path):
    out = tmp_path / "new" / "run"
    first = OutputLock(out).acquire()
    assert (out / LOCK).read_text().strip() == str(os.getpid())
    with pytest.raises(DiffinvError, match=rf"being written by another diffinv run \(pid {os.getpid()}\)"):
        OutputLock(out).acquire()
    first.release()
    assert not (tmp_path / "new").exists()  # created by the lock, nothing written: removed again
    second = OutputLock(out).acquire()
    (out / "metrics.jsonl").write_text("")
    second.release()
    assert (out / "metrics.jsonl").exists() and (out / LOCK).exists()  # a folder with results is kept whole


def test_output_dir_checks(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DiffinvError, match="is an existing file, not a folder"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(DiffinvError, match="cannot be created: .*file is a file"):
        check_output_dir(tmp_path / "file" / "sub")
    check_output_dir(tmp_path / "a" / "b")  # creatable: fine, and nothing is created by the check
    assert not (tmp_path / "a").exists()
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a read-only folder looks to a non-root user
    with pytest.raises(DiffinvError, match="is not writable"):
        check_output_dir(tmp_path / "a")


def test_a_metrics_file_json_cannot_read_is_refused_in_one_line(tmp_path):
    """A metrics.jsonl line nested too deeply or with a number too long for Python's json is not diffinv's."""
    for text in ("[" * 100000 + "]" * 100000 + "\n", '{"id": ' + "1" * 5000 + "}\n"):
        (tmp_path / "metrics.jsonl").write_text(text)
        with pytest.raises(DiffinvError, match="metrics.jsonl line 1 was not written by diffinv"):
            check_output_dir(tmp_path)
        with pytest.raises(DiffinvError, match="metrics.jsonl line 1 was not written by diffinv"):
            reconcile_metrics(tmp_path)
        assert (tmp_path / "metrics.jsonl").read_text() == text


def test_a_failing_write_of_metrics_is_cut_back_and_one_line(tmp_path, monkeypatch):
    """A full disk while appending an item's lines leaves metrics.jsonl as it was (no partial line); a full disk
    while reconciling leaves the old file whole."""
    import errno

    from diffinv import output

    output.append_lines(tmp_path, [line("a")])
    before = (tmp_path / "metrics.jsonl").read_bytes()
    real = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        output.append_lines(tmp_path, [line("b"), line("b", "edit", 0)])
    monkeypatch.setattr(os, "fsync", real)
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    make_item(tmp_path, "a", [line("a")])
    make_item(tmp_path, "c", [line("c")])
    monkeypatch.setattr(os, "replace", lambda *a: full(0))
    with pytest.raises(DiffinvError, match=f"cannot write results to {tmp_path}: no space left on device"):
        reconcile_metrics(tmp_path)
    assert (tmp_path / "metrics.jsonl").read_bytes() == before and not (tmp_path / ".metrics.jsonl.tmp").exists()
