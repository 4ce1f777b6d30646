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
    configs = {"empty_yaml": "", "malformed_yaml": "model: [1, 2\n  bad: : x\n",
               "ten_yaml": "model:\n  init_args:\n    guidance_scale: ten\n"}
    for key, text in configs.items():
        (tmp_path / f"{key.removesuffix('_yaml')}.yaml").write_text(text)
        files[key] = str(tmp_path / f"{key.removesuffix('_yaml')}.yaml")
    (tmp_path / "bad_record").mkdir()
    (tmp_path / "bad_record" / "x").mkdir()
    (tmp_path / "bad_record" / "x" / "inversion.safetensors").write_bytes(b"\x00" * 64)

    def run(*args, config="npi.yaml", out="out", sub="predict"):
        argv = [sub, "-c", str(REPO / "configs" / config), "--model.backbone.pretrained", str(tiny_model_dir),
                "--model.num_inference_steps", "2", "--trainer.accelerator", "cpu",
                "--output_dir", str(tmp_path / out), *args]
        try:
            main(argv)
        except SystemExit as e:
            return e.code
        return 0

    run.tmp, run.files, run.model = tmp_path, files, str(tiny_model_dir)
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
    # jsonargparse's errors: one line naming the option (or the file) and what it accepts, not a usage wall
    "invalid proximal operator": (["--model.proximal.prox", "nonsense"],
                                  r"^diffinv: error: --model.proximal.prox: 'nonsense' is not a valid choice: use one "
                                  r"of l0, l1, authors_l0, authors_l1$", {"config": "proxnpi.yaml"}),
    "invalid P2P mode": (["--model.editor.mode", "swap"],
                         r"--model.editor.mode: 'swap' is not a valid choice: use one of replace, refine$",
                         {"config": "edit_p2p_replace.yaml"}),
    "invalid precision": (["--trainer.precision", "bogus"],
                          r"--trainer.precision: 'bogus' is not a valid choice: use one of 64, 32, 16, .*bf16-mixed", {}),
    "misspelt model option": (["--model.guidence_scale", "7"],
                              r"unknown option --model.guidence_scale: did you mean --model.guidance_scale\?$", {}),
    "misspelt data option": (["--data.batchsize", "2"],
                             r"unknown option --data.batchsize: did you mean --data.batch_size\?$", {}),
    "misspelt top-level option": (["--output_dirr", "x"], r"unknown option --output_dirr: did you mean --output_dir\?$",
                                  {}),
    "NaN guidance scale": (["--model.guidance_scale", "nan"],
                           r"--model.guidance_scale: expected a finite number, got 'nan'$", {}),
    "word for a number": (["--model.guidance_scale", "ten"], r"--model.guidance_scale: expected a number, got 'ten'$",
                          {}),
    "word for a whole number": (["--model.num_inference_steps", "2.5"],
                                r"--model.num_inference_steps: expected a whole number, got '2.5'$", {}),
    "word for a number in a YAML": (["-c", "{ten_yaml}"], r"model.guidance_scale in .*ten.yaml: expected a number, "
                                    r"got 'ten'$", {}),
    "empty config file": (["-c", "{empty_yaml}"], r"config file .*empty.yaml is empty", {}),
    "malformed config file": (["-c", "{malformed_yaml}"], r"config file .*malformed.yaml is not valid YAML at line 2, "
                              "column 6", {}),
    "missing config file": (["-c", "{tmp}/nope.yaml"], r"config file .*nope.yaml does not exist", {}),
    # values accepted in silence before: refused at config time
    "overflowing guidance scale": (["--model.guidance_scale", "1e999"], "guidance_scale must be a finite number, got inf",
                                   {}),
    "negative guidance scale": (["--model.guidance_scale", "-1"], r"guidance_scale must be >= 0, got -1.0", {}),
    "negative guidance scale, DDIM": (["--model.guidance_scale", "-0.5"], r"guidance_scale must be >= 0, got -0.5",
                                      {"config": "ddim.yaml"}),
    "negative source guidance scale": (["--model.source_guidance_scale", "-2"],
                                       r"source_guidance_scale must be >= 0, got -2.0", {"config": "cycle_diffusion.yaml"}),
    "negative NTI lr": (["--model.lr", "-0.01"], r"^diffinv: error: lr must be > 0, got -0.01",
                        {"config": "null_text.yaml"}),
    "zero latent-TOP lr": (["--model.lr", "0"], r"lr must be > 0, got 0.0", {"config": "latent_top.yaml"}),
    "negative latent-TOP noise lr": (["--model.noise_bias_lr", "-1"], r"noise_bias_lr must be > 0, got -1.0",
                                     {"config": "latent_top.yaml"}),
    "negative inner steps": (["--model.num_inner_steps", "-3"], r"num_inner_steps must be >= 0, got -3",
                             {"config": "null_text.yaml"}),
    "zero starts": (["--model.num_starts", "0"], r"num_starts must be >= 1, got 0", {"config": "latent_top.yaml"}),
    "negative hops": (["--model.hops", "-1"], r"hops must be >= 0, got -1", {"config": "latent_top.yaml"}),
    "local blend threshold over 1": (["--model.editor.local_blend_threshold", "1.5"],
                                     r"editor.local_blend_threshold must be in \[0, 1\], got 1.5 .*no-op",
                                     {"config": "edit_p2p_replace.yaml"}),
    "local blend threshold under 0": (["--model.editor.local_blend_threshold", "-0.1"],
                                      r"editor.local_blend_threshold must be in \[0, 1\], got -0.1",
                                      {"config": "edit_p2p_replace.yaml"}),
    "negative proximal step": (["--model.proximal.step_size", "-1"], r"proximal.step_size must be in \[0, 1\], got -1.0",
                               {"config": "proxnpi.yaml"}),
    # a config run with the other subcommand
    "predict config under fit": ([], r"npi.yaml sets return_predictions, an option of `diffinv predict` only: this "
                                 r"method runs with `diffinv predict -c .*npi.yaml`", {"sub": "fit"}),
    "fit method under predict": (["--data.image", "{tmp}/red.png", "--data.source_prompt", "a red car"],
                                 r"null_text optimises per image: run it with `diffinv fit`",
                                 {"config": "null_text.yaml"}),
    "predict option under fit": (["--return_predictions", "false"],
                                 r"--return_predictions is an option of `diffinv predict` only: drop it under "
                                 "`diffinv fit`", {"config": "null_text.yaml", "sub": "fit"}),
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
    from diffinv.errors import one_line
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


# --- saved records: tampered, or edited with another step count ------------------------------------------------


def tamper(good: Path, folder: Path, tensors=None, metadata=None) -> Path:
    """A copy of the record ``good`` as ``folder/x/inversion.safetensors``, its tensors and metadata changed by
    the functions ``tensors`` and ``metadata`` (each takes the dict and changes it in place)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(good), framework="pt") as f:
        data, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    (tensors or (lambda d: None))(data)
    (metadata or (lambda d: None))(meta)
    path = folder / "x" / "inversion.safetensors"
    path.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in data.items()}, str(path), metadata=meta)
    return path


def _set(d: dict, **kw) -> None:
    d.update(kw)


def _sampling(metadata: dict, **kw) -> None:
    """Change entries of a saved record's typed sampling."""
    metadata["sampling"] = json.dumps(json.loads(metadata["sampling"]) | kw)


def _latents(d: dict, fn) -> None:
    for k in ("z0", "trajectory"):
        d[k] = fn(d[k])


TAMPERED = {
    "meta a list": (None, lambda m: _set(m, meta="[1, 2]"), "has meta of type list, expected a JSON object"),
    "start level not an integer": (None, lambda m: _sampling(m, start_level="half"),
                                   "has sampling start_level 'half', expected a level in 1..2"),
    "start level out of range": (None, lambda m: _sampling(m, start_level=7),
                                 r"has sampling start_level 7, expected a level in 1\.\.2"),
    "unknown step rule": (None, lambda m: _sampling(m, step="leap"), "has sampling step 'leap', expected one of"),
    "sampling entry unknown": (None, lambda m: _sampling(m, colour="red"), "sampling has unknown entries colour"),
    "coupled without its sequence": (None, lambda m: _sampling(m, step="coupled"),
                                     "is sampled with the coupled step but lacks extra.edict_y_T"),
    "wrong channel count": (lambda d: _latents(d, lambda t: t[..., :3, :, :]), None,
                            r"holds 3-channel latents; this model's \(.*\) have 4"),
    "latents not fitting the image": (lambda d: _latents(d, lambda t: t[..., :, :-1]), None,
                                      r"holds 8x9 latents for a 16x20 source image; this model's VAE \(factor 2\) "
                                      "needs 8x10"),
    "unconditional of the wrong shape": (lambda d: _set(d, unconditional=torch.zeros(2, 8, 17)), None,
                                         r"holds unconditional embeddings of shape 8x17 per step; this model's .* "
                                         "conditioning is 8x16"),
    "unconditional per step count": (lambda d: _set(d, unconditional=torch.zeros(3, 8, 16)), None,
                                     r"has an unconditional embedding of shape 3x8x16, expected 2xLxD"),
    "NaN latents": (lambda d: d["trajectory"].view(-1)[0].fill_(float("nan")), None,
                    "has NaN or infinite values in trajectory"),
    "infinite embeddings": (lambda d: _set(d, unconditional=torch.full((2, 8, 16), float("inf"))), None,
                            "has NaN or infinite values in unconditional"),
    "NaN guidance scale": (None, lambda m: _set(m, guidance_scale="nan"), "has guidance_scale nan"),
}


@pytest.fixture(scope="module")
def saved_record(tiny_model_dir, tmp_path_factory) -> Path:
    """A real record of the tiny model: 16x20 image, 2 steps, NPI."""
    tmp = tmp_path_factory.mktemp("saved")
    Image.new("RGB", (20, 16), (200, 30, 30)).save(tmp / "red.png")
    main(["predict", "-c", str(REPO / "configs/npi.yaml"), "--model.backbone.pretrained", str(tiny_model_dir),
          "--model.num_inference_steps", "2", "--trainer.accelerator", "cpu", "--output_dir", str(tmp / "out"),
          "--data.image", str(tmp / "red.png"), "--data.source_prompt", "a red car",
          "--data.target_prompts", '["a blue car"]'])
    return tmp / "out" / "red" / "inversion.safetensors"


@pytest.mark.parametrize("name", list(TAMPERED))
def test_a_tampered_record_is_one_line_naming_it(name, saved_record, world, capsys):
    tensors, metadata, message = TAMPERED[name]
    path = tamper(saved_record, world.tmp / "tampered", tensors, metadata)
    before = tree(world.tmp)
    assert world("--data.records", str(world.tmp / "tampered")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [x for x in err.splitlines() if x.startswith("diffinv: error: ")]
    assert len(errors) == 1, err
    import re

    assert f"inversion record {path}" in errors[0] and re.search(message, errors[0]), errors[0]
    assert tree(world.tmp) == before and not (world.tmp / "out").exists()


def test_a_record_with_other_steps_is_refused_only_when_the_option_asks_for_them(saved_record, world, tiny_model_dir,
                                                                                  capsys):
    folder = world.tmp / "records"
    tamper(saved_record, folder)
    before = tree(world.tmp)
    assert world("--data.records", str(folder), "--model.num_inference_steps", "3") == 2  # after the fixture's 2
    err = capsys.readouterr().err
    assert (f"diffinv: error: inversion record {folder}/x/inversion.safetensors was made with num_inference_steps "
            "2, not --model.num_inference_steps 3: a record is re-edited with its own num_inference_steps; drop the "
            "option or give 2") in err
    assert tree(world.tmp) == before
    # without the option (the config's 50), the record's own 2 steps
    main(["predict", "-c", str(REPO / "configs/npi.yaml"), "--model.backbone.pretrained", str(tiny_model_dir),
          "--trainer.accelerator", "cpu", "--output_dir", str(world.tmp / "edits"), "--data.records", str(folder)])
    line = json.loads((world.tmp / "edits" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["num_inference_steps"] == 2


def test_saved_records_under_fit_are_refused_naming_predict(saved_record, world, capsys):
    """``fit`` with --data.records ended in a KeyError traceback (the record has no optimisation to report)."""
    folder = world.tmp / "records"
    tamper(saved_record, folder)
    before = tree(world.tmp)
    argv = ["fit", "-c", str(REPO / "configs/null_text.yaml"), "--model.backbone.pretrained", world.model,
            "--model.num_inference_steps", "2", "--trainer.accelerator", "cpu", "--output_dir",
            str(world.tmp / "out"), "--data.records", str(folder)]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert ("diffinv: error: null_text: `diffinv fit` optimises images, and items x are saved inversions: edit them "
            "with `diffinv predict` (--data.records DIR)") in err
    assert tree(world.tmp) == before and not (world.tmp / "out").exists()


# --- what a run prints on stderr -------------------------------------------------------------------------------


def test_fit_prints_no_lightning_warnings(tiny_model_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "diffinv.cli", "fit", "-c", str(REPO / "configs/null_text.yaml"),
         "--model.backbone.pretrained", str(tiny_model_dir), "--model.num_inference_steps", "2",
         "--model.num_inner_steps", "1", "--trainer.accelerator", "cpu", "--output_dir", str(tmp_path / "o"),
         "--data.image", str(REPO / "src/diffinv/examples/shapes-0.png"), "--data.source_prompt", "a red car",
         "--data.target_prompts", '["a blue car"]', "--trainer.enable_progress_bar", "false"],
        capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import re

    noise = [x for x in proc.stderr.splitlines() if re.search(r"\.py:\d+: |Warning|Trainer\.fit` stopped", x)]
    assert noise == [], proc.stderr
    assert (tmp_path / "o" / "shapes-0" / "inversion.safetensors").is_file()


def test_a_stop_after_the_last_item_says_nothing_was_dropped(world, capsys, monkeypatch):
    """SIGTERM once every item is written: the message must not claim an item in progress was dropped."""
    from diffinv.inversion.base import InversionMethod

    monkeypatch.setattr(InversionMethod, "on_predict_end", lambda self: os.kill(os.getpid(), signal.SIGTERM),
                        raising=False)
    assert world("--data.manifest", world.files["good"]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert f"diffinv: stopped by SIGTERM: every item of this run had been written to {world.tmp / 'out'}" in err
    assert "not written" not in err
    assert (world.tmp / "out" / "car" / "inversion.safetensors").is_file()


def test_a_stop_before_the_last_item_counts_what_was_not_written(world, capsys, monkeypatch):
    from diffinv.inversion.base import InversionMethod

    real = InversionMethod.run_batch

    def stop_at_second(self, batch):
        if any(i.id == "b" for i in batch):
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batch)

    monkeypatch.setattr(InversionMethod, "run_batch", stop_at_second)
    rows = [{"image": "red.png", "source_prompt": "a red car", "id": i} for i in ("a", "b")]
    (world.tmp / "two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert world("--data.manifest", str(world.tmp / "two.jsonl"), "--data.batch_size", "1") == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "the finished items are kept in" in err and "1 of 2 item(s) were not written" in err
    assert (world.tmp / "out" / "a" / "inversion.safetensors").is_file() and not (world.tmp / "out" / "b").exists()
