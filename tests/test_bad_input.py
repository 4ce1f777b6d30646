"""Every bad input through the real CLI: exit 2, one line naming the input, no traceback, nothing written or
overwritten, the user's files untouched. Then the stops (SIGTERM), the lock, --help and the subcommands."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffinv.cli import main
from diffinv.output import OutputLock

REPO = Path(__file__).resolve().parents[1]
ENV = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join(sys.path)}


def tree(root: Path) -> dict:
    """Every file under root with its content's digest (the before/after snapshot of 'nothing changed')."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def world(tmp_path, tiny_model_dir):
    """Inputs of every kind in tmp_path; returns a function running the CLI there."""
    Image.new("RGB", (20, 16), (200, 30, 30)).save(tmp_path / "red.png")
    Image.new("RGB", (10000, 20), (200, 30, 30)).save(tmp_path / "panorama.png")
    good = {"image": "red.png", "source_prompt": "a red car", "target_prompts": ["a blue car"]}

    def manifest(name, row=None, raw: bytes | None = None):
        data = raw if raw is not None else (json.dumps(row) + "\n").encode()
        (tmp_path / name).write_bytes(data)
        return str(tmp_path / name)

    files = {
        "id_int": manifest("id_int.jsonl", good | {"id": 5}),
        "id_null": manifest("id_null.jsonl", good | {"id": None}),
        "image_null": manifest("image_null.jsonl", good | {"image": None}),
        "image_list": manifest("image_list.jsonl", good | {"image": ["red.png"]}),
        "latin1": manifest("latin1.jsonl", raw='{"image": "red.png", "source_prompt": "caf\xe9"}\n'.encode("latin-1")),
        "typo": manifest("typo.jsonl", {"image": "red.png", "source_prompt": "a red car", "target_prompt": ["x"]}),
        "targets_int": manifest("targets_int.jsonl", good | {"target_prompts": [1, 2]}),
        "bom": manifest("bom.jsonl", raw=b"\xef\xbb\xbf" + (json.dumps(good) + "\n").encode()),
        "good": manifest("good.jsonl", good | {"id": "car"}),
    }
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "bad_record").mkdir()
    (tmp_path / "bad_record" / "x").mkdir()
    (tmp_path / "bad_record" / "x" / "inversion.safetensors").write_bytes(b"\x00" * 64)

    def run(*args, config="npi.yaml", out="out"):
        argv = ["predict", "-c", str(REPO / "configs" / config), "--model.backbone.pretrained", str(tiny_model_dir),
                "--model.num_inference_steps", "2", "--trainer.accelerator", "cpu",
                "--output_dir", str(tmp_path / out), *args]
        try:
            main(argv)
        except SystemExit as e:
            return e.code
        return 0

    run.tmp, run.files = tmp_path, files
    return run


CASES = {
    # manifest: the typed schema
    "id of the wrong type": (["--data.manifest", "{id_int}"], 'id_int.jsonl:1: "id" must be a string', {}),
    "id null": (["--data.manifest", "{id_null}"], 'id_null.jsonl:1: "id" must be a string .*got null', {}),
    "image null": (["--data.manifest", "{image_null}"], 'image_null.jsonl:1: "image" must be a string .*got null', {}),
    "image a list": (["--data.manifest", "{image_list}"], '"image" must be a string .*got a list', {}),
    "manifest not UTF-8": (["--data.manifest", "{latin1}"], r"latin1.jsonl:1: not UTF-8 text \(byte 0xe9\)", {}),
    "misspelt key": (["--data.manifest", "{typo}"], "unknown key 'target_prompt': did you mean 'target_prompts'", {}),
    "targets not strings": (["--data.manifest", "{targets_int}"], '"target_prompts" must be a list of strings', {}),
    "empty source prompt": (["--data.image", "{tmp}/red.png", "--data.source_prompt", " "], "source_prompt .* is empty", {}),
    "missing image": (["--data.image", "{tmp}/nope.png", "--data.source_prompt", "x"], "image .*nope.png does not exist", {}),
    "panorama": (["--data.image", "{tmp}/panorama.png", "--data.source_prompt", "a red car"],
                 r"panorama.png is 10000x20, 500:1, over --data.max_aspect 4", {}),
    "corrupt saved inversion": (["--data.records", "{tmp}/bad_record"], "bad_record/x/inversion.safetensors is corrupt", {}),
    # the output folder
    "output_dir a file": (["--output_dir", "{tmp}/a_file"], "a_file is an existing file, not a folder", {}),
    # config-time checks, raised inside jsonargparse's instantiation
    "zero steps": (["--model.num_inference_steps", "0"], "num_inference_steps must be >= 1, got 0", {}),
    "negative steps": (["--model.num_inference_steps", "-1"], "num_inference_steps must be >= 1, got -1", {}),
    "too many steps": (["--model.num_inference_steps", "1000"], r"num_inference_steps must be in 1\.\.999 .*got 1000", {}),
    "SDEdit strength over 1": (["--model.editor.strength", "1.5"], r"SDEdit strength must be in \(0, 1\], got 1.5",
                               {"config": "edit_sdedit.yaml"}),
    "SDEdit strength 0": (["--model.editor.strength", "0"], r"SDEdit strength must be in \(0, 1\], got 0",
                          {"config": "edit_sdedit.yaml"}),
    "negative pixel noise": (["--data.perturb.pixel_noise", "-1"], "perturb.pixel_noise must be >= 0", {}),
    "missing model": (["--model.backbone.pretrained", "/no/such/model"], "model folder /no/such/model does not exist", {}),
    "mismatched replace prompts": (["--data.image", "{tmp}/red.png", "--data.source_prompt", "a red car",
                                    "--data.target_prompts", '["a big blue car"]'],
                                   "source 'a red car' has 3 words, target 'a big blue car' has 4",
                                   {"config": "edit_p2p_replace.yaml"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(name, world, capsys):
    args, message, kw = CASES[name]
    args = [a.format(tmp=world.tmp, **world.files) for a in args]
    before = tree(world.tmp)
    assert world(*args, **kw) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [x for x in err.splitlines() if x.startswith("diffinv: error: ")]
    assert len(errors) == 1, err
    import re

    assert re.search(message, errors[0]), errors[0]
    assert tree(world.tmp) == before  # nothing written, nothing changed
    assert not (world.tmp / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_accelerator_without_a_gpu(world, capsys):
    assert world("--trainer.accelerator", "gpu") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "diffinv: error: --trainer.accelerator" in err and "cpu" in err
    assert not (world.tmp / "out").exists()


def test_read_only_output_dir(world, capsys, monkeypatch):
    (world.tmp / "ro").mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == world.tmp / "ro" else real(p, mode))
    assert world(out="ro") == 2
    assert "diffinv: error: --output_dir" in capsys.readouterr().err
    assert list((world.tmp / "ro").iterdir()) == []


def test_users_files_are_never_deleted_or_truncated(world, capsys):
    """A folder named like an item and a metrics.jsonl diffinv did not write: refused, untouched."""
    (world.tmp / "out" / "car").mkdir(parents=True)
    (world.tmp / "out" / "car" / "photo.jpg").write_bytes(b"the user's photo")
    before = tree(world.tmp / "out")
    assert world("--data.manifest", world.files["good"]) == 2
    assert "out/car exists and is not a finished diffinv item" in capsys.readouterr().err
    assert tree(world.tmp / "out") == before and not (world.tmp / "out" / "metrics.jsonl").exists()
    (world.tmp / "mine").mkdir()
    (world.tmp / "mine" / "metrics.jsonl").write_text("epoch 1: 0.93\n")
    before = tree(world.tmp / "mine")
    assert world("--data.manifest", world.files["good"], out="mine") == 2
    assert "metrics.jsonl line 1 was not written by diffinv" in capsys.readouterr().err
    assert tree(world.tmp / "mine") == before


def test_rerun_skips_only_the_same_work(world, capsys):
    assert world("--data.manifest", world.files["good"]) == 0
    first = tree(world.tmp / "out")
    lines = (world.tmp / "out" / "metrics.jsonl").read_text()
    assert world("--data.manifest", world.files["good"]) == 0  # the same: skipped
    assert "skipping 1 item(s) already finished" in capsys.readouterr().out
    assert (world.tmp / "out" / "metrics.jsonl").read_text() == lines
    assert world("--data.manifest", world.files["good"], config="proxnpi.yaml") == 2  # another method: refused
    err = capsys.readouterr().err
    assert "out/car holds a finished result of other work: settings (model.class_path" in err
    assert world("--data.manifest", world.files["good"], "--model.guidance_scale", "5") == 2
    assert "model.init_args.guidance_scale: 7.5 there, 5.0 here" in capsys.readouterr().err
    assert world("--data.manifest", world.files["good"], "--data.target_prompts", '["a green car"]') == 2
    assert tree(world.tmp / "out") == first
    assert world("--data.manifest", world.files["good"], "--data.batch_size", "4") == 0  # batching changes nothing
    assert tree(world.tmp / "out") == first


def test_bom_manifest_is_read(world):
    assert world("--data.manifest", world.files["bom"]) == 0
    assert (world.tmp / "out" / "red" / "inversion.safetensors").is_file()


def test_a_second_run_into_a_locked_folder_is_refused(world, capsys):
    lock = OutputLock(world.tmp / "out").acquire()  # as another run would hold it
    try:
        assert world() == 2
        assert f"out is being written by another diffinv run (pid {os.getpid()})" in capsys.readouterr().err
    finally:
        lock.release()
    assert world() == 0


def test_sigterm_stops_cleanly_keeping_finished_items(tiny_model_dir, tmp_path):
    rows = [{"image": str(REPO / f"src/diffinv/examples/shapes-{i % 3}.png"), "source_prompt": "a red car",
             "target_prompts": ["a blue car"], "id": f"item{i}"} for i in range(40)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "diffinv.cli", "predict", "-c", str(REPO / "configs/npi.yaml"),
           "--model.backbone.pretrained", str(tiny_model_dir), "--model.num_inference_steps", "20",
           "--trainer.accelerator", "cpu", "--data.manifest", str(tmp_path / "m.jsonl"), "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*/inversion.safetensors")):
        time.sleep(0.2)
    second = subprocess.run(cmd, capture_output=True, text=True, env=ENV)  # meanwhile: one writer only
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert second.returncode == 2 and "is being written by another diffinv run" in second.stderr
    assert "diffinv: stopped by SIGTERM: the finished items are kept" in err and "Traceback" not in err
    done = {p.parent.name for p in out.glob("*/inversion.safetensors")}
    assert 1 <= len(done) < 40
    assert not list(out.glob(".*.partial"))  # the item in progress left nothing
    ids = [json.loads(x)["id"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(i for i in done for _ in range(2))


def test_help_on_a_config_lists_its_model_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["predict", "-c", str(REPO / "configs/proxnpi.yaml"), "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "this config's model: diffinv.inversion.ProximalNegativePromptInversion" in out
    assert "--model.proximal.quantile 0.7" in out and "--model.num_inference_steps 50" in out
    with pytest.raises(SystemExit):
        main(["predict", "-c", str(REPO / "configs/edit_p2p_replace.yaml"), "--help"])
    out = capsys.readouterr().out
    assert "--model.editor diffinv.editing.PromptToPrompt" in out and "--model.editor.cross_replace_steps" in out


@pytest.mark.parametrize("sub", ["validate", "test"])
def test_only_fit_and_predict_are_offered(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([sub, "-c", str(REPO / "configs/npi.yaml")])
    assert e.value.code == 2
    assert f"diffinv: error: unknown subcommand '{sub}': use fit, predict, bench or serve" in capsys.readouterr().err


def test_top_level_help_answers_without_importing_torch_or_lightning():
    code = ("import sys; from diffinv.cli import main; main(['--help']); "
            "print(sorted(m for m in ('torch', 'lightning', 'diffusers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0 and "usage: diffinv {fit,predict,bench,serve}" in proc.stdout
    assert proc.stdout.strip().endswith("[]")  # none of them imported


def test_progress_bar_can_be_turned_off(world, capsys):
    assert world("--trainer.enable_progress_bar", "false") == 0
    assert "Predicting" not in capsys.readouterr().err
    assert (world.tmp / "out" / "metrics.jsonl").is_file()


def test_embedded_model_warns_about_words_it_does_not_know(tmp_path, capsys):
    Image.new("RGB", (32, 32), (90, 60, 40)).save(tmp_path / "cat.png")
    with pytest.warns(UserWarning, match=r"only knows its shapes world.*\(cat, my, of, photo\).*--model.backbone.pretrained"):
        main(["predict", "-c", str(REPO / "configs/npi.yaml"), "--model.num_inference_steps", "2",
              "--trainer.accelerator", "cpu", "--data.image", str(tmp_path / "cat.png"), "--data.source_prompt",
              "a photo of my cat", "--output_dir", str(tmp_path / "o")])


def test_a_resolution_far_over_the_models_warns(world):
    with pytest.warns(UserWarning, match=r"--data.resolution 64 is 4x the model's native 16"):
        assert world("--data.resolution", "64", "--data.image", str(world.tmp / "red.png"),
                     "--data.source_prompt", "a red car") == 0


def test_out_of_memory_and_wrapped_config_errors_are_one_line():
    from diffinv.cli import one_line
    from diffinv.errors import DiffinvError

    oom = one_line(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert oom.startswith("out of memory") and "--data.batch_size" in oom and "bf16-mixed" in oom
    try:
        try:
            raise DiffinvError("num_inference_steps must be >= 1, got 0")
        except DiffinvError as inner:
            raise ValueError("Does not validate against any of the Union subtypes") from inner
    except ValueError as wrapped:
        assert one_line(wrapped) == "num_inference_steps must be >= 1, got 0"
    assert one_line(KeyError("a bug")) is None  # anything else keeps its traceback
