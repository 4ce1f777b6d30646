"""The integrity of what a run writes (issue #22): annotations never replace measurements, the output folder is
resolved once, ids and folders that would break the contract are refused before any work, unreadable manifests,
resolutions and bench settings are one line, a failing disk stops a run in one line keeping what was finished.

Every refusal goes through the real CLI: exit 2, exactly one ``diffinv: error:`` line naming the input, no
traceback, and nothing written or changed."""

import errno
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from diffinv import output
from diffinv.cli import main
from diffinv.output import OutputLock
from test_bad_input import tree

REPO = Path(__file__).resolve().parents[1]


def run_cli(*argv: str) -> int:
    """``diffinv ARGV``; its exit status."""
    try:
        main(list(argv))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


@pytest.fixture
def cli(tmp_path, tiny_model_dir):
    """Runs ``diffinv predict`` (or ``fit``) on the tiny model in tmp_path; ``manifest(rows)`` writes a manifest
    beside a small red image."""
    Image.new("RGB", (20, 16), (200, 30, 30)).save(tmp_path / "red.png")

    def run(*args, out: str | None = "out", sub="predict", config="npi.yaml"):
        argv = [sub, "-c", str(REPO / "configs" / config), "--model.backbone.pretrained", str(tiny_model_dir),
                "--model.num_inference_steps", "2", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar",
                "false", *(["--output_dir", str(tmp_path / out)] if out is not None else []), *args]
        return run_cli(*argv)

    def manifest(rows: list[dict], name="m.jsonl") -> str:
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)

    run.tmp, run.manifest = tmp_path, manifest
    return run


def one_error(capsys) -> str:
    """The one ``diffinv: error:`` line of the last command (no traceback, no other error line)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    errors = [x for x in err.splitlines() if x.startswith("diffinv: error: ")]
    assert len(errors) == 1, err[-3000:]
    return errors[0]


def refused(cli, capsys, args: list[str], message: str, **kw) -> None:
    """The command exits 2 with one line matching ``message`` and leaves every file in tmp_path as it was."""
    before = tree(cli.tmp)
    assert cli(*args, **kw) == 2
    assert re.search(message, one_error(capsys))
    assert tree(cli.tmp) == before
    assert not (cli.tmp / "out").exists()


RED = {"image": "red.png", "source_prompt": "a red car", "target_prompts": ["a blue car"], "id": "car"}


# --- 1. annotations never replace what was measured -----------------------------------------------------------
@pytest.mark.parametrize("row, key", [
    (RED | {"psnr": 1e9}, "psnr"),
    (RED | {"kind": "edit"}, "kind"),
    (RED | {"lpips_alex": 0.0}, "lpips_alex"),
    (RED | {"seconds": 0.001}, "seconds"),
    (RED | {"meta": {"id": "another"}}, "id"),
    (RED | {"meta": {"image_path": "elsewhere.png"}}, "image_path"),
    (RED | {"meta": {"psnr_unedited": 99}}, "psnr_unedited"),
])
def test_a_manifest_cannot_replace_measured_fields(cli, capsys, row, key):
    refused(cli, capsys, ["--data.manifest", cli.manifest([row])],
            rf"m\.jsonl:1: .*{key!r} is a field diffinv writes in metrics\.jsonl")


def test_annotations_are_carried_beside_the_measurements(cli):
    from diffinv.callbacks import metric_lines
    from diffinv.inversion.result import ItemResult

    assert cli("--data.manifest", cli.manifest([RED | {"scene": "street", "meta": {"split": "val"}}])) == 0
    lines = [json.loads(x) for x in (cli.tmp / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [x["kind"] for x in lines] == ["reconstruction", "edit"]
    assert all(x["scene"] == "street" and x["split"] == "val" and x["id"] == "car" for x in lines)
    # even an annotation that slipped past the manifest's check cannot replace a measured field
    import torch

    from diffinv.inversion.record import Inversion

    record = Inversion.load(cli.tmp / "out" / "car" / "inversion.safetensors")
    r = ItemResult(id="car", source=torch.zeros(3, 8, 8), reconstruction=torch.ones(3, 8, 8), edits=[],
                   target_prompts=[], inversion=record, seconds_inversion=1.0, seconds_sampling=1.0,
                   meta={"psnr": 1e9, "kind": "edit", "image_path": "x.png", "note": "kept"})
    (line,) = metric_lines(r, "npi", "m", 7.5)
    assert line["psnr"] == 0.0 and line["kind"] == "reconstruction" and line["image_path"] == "car/reconstruction.png"
    assert line["note"] == "kept"


def test_every_field_a_line_measures_is_reserved():
    """The reserved names cover every field :func:`metric_lines` and the bench measure (a new metric that is not
    reserved would let a manifest replace it)."""
    import torch

    from diffinv.bench import TABLE_METRICS
    from diffinv.callbacks import MetricSettings, metric_lines
    from diffinv.inversion.record import Inversion
    from diffinv.inversion.result import ItemResult

    rec = Inversion(z0=torch.zeros(1, 1, 1), trajectory=torch.zeros(2, 1, 1, 1), timesteps=torch.tensor([1]),
                    source_image=torch.zeros(3, 8, 8, dtype=torch.uint8), source_prompt="a", method="npi", model="m",
                    guidance_scale=7.5, extra={"inner_iterations": torch.tensor([1]), "step_loss": torch.tensor([0.5])})
    r = ItemResult(id="x", source=torch.rand(3, 32, 32), reconstruction=torch.rand(3, 32, 32),
                   edits=[torch.rand(3, 32, 32)], target_prompts=["b"], inversion=rec, seconds_inversion=1.0,
                   seconds_sampling=1.0, meta={"mask_rle": [0, 100]})
    from diffinv.inversion.result import optimization_summary

    r.extra = optimization_summary(rec)
    keys = {k for line in metric_lines(r, "npi", "m", 7.5, MetricSettings(("alex", "vgg"))) for k in line}
    keys |= {m for ms in TABLE_METRICS.values() for m in ms} | {"pixel_noise", "caption_before_perturbation"}
    assert keys and all(output.is_line_field(k) for k in keys), sorted(k for k in keys if not output.is_line_field(k))
    assert not output.is_line_field("editing_type_id") and not output.is_line_field("scene")


# --- 2, 3. the output folder: resolved once, never empty ------------------------------------------------------
def test_a_tilde_output_dir_is_the_home_folder_everywhere(cli, capsys, monkeypatch):
    home, work = cli.tmp / "home", cli.tmp / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    manifest = cli.manifest([RED])
    assert cli("--data.manifest", manifest, "--output_dir=~/x", out=None) == 0
    assert (home / "x" / "car" / "inversion.safetensors").is_file() and (home / "x" / "metrics.jsonl").is_file()
    assert list(work.iterdir()) == []  # nothing in ./~
    assert cli("--data.manifest", manifest, "--output_dir=~/fit", "--model.num_inner_steps", "1",
               sub="fit", config="null_text.yaml", out=None) == 0
    assert list((home / "fit" / "lightning_logs").glob("version_*"))  # TensorBoard's logs follow the folder
    assert list(work.iterdir()) == []
    lock = OutputLock(home / "x").acquire()  # another run holds $HOME/x: the literal ~/x is that folder
    try:
        before = tree(cli.tmp)
        assert cli("--data.manifest", manifest, "--output_dir", "~/x", out=None) == 2
        assert f"{home / 'x'} is being written by another diffinv run" in one_error(capsys)
        assert tree(cli.tmp) == before
    finally:
        lock.release()


def test_an_empty_output_dir_is_refused(cli, capsys, monkeypatch):
    monkeypatch.chdir(cli.tmp)
    for empty in ("", " "):
        refused(cli, capsys, ["--data.manifest", cli.manifest([RED]), "--output_dir", empty],
                "--output_dir is empty: give a folder", out=None)


# --- 4, 5. ids that would break the contract ------------------------------------------------------------------
@pytest.mark.parametrize("item_id", ["metrics.jsonl", "lightning_logs", "METRICS.JSONL"])
def test_an_id_named_like_a_file_of_the_contract_is_refused(cli, capsys, item_id):
    refused(cli, capsys, ["--data.manifest", cli.manifest([RED | {"id": item_id}])],
            rf"m\.jsonl:1: id {re.escape(repr(item_id))} is a name diffinv's output folder uses")


def test_an_image_named_like_the_index_is_refused_by_its_id(cli, capsys):
    Image.new("RGB", (20, 16)).save(cli.tmp / "metrics.jsonl.png")
    refused(cli, capsys, ["--data.image", str(cli.tmp / "metrics.jsonl.png"), "--data.source_prompt", "a red car"],
            r"--data.image: id 'metrics.jsonl' is a name diffinv's output folder uses")


def test_reserved_names_of_the_contract():
    for name in (output.INDEX, output.LOCK, "lightning_logs", ".hidden", ".x.partial", "Metrics.jsonl"):
        with pytest.raises(output.DiffinvError, match="is a name diffinv's output folder uses"):
            output.check_item_id(name, "here")
    output.check_item_id("metrics.json", "here")  # a file inside an item folder, not a name at the top


def test_an_id_too_long_for_a_file_name_is_refused_before_any_work(cli, capsys):
    longest = "a" * (255 - len(".") - len(".partial"))
    refused(cli, capsys, ["--data.manifest", cli.manifest([RED | {"id": longest + "a"}])],
            r"m\.jsonl:1: id 'a{20}\.\.\.' is 247 bytes long: at most 246 fit")
    assert cli("--data.manifest", cli.manifest([RED | {"id": longest}])) == 0
    assert (cli.tmp / "out" / longest / "inversion.safetensors").is_file()


# --- 6. manifests Python's json cannot read -------------------------------------------------------------------
@pytest.mark.parametrize("line, message", [
    ('{"image": "red.png", "source_prompt": "a", "n": ' + "9" * 5000 + "}", "a number of 5000 digits"),
    ('{"image": "red.png", "source_prompt": "a", "deep": ' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply"),
])
def test_a_manifest_json_cannot_read_is_one_line(cli, capsys, line, message):
    (cli.tmp / "m.jsonl").write_text(json.dumps(RED) + "\n" + line + "\n")
    refused(cli, capsys, ["--data.manifest", str(cli.tmp / "m.jsonl")], rf"m\.jsonl:2: .*{message}")


# --- 7. resolutions ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("resolution", ["8", "15", "0", "-32"])
def test_a_nonsense_resolution_is_one_line(cli, capsys, resolution):
    refused(cli, capsys, ["--data.manifest", cli.manifest([RED]), "--data.resolution", resolution],
            rf"--data.resolution must be at least 16 pixels .*got {resolution}")


# --- 8. animated images ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_an_animated_image_warns_that_only_its_first_frame_is_used(cli, fmt):
    from diffinv.run import _one_line_warning
    from diffinv.data import load_image

    frames = [Image.new("RGB", (20, 16), c) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    path = cli.tmp / f"anim.{fmt.lower()}"
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=100)
    with pytest.warns(UserWarning, match=rf"image .*anim\.{fmt.lower()} is animated \(3 frames\): only its first") as w:
        assert load_image(path)[0, 0, 0] > 150  # the first (red) frame
    (warning,) = w.list
    text = _one_line_warning(warning.message, warning.category, warning.filename, warning.lineno)
    assert text.startswith("diffinv: warning: image ") and text.count("\n") == 1
    with pytest.warns(UserWarning, match="is animated"):
        assert cli("--data.image", str(path), "--data.source_prompt", "a red car") == 0


# --- 9. a disk that fills up or turns read-only mid-run -------------------------------------------------------
def failing_on_second_item(monkeypatch, name: str, error: OSError) -> None:
    """``diffinv.output.<name>`` raises ``error`` while the item 'second' is written."""
    real = getattr(output, name)

    def fail(*args, **kwargs):
        if re.search(r"\bsecond\b", " ".join(map(str, args))):  # its folder, its lines (not 'seconds')
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(output, name, fail)


@pytest.mark.parametrize("name, error, reason", [
    ("save_png", OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
    ("publish_item", OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
    ("append_lines", PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
])
def test_a_failing_disk_stops_in_one_line_keeping_the_finished_items(cli, capsys, monkeypatch, name, error, reason):
    rows = [RED | {"id": "first"}, RED | {"id": "second"}]
    manifest = cli.manifest(rows)
    out = cli.tmp / "out"
    with monkeypatch.context() as m:
        failing_on_second_item(m, name, error)
        assert cli("--data.manifest", manifest, "--data.batch_size", "1") == 2
    message = one_error(capsys)
    assert f"cannot write results to {out}: {reason}" in message and "the items finished so far are kept" in message
    assert (out / "first" / "inversion.safetensors").is_file()
    assert not list(out.glob(".*.partial"))  # the item in progress left nothing half-built
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == ["first", "first"]
    published = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert published in (["first", "metrics.jsonl"], ["first", "metrics.jsonl", "second"])
    if "second" in published:  # published whole before its lines were appended: the rerun restores them
        assert (out / "second" / "inversion.safetensors").is_file()
    first = tree(out / "first")
    assert cli("--data.manifest", manifest, "--data.batch_size", "1") == 0  # the disk is back: the rerun finishes
    assert tree(out / "first") == first
    ids = [json.loads(x)["id"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert ids == ["first", "first", "second", "second"]


def test_a_lock_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output.os, "pwrite", full)
    with pytest.raises(output.DiffinvError, match=rf"cannot write to --output_dir {tmp_path}: no space left on device"):
        OutputLock(tmp_path).acquire()
    monkeypatch.undo()
    OutputLock(tmp_path).acquire().release()  # the failed attempt left the lock free


# --- 10. bench settings -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting, message", [
    ({"steps": [0]}, r"--steps must be positive step counts, got \[0\]"),
    ({"steps": [2, -1]}, r"--steps must be positive step counts, got \[2, -1\]"),
    ({"runs": [{"label": "../escape", "config": "npi.yaml"}]}, r"run label '\.\./escape' .*a plain name"),
    ({"runs": [{"label": "a/b", "config": "npi.yaml"}]}, r"run label 'a/b' .*a plain name"),
    ({"runs": [{"label": ".hidden", "config": "npi.yaml"}]}, r"run label '\.hidden' .*a plain name"),
    ({"runs": [{"label": "", "config": "npi.yaml"}]}, r"run label '' .*a plain name"),
    ({"runs": [{"label": "results.md", "config": "npi.yaml"}]}, r"run label 'results\.md' is a name the bench writes"),
    ({"runs": [{"label": "NPI", "config": "npi.yaml"}, {"label": "NPI", "config": "ddim.yaml"}]},
     "run label 'NPI' is given to 2 runs"),
    ({"output_dir": ""}, "--output_dir is empty: give a folder"),
])
def test_bad_bench_settings_are_refused_before_any_run(tmp_path, capsys, monkeypatch, setting, message):
    monkeypatch.chdir(tmp_path)
    config = {"runs": [{"label": "NPI", "config": "npi.yaml"}], "steps": [2], "output_dir": str(tmp_path / "bench"),
              "args": ["--model.backbone.pretrained", "/no/such/model"]} | setting
    (tmp_path / "bench.yaml").write_text(json.dumps(config))
    before = tree(tmp_path)
    assert run_cli("bench", "-c", str(tmp_path / "bench.yaml")) == 2
    assert re.search(message, one_error(capsys))
    assert tree(tmp_path) == before and not (tmp_path / "bench").exists()
