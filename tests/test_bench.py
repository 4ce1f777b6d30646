"""`diffinv bench`: every bench config through the real command on tiny components; the aggregation."""

import csv
import json
import math
from pathlib import Path

import pytest

from diffinv.bench import Run, aggregate, mean_ci
from diffinv.cli import main

REPO = Path(__file__).resolve().parents[1]
BENCH_CONFIGS = sorted(p.name for p in (REPO / "configs").glob("bench_*.yaml"))


def test_every_bench_config_is_covered():
    assert BENCH_CONFIGS == ["bench_editing.yaml", "bench_reconstruction.yaml", "bench_robustness.yaml", "bench_steps.yaml"]


@pytest.mark.parametrize("config", BENCH_CONFIGS)
def test_bench_config_runs_and_reports(config, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # any folder: the configs' repository paths are found beside them
    out = tmp_path / "bench"
    args = ("[--data.manifest, src/diffinv/examples/bench/captions.jsonl, --data.limit, '3', --data.batch_size, '3', "
            f"--model.backbone.pretrained, {tiny_model_dir}, --writer.lpips, '[alex]']")
    steps = ["--steps", "[2, 3]"] if config == "bench_steps.yaml" else ["--steps", "[2]"]
    # robustness: 30 runs; one per method, covering every perturbation, keeps the test short
    robustness = ["DDIB (clean)", "CycleDiffusion (noise 5)", "NPI (synonym)", "NTI (word dropped)", "latent-TOP (noise 20)"]
    extra = {"bench_reconstruction.yaml": [], "bench_steps.yaml": [], "bench_editing.yaml": [],
             "bench_robustness.yaml": ["--only", str(robustness)]}[config]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    main(["bench", "-c", str(REPO / "configs" / config), "--output_dir", str(out), "--args", args, *steps, *extra])
    rows = list(csv.DictReader(open(out / "results.csv")))
    labels = {r["label"] for r in rows}
    assert len(labels) >= 3
    table = (out / "results.md").read_text()
    assert table.startswith("| method | steps | n |") and "±" in table
    lpips = [r for r in rows if r["metric"] == "lpips_alex"]
    assert lpips and all(r["n"] == "0" and int(r["unavailable"]) > 0 for r in lpips)  # no torchvision here
    assert "unavailable" in table
    assert (out / "psnr.png").is_file() and (out / "seconds.png").is_file()
    assert not (out / "lpips_alex.png").exists()  # no empty plot for a metric without values
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    psnr = [r for r in rows if r["metric"] == "psnr"]
    assert all(int(r["n"]) == 3 for r in psnr)  # --data.limit 3: three items per run
    if config == "bench_editing.yaml":
        assert {r["metric"] for r in rows} >= {"shapes_edit_accuracy", "shapes_others_kept"}
    if config == "bench_steps.yaml":
        assert {r["steps"] for r in psnr} == {"2", "3"}
    if config == "bench_robustness.yaml":
        assert labels == set(robustness)
        lines = [json.loads(x) for x in (out / "NPI (synonym)" / "steps-2" / "metrics.jsonl").read_text().splitlines()]
        assert any(x.get("caption_before_perturbation") for x in lines)
        lines = [json.loads(x) for x in (out / "latent-TOP (noise 20)" / "steps-2" / "metrics.jsonl").read_text().splitlines()]
        assert all(x["pixel_noise"] == 20 for x in lines)


def test_mean_ci_counts_non_finite_values_and_never_averages_them():
    m, ci, n, bad = mean_ci([1.0, 3.0, math.inf, float("nan")])
    assert (m, n, bad) == (2.0, 2, 2) and abs(ci - 1.96 * math.sqrt(2) / math.sqrt(2)) < 1e-9
    assert math.isnan(mean_ci([])[0])


def test_null_metrics_are_counted_not_finite_and_never_averaged(tmp_path):
    """metrics.jsonl writes a PSNR inf (identical images) as null; the table counts it as not finite, and a
    column with no finite value says so."""
    from diffinv.output import append_lines

    run_dir = tmp_path / "m" / "steps-default"
    run_dir.mkdir(parents=True)
    lines = [{"id": f"i{k}", "kind": "reconstruction", "image_path": f"i{k}/reconstruction.png", "psnr": psnr,
              "ssim": math.nan, "num_inference_steps": 5} for k, psnr in enumerate(["inf", 20.0, 30.0])]
    append_lines(run_dir, lines)
    rows = {r["metric"]: r for r in aggregate(tmp_path, [Run("m", "x.yaml")], [None], "reconstruction")}
    assert (rows["psnr"]["mean"], rows["psnr"]["n"], rows["psnr"]["not_finite"]) == (25.0, 2, 1)
    assert (rows["ssim"]["n"], rows["ssim"]["not_finite"]) == (0, 3)


def test_a_failing_run_stops_the_bench_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as e:
        main(["bench", "-c", str(REPO / "configs/bench_reconstruction.yaml"), "--output_dir", str(tmp_path),
              "--args", "[--model.backbone.pretrained, /no/such/model]"])
    assert e.value.code == 2
    assert "benchmark run 'DDIM+CFG' at 50 steps failed" in capsys.readouterr().err
