"""Dataset-scale runs: DDP over 2 CPU processes (gloo) with every item exactly once, and resuming after kill -9."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
ENV = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}


def manifest(tmp_path: Path, n: int) -> Path:
    rows = [{"image": str(REPO / f"src/diffinv/examples/shapes-{i % 3}.png"), "source_prompt": "a red car",
             "target_prompts": ["a blue car"], "id": f"item{i}"} for i in range(n)]
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def command(sub, config, model, data, out, *extra):
    return [sys.executable, "-m", "diffinv.cli", sub, "-c", str(REPO / "configs" / config),
            "--model.backbone.pretrained", str(model), "--model.num_inference_steps", "3", "--data.manifest", str(data),
            "--data.batch_size", "1", "--trainer.accelerator", "cpu", "--output_dir", str(out), *extra]


def ids(out: Path) -> Counter:
    return Counter(json.loads(x)["id"] for x in (out / "metrics.jsonl").read_text().splitlines())


@pytest.mark.parametrize("sub, config, extra", [
    ("predict", "npi.yaml", []),
    ("fit", "null_text.yaml", ["--model.num_inner_steps", "2"]),
])
def test_ddp_two_processes_each_item_exactly_once(tiny_model_dir, tmp_path, sub, config, extra):
    out = tmp_path / "out"
    proc = subprocess.run(command(sub, config, tiny_model_dir, manifest(tmp_path, 5), out, "--trainer.devices", "2",
                                  "--trainer.strategy", "ddp", *extra),
                          capture_output=True, text=True, env=ENV, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ids(out) == Counter({f"item{i}": 2 for i in range(5)})  # reconstruction + one edit, once each
    assert "wrote 5 item(s)" in proc.stdout
    assert all((out / f"item{i}" / "inversion.safetensors").is_file() for i in range(5))


def test_resume_after_kill_9(tiny_model_dir, tmp_path):
    out, data = tmp_path / "out", manifest(tmp_path, 8)
    cmd = command("predict", "npi.yaml", tiny_model_dir, data, out, "--model.num_inference_steps", "25")
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*/inversion.safetensors")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.parent.name for p in out.glob("*/inversion.safetensors")}
    assert 1 <= len(done_before) < 8, "the kill should land part-way"
    mtimes = {d: (out / d / "inversion.safetensors").stat().st_mtime_ns for d in done_before}
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"skipping {len(done_before)} item(s) already finished" in rerun.stdout
    assert all((out / d / "inversion.safetensors").stat().st_mtime_ns == t for d, t in mtimes.items())  # kept
    assert ids(out) == Counter({f"item{i}": 2 for i in range(8)})
    assert not list(out.glob(".*.partial"))
