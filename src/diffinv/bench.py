"""``diffinv bench -c configs/bench_*.yaml``: run several diffinv configs over one dataset, then tables and plots.

Each run is a real ``diffinv fit`` or ``diffinv predict`` (whichever its method needs), writing to
``OUTPUT_DIR/<label>/steps-<N>/``, so resuming (finished items are skipped) works per run exactly as for a single
run. Runs share the bench's interpreter (imports paid once); a run with its own processes (DDP:
``--args '[--trainer.strategy, ddp, --trainer.devices, 2]'``) gets a fresh one. Then every run's
``metrics.jsonl`` is aggregated:

* ``results.csv``: one row per run and metric: mean, 95% confidence half-width (1.96 s / sqrt(n), normal
  approximation), n (finite values), and how many values were not finite (``null`` in metrics.jsonl, e.g. the
  PSNR inf of a perfect reconstruction: never averaged silently);
* ``results.md``: the table (mean ± CI), "unavailable" for metrics that could not be computed;
* ``<metric>.png``: bars per method (one step count) or lines over the step counts (a sweep); none for a
  metric without a single value (an unavailable LPIPS, say);
* ``tensorboard/``: the same means as scalars (``<table>/<metric>/<label>`` at step = N).

``table: pie_bench`` is PIE-Bench's table (Ju et al. 2024, Table 1) in its columns and units
(:data:`diffinv.metrics.PIE_BENCH_COLUMNS`: structure distance x10^3, background PSNR, LPIPS x10^3, MSE x10^4,
SSIM x10^2, CLIP whole and edited), measured as its evaluation code measures them: on each edit's 8-bit PNG against
the run's ``source.png``, with the item's mask from the ``mapping_file.json`` of the runs' ``--data.pie_bench``.
``results.csv`` / ``results.md`` hold the overall table (values in those units; the CI is ours, the paper gives
means), ``results_by_type.csv`` / ``results_by_type.md`` the same per editing type (their 10, from
``editing_type_id``).
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import DiffinvError
from .metrics import DINO_MODEL, PIE_BENCH_CLIP, PIE_BENCH_COLUMNS
from .output import NAME_MAX, resolve_output_dir

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TABLE_METRICS = {
    "reconstruction": ["psnr", "ssim", "mse", "lpips_alex", "lpips_vgg", "seconds"],
    "editing": ["shapes_edit_accuracy", "shapes_others_kept", "clip_score", "psnr", "ssim", "lpips_alex", "lpips_vgg",
                "psnr_unedited", "ssim_unedited", "lpips_alex_unedited", "clip_score_edited", "seconds"],
    "pie_bench": list(PIE_BENCH_COLUMNS),
}
HEADINGS = {metric: heading for metric, (heading, _) in PIE_BENCH_COLUMNS.items()}
"""Column headings of results.md where they differ from the metric's name (PIE-Bench's, with their units)."""


@dataclass
class Run:
    """One method of a benchmark."""

    label: str
    """Name in tables and plots."""
    config: str
    """A diffinv config: a path, or a file name in the repository's configs/."""
    args: list[str] = field(default_factory=list)
    """Extra command-line options for this run."""


REPORT_NAMES = ("results.csv", "results.md", "results_by_type.csv", "results_by_type.md", "tensorboard",
                *(f"{m}.png" for ms in TABLE_METRICS.values() for m in ms))
"""What the bench writes beside the runs' folders in its --output_dir (no run label may take one of these)."""


def check_plan(runs: list[Run], steps: list[int] | None) -> None:
    """Before any run, in one line: every step count is positive, every label is a plain folder name of its own
    (no '/', no leading '.', not one of :data:`REPORT_NAMES`) and no two runs share one."""
    if steps is not None and any(n < 1 for n in steps):
        raise DiffinvError(f"--steps must be positive step counts, got {steps}: give e.g. [10, 20, 50], or leave it "
                           "out for each config's own")
    for run in runs:
        check_label(run.label)
    counts = Counter(run.label for run in runs)
    twice = next((label for label, n in counts.items() if n > 1), None)
    if twice is not None:
        raise DiffinvError(f"run label {twice!r} is given to {counts[twice]} runs: each run needs a label of its own "
                           "(it names the run's folder and its row of the table)")


def check_label(label: str) -> None:
    """A run label names its folder under the bench's --output_dir: a plain name that stays inside it."""
    if (not label.strip() or label.startswith(".") or any(c in label for c in "/\\\0")
            or len(label.encode()) > NAME_MAX):
        raise DiffinvError(f"run label {label!r} must be a plain name (not empty, no '/' or '\\', not starting with "
                           f"'.', at most {NAME_MAX} bytes): it names the run's folder inside --output_dir")
    if label.casefold() in {n.casefold() for n in REPORT_NAMES}:
        raise DiffinvError(f"run label {label!r} is a name the bench writes in --output_dir (results.csv, results.md, "
                           "tensorboard, <metric>.png): choose another")


PATH_OPTIONS = ("-c", "--config", "--data.manifest", "--data.image", "--data.records", "--data.pie_bench",
                "--data.coco_captions", "--data.coco_images", "--model.backbone.pretrained")
"""Options of a run whose relative values a bench config may write from its own place (see :func:`locate`)."""


def locate(path: str, bases: list[Path]) -> Path | None:
    """A relative path of a bench config, as the user's current folder sees it, else as one of ``bases`` does
    (the bench config's folder and the one above it: the repository root for configs/bench_*.yaml), so that
    ``diffinv bench -c /somewhere/configs/bench_x.yaml`` works from any folder. None: found nowhere."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p if p.exists() else None
    return next((b / p for b in bases if (b / p).exists()), None)


def _config_path(config: str, bases: list[Path] = ()) -> Path:
    path = locate(config, [*bases, REPO_CONFIGS.parent])
    if path is not None and path.is_file():
        return path
    if (REPO_CONFIGS / config).is_file():
        return REPO_CONFIGS / config
    raise DiffinvError(f"benchmark run config {config} not found (not a file here, beside the bench config, nor "
                       f"in {REPO_CONFIGS})")


def resolve_args(args: list[str], bases: list[Path]) -> list[str]:
    """``args`` with the relative values of :data:`PATH_OPTIONS` located as :func:`locate` does (kept as given
    where found nowhere: the run then reports them)."""
    out = list(args)
    for k, a in enumerate(out):
        name, eq, value = a.partition("=")
        if eq and name in PATH_OPTIONS:
            found = locate(value, bases)
            out[k] = f"{name}={found}" if found is not None else a
        elif a in PATH_OPTIONS and k + 1 < len(out):
            found = locate(out[k + 1], bases)
            if found is not None and not Path(out[k + 1]).exists():
                out[k + 1] = str(found)
    return out


def subcommand_for(config: Path) -> str:
    """`fit` for a config whose method optimises per image, `predict` for the others, as the method's line of
    :mod:`diffinv.inversion.registry` says."""
    import importlib

    import yaml

    from .inversion import registry

    try:
        path = yaml.safe_load(config.read_text())["model"]["class_path"]
        module, name = path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
    except Exception as e:  # noqa: BLE001
        raise DiffinvError(f"{config}: cannot read its model class ({e})") from None
    try:
        return registry.by_class(cls).run
    except DiffinvError as e:
        raise DiffinvError(f"{config}: {e}") from None


def mean_ci(values: list[float]) -> tuple[float, float, int, int]:
    """(mean, 95% half-width, n finite, n not finite)."""
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    bad = len(values) - len(finite)
    if not finite:
        return float("nan"), float("nan"), 0, bad
    m = sum(finite) / len(finite)
    if len(finite) < 2:
        return m, float("nan"), len(finite), bad
    sd = math.sqrt(sum((v - m) ** 2 for v in finite) / (len(finite) - 1))
    return m, 1.96 * sd / math.sqrt(len(finite)), len(finite), bad


def metric_value(value: float | str | None) -> float:
    """A measured value of a metrics.jsonl line as a number: null (not finite, e.g. the PSNR of identical images:
    :func:`diffinv.output.json_line`) as NaN, which :func:`mean_ci` counts as not finite; older files' "inf" and
    "nan" strings as those numbers."""
    return math.nan if value is None else float(value)


def shapes_edit_scores(line: dict, run_dir: Path) -> dict:
    """On the shapes world, the attribute classifier's verdict on an edit: the attributes the target prompt
    changed are read back (edit accuracy), the others unchanged (kept). Empty for other prompts."""
    from .shapes.world import parse_caption

    try:
        source, target = parse_caption(line["source_prompt"]), parse_caption(line["target_prompt"])
    except (ValueError, TypeError):
        return {}
    import numpy as np
    from PIL import Image

    from .shapes.classifier import classify

    read = classify(np.asarray(Image.open(run_dir / line["image_path"]).convert("RGB")))
    changed = [k for k in target if target[k] != source[k]]
    return {"shapes_edit_accuracy": float(all(read[k] == target[k] for k in changed)),
            "shapes_others_kept": float(all(read[k] == target[k] for k in target if k not in changed))}


def _run_lines(output_dir: Path, run: Run, steps: list[int | None]):
    """(step count, run folder, its metrics.jsonl lines) of each step count the run finished."""
    for n in steps:
        run_dir = output_dir / run.label / f"steps-{n or 'default'}"
        index = run_dir / "metrics.jsonl"
        if index.is_file():
            yield n, run_dir, [json.loads(x) for x in index.read_text().splitlines() if x.strip()]


def aggregate(output_dir: Path, runs: list[Run], steps: list[int | None], table: str) -> list[dict]:
    kind = "reconstruction" if table == "reconstruction" else "edit"
    rows = []
    for run in runs:
        for n, run_dir, lines in _run_lines(output_dir, run, steps):
            lines = [x | shapes_edit_scores(x, run_dir) if kind == "edit" else x for x in lines if x["kind"] == kind]
            for metric in TABLE_METRICS[table]:
                values = [x.get(metric) for x in lines if metric in x]
                if not values:
                    continue
                rows.append(summary(values, label=run.label, metric=metric,
                                    steps=n if n is not None else lines[0]["num_inference_steps"]))
    return rows


def fmt(r: dict | None) -> str:
    """A table cell: mean ± 95% CI, or why there is no number."""
    if r is None:
        return ""
    if r["n"] == 0:  # no finite value: every one was unavailable, or not finite (null: a PSNR inf, say)
        return "unavailable" if r["unavailable"] else "not finite"
    text = f"{r['mean']:.3f}" + ("" if math.isnan(r["ci95"]) else f" ± {r['ci95']:.3f}")
    return text + (f" ({r['not_finite']} not finite)" if r["not_finite"] else "")


def summary(values: list, **key) -> dict:
    """One row of results.csv: ``key`` (label, steps, metric, ...) and the statistics of ``values``, where
    "unavailable" is counted apart and null (not finite) as NaN."""
    numbers = [metric_value(v) for v in values if v != "unavailable"]
    m, ci, count, bad = mean_ci(numbers)
    return key | {"mean": m, "ci95": ci, "n": count, "not_finite": bad, "unavailable": len(values) - len(numbers)}


def option_value(argv: list[str], name: str) -> str | None:
    """The value of option ``name`` in command-line arguments (``--x v`` or ``--x=v``; the last one counts)."""
    value = None
    for k, a in enumerate(argv):
        if a == name and k + 1 < len(argv):
            value = argv[k + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def read_pixels(path: Path):
    """(3, H, W) uint8 RGB tensor of an image file (as PIE-Bench's evaluation opens it: PIL, 8 bits)."""
    import numpy as np
    import torch
    from PIL import Image

    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).contiguous()


def pie_bench_item(run_dir: Path, line: dict, entry: dict, clip_model: str | None, dino_model: str) -> dict:
    """PIE-Bench's metrics of one edit line of a run (raw units), its mask from its mapping ``entry``, resized to
    the image with nearest neighbours where the model's size is not PIE-Bench's 512."""
    import torch

    from .data.sources import pie_bench_mask
    from .metrics import pie_bench_scores

    source = read_pixels(run_dir / line["id"] / "source.png")
    edited = read_pixels(run_dir / line["image_path"])
    mask = torch.from_numpy(pie_bench_mask(entry.get("mask") or []))
    if tuple(mask.shape) != tuple(edited.shape[-2:]):
        mask = torch.nn.functional.interpolate(mask[None, None].float(), size=tuple(edited.shape[-2:]),
                                               mode="nearest")[0, 0] > 0.5
    return pie_bench_scores(source, edited, mask, line["target_prompt"], clip_model, dino_model)


def aggregate_pie_bench(output_dir: Path, runs: list[Run], steps: list[int | None], roots: dict[str, Path],
                        clip_model: str | None = PIE_BENCH_CLIP,
                        dino_model: str = DINO_MODEL) -> tuple[list[dict], list[dict]]:
    """(overall rows, per-editing-type rows) of PIE-Bench's table, each value scaled to the paper's units
    (:data:`~diffinv.metrics.PIE_BENCH_COLUMNS`). ``roots``: each run label's PIE-Bench folder."""
    from .data.sources import PIE_BENCH_TYPES, pie_bench_annotations

    overall, by_type = [], []
    for run in runs:
        if run.label not in roots:
            continue
        entries = pie_bench_annotations(roots[run.label])
        for n, run_dir, lines in _run_lines(output_dir, run, steps):
            edits = [x for x in lines if x["kind"] == "edit" and x["id"] in entries]
            if not edits:
                continue
            scored = [(str(entries[x["id"]].get("editing_type_id", "")),
                       pie_bench_item(run_dir, x, entries[x["id"]], clip_model, dino_model)) for x in edits]
            step = n if n is not None else edits[0]["num_inference_steps"]
            types = sorted({t for t, _ in scored}, key=lambda t: (not t.isdigit(), int(t) if t.isdigit() else 0, t))
            for metric, (_, factor) in PIE_BENCH_COLUMNS.items():
                scale = lambda v: v if v == "unavailable" else v * factor  # noqa: E731
                overall.append(summary([scale(s[metric]) for _, s in scored if metric in s], label=run.label,
                                       steps=step, metric=metric))
                for t in types:
                    values = [scale(s[metric]) for tt, s in scored if tt == t and metric in s]
                    by_type.append(summary(values, label=run.label, steps=step, editing_type_id=t,
                                           editing_type=PIE_BENCH_TYPES.get(t, t), metric=metric))
    return [r for r in overall if r["n"] + r["not_finite"] + r["unavailable"]], by_type


def write_type_table(output_dir: Path, rows: list[dict]) -> None:
    """results_by_type.csv and .md: PIE-Bench's table per editing type (a block of rows per type)."""
    fields = ["label", "steps", "editing_type_id", "editing_type", "metric", "mean", "ci95", "n", "not_finite",
              "unavailable"]
    with open(output_dir / "results_by_type.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    metrics = [m for m in PIE_BENCH_COLUMNS if any(r["metric"] == m for r in rows)]
    keys = list(dict.fromkeys((r["editing_type_id"], r["label"], r["steps"]) for r in rows))
    keys.sort(key=lambda k: (not k[0].isdigit(), int(k[0]) if k[0].isdigit() else 0, k[0]))
    cell = {(r["editing_type_id"], r["label"], r["steps"], r["metric"]): r for r in rows}
    lines = ["| editing type | method | steps | n | " + " | ".join(HEADINGS[m] for m in metrics) + " |",
             "|---|---|---|---|" + "---|" * len(metrics)]
    for t, label, n in keys:
        present = [cell[(t, label, n, m)] for m in metrics if (t, label, n, m) in cell]
        count = max(r["n"] + r["not_finite"] + r["unavailable"] for r in present)
        name = present[0]["editing_type"]
        lines.append(f"| {t} {name} | {label} | {n} | {count} | "
                     + " | ".join(fmt(cell.get((t, label, n, m))) for m in metrics) + " |")
    (output_dir / "results_by_type.md").write_text("\n".join(lines) + "\n")


def write_reports(output_dir: Path, rows: list[dict], table: str) -> None:
    with open(output_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["label", "steps", "metric", "mean", "ci95", "n", "not_finite", "unavailable"])
        writer.writeheader()
        writer.writerows(rows)
    metrics = [m for m in TABLE_METRICS[table] if any(r["metric"] == m for r in rows)]
    keys = list(dict.fromkeys((r["label"], r["steps"]) for r in rows))
    cell = {(r["label"], r["steps"], r["metric"]): r for r in rows}
    lines = ["| method | steps | n | " + " | ".join(HEADINGS.get(m, m) for m in metrics) + " |",
             "|---|---|---|" + "---|" * len(metrics)]
    for label, n in keys:
        count = max(cell[(label, n, m)]["n"] + cell[(label, n, m)]["unavailable"] for m in metrics if (label, n, m) in cell)
        lines.append(f"| {label} | {n} | {count} | " + " | ".join(fmt(cell.get((label, n, m))) for m in metrics) + " |")
    (output_dir / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(label for label, _ in keys))
    sweep = len({n for _, n in keys}) > 1
    for metric in metrics:
        if not any(r["n"] for (_, _, m), r in cell.items() if m == metric):
            continue  # nothing to draw: an empty plot would only hide that the metric is unavailable
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for i, label in enumerate(labels):
            pts = sorted((n, cell[(label, n, metric)]) for l2, n in keys if l2 == label and (label, n, metric) in cell)
            pts = [(n, r) for n, r in pts if r["n"]]
            if not pts:
                continue
            xs, ys = [n for n, _ in pts], [r["mean"] for _, r in pts]
            err = [0 if math.isnan(r["ci95"]) else r["ci95"] for _, r in pts]
            if sweep:
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
            else:
                ax.bar(i, ys[0], yerr=err[0], capsize=3, label=label)
        if sweep:
            ax.set_xlabel("sampling steps")
            ax.set_xscale("log")
            ax.set_xticks(sorted({n for _, n in keys}))
            ax.set_xticklabels([str(n) for n in sorted({n for _, n in keys})])
        else:
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=20)
        ax.set_ylabel(metric)
        ax.set_title(f"{table}: {metric} (mean ± 95% CI)")
        if sweep:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(output_dir / f"{metric}.png", dpi=100)
        plt.close(fig)

    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(output_dir / "tensorboard")) as tb:
        for r in rows:
            if r["n"]:
                tb.add_scalar(f"{table}/{r['metric']}/{r['label']}", r["mean"], r["steps"])


def _needs_own_processes(argv: list[str]) -> bool:
    """A run that launches several processes (DDP, several devices) gets a fresh interpreter of its own."""
    text = " ".join(argv)
    devices = next((argv[k + 1] for k, a in enumerate(argv[:-1]) if a == "--trainer.devices"), "1")
    return "--trainer.strategy" in text or "--trainer.num_nodes" in text or devices not in ("1", "auto")


def run_one(argv: list[str]) -> int:
    """One run of a benchmark (``diffinv fit|predict ...`` arguments): in this interpreter, so the ~5 s of
    importing torch and Lightning are paid once per benchmark, not once per run; in a fresh one where the run
    launches processes of its own. Returns its exit status."""
    if _needs_own_processes(argv):
        return subprocess.run([sys.executable, "-m", "diffinv.run", *argv]).returncode
    from .run import run_lightning

    try:
        return run_lightning(argv)
    except SystemExit as e:  # Lightning's own exits (its parser's)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


def run_bench(runs: list[Run], output_dir: str, steps: list[int] | None = None,
              table: Literal["reconstruction", "editing", "pie_bench"] = "reconstruction",
              args: list[str] | None = None, only: list[str] | None = None, base: str | None = None,
              clip_model: str | None = PIE_BENCH_CLIP, dino_model: str = DINO_MODEL) -> list[dict]:
    """Run every (run, step count), then aggregate (see the module docstring).

    Args:
        runs: The methods (label, config, extra options).
        output_dir: Where each run writes (OUTPUT_DIR/<label>/steps-<N>/) and the reports go.
        steps: Step counts to run each method at; none: each config's own.
        table: Which metrics the report shows; 'pie_bench': PIE-Bench's table, overall and per editing type
            (every run needs --data.pie_bench among its arguments).
        args: Extra command-line options for every run (e.g. another model or data set).
        only: Run only the runs with these labels (e.g. to redo a few after deleting their folders); the report
            still covers every run whose results are in ``output_dir``.
        base: The bench config's folder: relative paths of runs and args not found from the current folder are
            looked up there and one folder above (set from ``-c``).
        clip_model: The pie_bench table's CLIP (PIE-Bench: openai/clip-vit-large-patch14): a hub id in the local
            cache or a folder; none: no CLIP columns.
        dino_model: The pie_bench table's structure-distance network (PIE-Bench: DINO ViT-B/8): a hub id in the
            local cache or a folder of a transformers ViT.
    """
    bases = [Path(base), Path(base).parent] if base else []
    out = resolve_output_dir(output_dir)
    check_plan(runs, steps)
    if only:
        unknown = sorted(set(only) - {r.label for r in runs})
        if unknown:
            raise DiffinvError(f"--only names no run of this benchmark: {', '.join(unknown)}")
    out.mkdir(parents=True, exist_ok=True)
    roots = {}
    if table == "pie_bench":
        for run in runs:
            root = option_value(resolve_args([*(args or []), *run.args], bases), "--data.pie_bench")
            if root is None:
                raise DiffinvError(f"table pie_bench: run {run.label!r} has no --data.pie_bench (give PIE-Bench's "
                                   "folder in the bench's args or the run's)")
            roots[run.label] = Path(root)
    plan = [(run, n) for run in runs if not only or run.label in only for n in (steps or [None])]
    started = time.perf_counter()
    for k, (run, n) in enumerate(plan):
        config = _config_path(run.config, bases)
        run_dir = out / run.label / f"steps-{n or 'default'}"
        cmd = [sys.executable, "-m", "diffinv.run", subcommand_for(config), "-c", str(config), "--output_dir", str(run_dir),
               *(["--model.num_inference_steps", str(n)] if n else []), *resolve_args([*(args or []), *run.args], bases)]
        elapsed = time.perf_counter() - started
        eta = f", about {elapsed / k * (len(plan) - k):.0f} s left" if k else ""
        print(f"diffinv bench: [{k + 1}/{len(plan)}] {run.label}" + (f", {n} steps" if n else "") +
              f" ({elapsed:.0f} s elapsed{eta})", flush=True)
        returncode = run_one(cmd[3:])
        if returncode != 0:
            raise DiffinvError(f"benchmark run {run.label!r}" + (f" at {n} steps" if n else "") +
                               f" failed (exit {returncode}); its command: {' '.join(cmd)}")
    if table == "pie_bench":
        rows, by_type = aggregate_pie_bench(out, runs, steps or [None], roots, clip_model, dino_model)
    else:
        rows, by_type = aggregate(out, runs, steps or [None], table), []
    if not rows:
        raise DiffinvError(f"no results to aggregate in {out}")
    write_reports(out, rows, table)
    if by_type:
        write_type_table(out, by_type)
    print((out / "results.md").read_text())
    if by_type:
        print((out / "results_by_type.md").read_text())
    print(f"diffinv bench: wrote {out / 'results.csv'}, {out / 'results.md'}, "
          + (f"{out / 'results_by_type.md'}, " if by_type else "") + f"plots and {out / 'tensorboard'}")
    return rows


def main(argv: list[str]) -> None:
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="diffinv bench", description="Run a benchmark config: several diffinv runs, one table.")
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="A configs/bench_*.yaml.")
    parser.add_function_arguments(run_bench, as_positional=False)
    cfg = parser.parse_args(argv)
    cfg.pop("config", None)
    init = parser.instantiate_classes(cfg)
    configs = [v for flag, v in zip(argv, argv[1:]) if flag in ("-c", "--config")]
    base = str(Path(configs[-1]).expanduser().resolve().parent) if configs else None
    run_bench(**{k: init[k] for k in ("runs", "output_dir", "steps", "table", "args", "only", "clip_model",
                                      "dino_model")},
              base=init.get("base") or base)
