"""Every YAML in configs/ through the real CLI, on tiny components, and the output contract."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from diffinv.bench import subcommand_for as subcommand
from diffinv.cli import main
from diffinv.inversion.record import Inversion

REPO = Path(__file__).resolve().parents[1]


METHOD_CONFIGS = sorted(str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml")
                        if "class_path: diffinv.inversion." in p.read_text() and p.parent.name != "flow")
"""Every method config but the flow-only methods' (configs/flow/: tests/test_flow_methods.py runs those on flow
models)."""
FLOW_CONFIGS = sorted(str(p.relative_to(REPO / "configs")) for p in (REPO / "configs" / "flow").glob("*.yaml"))


def cli(*args):
    try:
        main(list(args))
    except SystemExit as e:  # LightningCLI exits 0 on success in some versions
        if e.code not in (0, None):
            raise


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_config_is_covered():
    from diffinv.inversion import registry

    named = {(REPO / "configs" / c).read_text().split("class_path: diffinv.inversion.")[1].split()[0]
             for c in METHOD_CONFIGS + FLOW_CONFIGS}
    assert {m.cls.__name__ for m in registry.METHODS} <= named
    assert {"edit_p2p_replace.yaml", "edit_sdedit.yaml"} <= set(METHOD_CONFIGS)  # edit_with: their editors


EDIT_WITH = {"diffinv.editing.PromptToPrompt": "prompt_to_prompt", "diffinv.editing.SDEdit": "sdedit",
             "diffinv.editing.pie_bench.PieBenchP2P": "prompt_to_prompt", "diffinv.editing.FlowEdit": "flowedit"}
"""What metrics.jsonl's ``edit_with`` says of each editor a config may name (none: 'prompt')."""


@pytest.mark.parametrize("config", METHOD_CONFIGS)
def test_config_runs_through_the_cli(config, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    extra = ["--model.num_inner_steps", "2"] if subcommand(REPO / "configs" / config) == "fit" else []
    if "num_starts" in (REPO / "configs" / config).read_text():
        extra += ["--model.num_starts", "2"]
    cli(subcommand(REPO / "configs" / config), "-c", str(REPO / "configs" / config), "--model.backbone.pretrained",
        str(tiny_model_dir), "--model.num_inference_steps", "3", "--trainer.accelerator", "cpu", "--output_dir",
        str(out), *extra)
    lines = read_lines(out / "metrics.jsonl")
    examples = [json.loads(x) for x in (REPO / "src/diffinv/examples/captions.jsonl").read_text().splitlines()]
    assert len(lines) == sum(1 + len(e["target_prompts"]) for e in examples)
    text = (REPO / "configs" / config).read_text()
    edit_with = next((v for k, v in EDIT_WITH.items() if f"class_path: {k}" in text), "prompt")
    for line in lines:
        assert {"id", "method", "source_prompt", "target_prompt", "psnr", "ssim", "seconds", "image_path"} <= set(line)
        assert line["edit_with"] == (None if line["target_prompt"] is None else edit_with)
        assert (out / line["image_path"]).is_file()
        assert line["num_inference_steps"] == 3
    recon = [x for x in lines if x["target_prompt"] is None]
    assert len(recon) == len(examples)
    item = out / examples[0]["id"]
    assert {"source.png", "reconstruction.png", "edit-0.png", "inversion.safetensors"} <= {p.name for p in item.iterdir()}
    rec = Inversion.load(item / "inversion.safetensors")
    assert rec.num_steps == 3 and rec.source_prompt == examples[0]["source_prompt"]
    assert Image.open(item / "source.png").size == Image.open(item / "reconstruction.png").size


def test_contract_options_and_rerun_skips_finished_items(tiny_model_dir, tmp_path, capsys):
    Image.new("RGB", (20, 12), (200, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "captions.jsonl").write_text(
        json.dumps({"image": "red.png", "source_prompt": "a red car", "target_prompts": ["a blue car", "a green car"]})
        + "\n")
    out = tmp_path / "results"
    args = ["predict", "-c", str(REPO / "configs/npi.yaml"), "--model.backbone.pretrained", str(tiny_model_dir),
            "--data.manifest", str(tmp_path / "captions.jsonl"), "--output_dir", str(out),
            "--model.num_inference_steps", "2", "--trainer.accelerator", "cpu"]
    cli(*args)
    lines = read_lines(out / "metrics.jsonl")
    assert [x["target_prompt"] for x in lines] == [None, "a blue car", "a green car"]
    assert lines[0]["image_size"] == [16, 26]  # shorter side to the native 16: 12x20 -> 16x26.7 -> cropped to x2
    before = (out / "red" / "inversion.safetensors").stat().st_mtime_ns
    cli(*args)
    assert "skipping 1 item(s) already finished" in capsys.readouterr().out
    assert (out / "red" / "inversion.safetensors").stat().st_mtime_ns == before
    assert len(read_lines(out / "metrics.jsonl")) == 3


def test_interrupted_item_is_redone(tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    (out / ".shapes-0.partial").mkdir(parents=True)  # an item a killed run was building
    (out / ".shapes-0.partial" / "source.png").write_bytes(b"half")
    cli("predict", "-c", str(REPO / "configs/ddim.yaml"), "--model.backbone.pretrained", str(tiny_model_dir),
        "--model.num_inference_steps", "2", "--trainer.accelerator", "cpu", "--output_dir", str(out))
    assert (out / "shapes-0" / "inversion.safetensors").is_file()
    Image.open(out / "shapes-0" / "source.png")  # a real PNG
    assert not (out / ".shapes-0.partial").exists()


@pytest.mark.parametrize("extra, message", [
    (["--model.backbone.pretrained", "/no/such/model"], "model folder /no/such/model does not exist"),
    (["--data.image", "/no/such.png", "--data.source_prompt", "x"], "image /no/such.png does not exist"),
])
def test_bad_input_is_one_line_not_a_traceback(extra, message, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "diffinv.cli", "predict", "-c", str(REPO / "configs/npi.yaml"),
         "--output_dir", str(tmp_path / "o"), *extra],
        capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "diffinv: error: " in proc.stderr and message in proc.stderr
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_fit_logs_to_tensorboard_and_predict_re_edits_its_records(tiny_model_dir, tmp_path):
    out, again = tmp_path / "nti", tmp_path / "again"
    common = ["--model.backbone.pretrained", str(tiny_model_dir), "--model.num_inference_steps", "3",
              "--trainer.accelerator", "cpu"]
    cli("fit", "-c", str(REPO / "configs/null_text.yaml"), *common, "--model.num_inner_steps", "3", "--output_dir", str(out))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "lightning_logs").glob("version_*"))))
    events.Reload()
    tags = events.Tags()
    assert "shapes-0/step_loss" in tags["scalars"] and "shapes-0/inner_iterations" in tags["scalars"]
    assert len(events.Scalars("shapes-0/step_loss")) == 3
    assert "shapes-0/reconstruction" in tags["images"]
    first = read_lines(out / "metrics.jsonl")
    assert all(x["method"] == "null_text" and x["inner_iterations"] >= 0 for x in first)
    # a later predict edits the saved records without optimising again, and reproduces the reconstruction
    cli("predict", "-c", str(REPO / "configs/npi.yaml"), *common, "--data.records", str(out), "--output_dir", str(again))
    lines = read_lines(again / "metrics.jsonl")
    assert [x["target_prompt"] for x in lines] == [x["target_prompt"] for x in first]
    assert all(x["method"] == "null_text" and x["editor"] == "npi" for x in lines)
    assert [x["edit_with"] for x in lines] == [None if x["target_prompt"] is None else "prompt" for x in lines]
    import numpy as np

    for x in first:
        a = np.asarray(Image.open(out / x["image_path"]))
        b = np.asarray(Image.open(again / x["image_path"]))
        assert np.array_equal(a, b), x["image_path"]


def test_predict_refuses_to_optimise(tiny_model_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "diffinv.cli", "predict", "-c", str(REPO / "configs/null_text.yaml"),
         "--model.backbone.pretrained", str(tiny_model_dir), "--output_dir", str(tmp_path / "o")],
        capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2 and "run it with `diffinv fit`" in proc.stderr and "Traceback" not in proc.stderr


def test_mismatched_replace_prompts_fail_before_anything_is_written(tiny_model_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "diffinv.cli", "predict", "-c", str(REPO / "configs/edit_p2p_replace.yaml"),
         "--model.backbone.pretrained", str(tiny_model_dir), "--output_dir", str(tmp_path / "o"),
         "--data.image", str(REPO / "src/diffinv/examples/shapes-0.png"), "--data.source_prompt", "a red car",
         "--data.target_prompts", '["a blue car", "a big blue car"]'],
        capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "source 'a red car' has 3 words, target 'a big blue car' has 4" in proc.stderr
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_progress_bar_reports_images_per_second(tiny_model_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "diffinv.cli", "predict", "-c", str(REPO / "configs/npi.yaml"),
         "--model.backbone.pretrained", str(tiny_model_dir), "--model.num_inference_steps", "2",
         "--data.batch_size", "2", "--output_dir", str(tmp_path / "o")],
        capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0
    shown = proc.stdout + proc.stderr
    assert "images=3" in shown and "images/s=" in shown and "<00:00" in shown  # done, rate, ETA


def test_the_command_s_modules_import_one_another_in_no_circle():
    """cli routes to run, bench and app.ui; bench runs through run; nothing imports cli back (imports inside
    functions included)."""
    import ast

    src = REPO / "src" / "diffinv"
    files = {"cli": "cli.py", "run": "run.py", "bench": "bench.py", "app.ui": "app/ui.py",
             "lightning_cli": "lightning_cli.py"}
    imports = {}
    for name, path in files.items():
        package = "diffinv" + ("." + name.rpartition(".")[0] if "." in name else "")
        found = set()
        for node in ast.walk(ast.parse((src / path).read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                found |= {module, *(f"{module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        imports[name] = {other for other in files if other != name and f"diffinv.{other}" in found}
    assert imports == {"cli": {"run", "bench", "app.ui"}, "run": {"lightning_cli"}, "bench": {"run"}, "app.ui": set(),
                       "lightning_cli": set()}
