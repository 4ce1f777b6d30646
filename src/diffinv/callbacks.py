"""The Lightning callbacks of a run: the writer of each finished item (layout and rules: :mod:`diffinv.output`),
and the progress bar."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar

from . import output
from .editing.editor import Editor
from .inversion.result import ItemResult
from .metrics import clip_score, lpips, masked, mse, psnr, ssim


def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "nan")


@dataclass
class MetricSettings:
    """Optional metrics of the writer (PSNR, SSIM and MSE are always computed)."""

    lpips: tuple[str, ...] = ()
    clip_model: str | None = None


def _edit_mask(r: ItemResult, shape: tuple[int, int]) -> torch.Tensor | None:
    rle = r.meta.get("mask_rle")
    if not rle:
        return None
    from .data import pie_bench_mask

    mask = torch.from_numpy(pie_bench_mask(rle)).float()[None, None]
    return torch.nn.functional.interpolate(mask, size=shape, mode="nearest")[0, 0] > 0.5


def image_metrics(img, r: ItemResult, prompt: str, settings: MetricSettings,
                  edit_mask: torch.Tensor | None = None) -> dict:
    out = {"psnr": _finite(psnr(img, r.source)), "ssim": ssim(img, r.source), "mse": mse(img, r.source)}
    for net in settings.lpips:
        out[f"lpips_{net}"] = lpips(img, r.source, net)
    if settings.clip_model:
        out["clip_score"] = clip_score(img, prompt, settings.clip_model)
    if edit_mask is not None:
        keep = ~edit_mask
        a, b = masked(img, keep), masked(r.source, keep)
        out |= {"psnr_unedited": _finite(psnr(a, b)), "ssim_unedited": ssim(a, b), "mse_unedited": mse(a, b)}
        for net in settings.lpips:
            out[f"lpips_{net}_unedited"] = lpips(a, b, net)
        if settings.clip_model:
            out["clip_score_edited"] = clip_score(masked(img, edit_mask), prompt, settings.clip_model)
    return out


def metric_lines(r: ItemResult, method: str, model: str, guidance: float,
                 settings: MetricSettings | None = None, edit_with: str = "prompt") -> list[dict]:
    """One line per image of the item: ``method`` the method that sampled (the ``editor`` field: it differs from
    the record's ``method`` when saved records are edited), ``edit_with`` the editor of the edits (an editor's
    ``edit_name``: 'prompt', 'prompt_to_prompt', 'sdedit'; null on the reconstruction's line)."""
    settings = settings or MetricSettings()
    n = 1 + len(r.edits)
    seconds = r.seconds_inversion + r.seconds_sampling
    edit_mask = _edit_mask(r, tuple(r.source.shape[-2:]))  # decoded once per item
    lines = []
    for img, target, name in (
        [(r.reconstruction, None, "reconstruction.png")]
        + [(e, t, f"edit-{i}.png") for i, (e, t) in enumerate(zip(r.edits, r.target_prompts))]
    ):
        measured = {
            "id": r.id,
            "method": r.inversion.method,
            "editor": method,
            "edit_with": None if target is None else edit_with,
            "model": model,
            "kind": "reconstruction" if target is None else "edit",
            "source_prompt": r.inversion.source_prompt,
            "target_prompt": target,
            **image_metrics(img, r, target or r.inversion.source_prompt, settings, edit_mask),
            "seconds": seconds,
            "seconds_inversion": r.seconds_inversion,
            "seconds_sampling": r.seconds_sampling,
            "seconds_sampling_per_image": r.seconds_sampling / n,
            "num_inference_steps": r.inversion.num_steps,
            "guidance_scale": guidance,
            "image_size": list(img.shape[-2:]),
            "image_path": f"{r.id}/{name}",
            **r.extra,
        }
        lines.append(measured | annotations(r.meta, measured))
    return lines


def annotations(meta: dict, measured: dict) -> dict:
    """The item's dataset annotations to carry into its lines: never one named like a measured field (a manifest
    refuses those up front, :func:`diffinv.output.is_line_field`), nor PIE-Bench's mask (used, not copied)."""
    return {k: v for k, v in meta.items() if k != "mask_rle" and k not in measured}


def write_item(r: ItemResult, output_dir: Path, method: str, model: str, guidance: float,
               settings: MetricSettings | None = None, identity: dict | None = None,
               edit_with: str = "prompt") -> list[dict]:
    """Write one item (:func:`diffinv.output.write_item`); ``identity``: what a rerun compares before skipping it
    (:func:`diffinv.output.identity`), stored in its record; ``edit_with``: see :func:`metric_lines`."""
    lines = metric_lines(r, method, model, guidance, settings, edit_with)
    if identity is not None:
        r.inversion.meta["identity"] = json.dumps(identity)
    images = {"source.png": r.source, "reconstruction.png": r.reconstruction}
    images |= {f"edit-{k}.png": e for k, e in enumerate(r.edits)}
    output.write_item(Path(output_dir), r.id, images, lines, r.inversion)
    return lines


class InversionWriter(BasePredictionWriter):
    """Writes every predicted item under ``output_dir`` (layout and rules: :mod:`diffinv.output`)."""

    def __init__(self, output_dir: str = "outputs", lpips: list[Literal["alex", "vgg"]] | None = None,
                 clip_model: str | None = None):
        """
        Args:
            output_dir: Set by the CLI's --output_dir.
            lpips: LPIPS variants to compute ('alex', 'vgg'); "unavailable" where torchvision or the weights are
                missing.
            clip_model: A CLIP model (hub id in the local cache, or folder) for CLIP score; none: no CLIP score.
        """
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.settings = MetricSettings(tuple(lpips or ()), clip_model)
        self.written = 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        data = getattr(trainer, "datamodule", None)
        items = {i.id: i for i in (batch or [])}
        for r in prediction:
            ident = data.identity(items[r.id]) if hasattr(data, "identity") and r.id in items else None
            write_item(r, self.output_dir, pl_module.method_name, pl_module.backbone_config.pretrained,
                       pl_module.guidance_scale, self.settings, ident,
                       edit_with=(pl_module.editor or Editor).edit_name)
            self.written += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        """Optimizing methods (``diffinv fit``) leave each batch's results on the module."""
        self.write_on_batch_end(trainer, pl_module, getattr(pl_module, "last_results", []), None, batch, batch_idx, 0)
        pl_module.last_results = []

    def on_train_end(self, trainer, pl_module):
        self.on_predict_end(trainer, pl_module)

    def on_predict_end(self, trainer, pl_module):
        written = int(trainer.strategy.reduce(torch.tensor(float(self.written)), reduce_op="sum"))
        if trainer.is_global_zero:
            print(f"diffinv: wrote {written} item(s) to {self.output_dir} (metrics in {self.output_dir / 'metrics.jsonl'})")


class ItemProgressBar(TQDMProgressBar):
    """Lightning's progress bar (batches, elapsed < remaining) with the images done and images per second of all
    processes (this process's count times the number of processes)."""

    def __init__(self, refresh_rate: int = 1):
        """
        Args:
            refresh_rate: Update the bar every this many batches.
        """
        super().__init__(refresh_rate=refresh_rate)
        self._done, self._start = 0, None

    def _figures(self, trainer) -> dict:
        if self._start is None:
            return {}
        done = self._done * trainer.world_size
        return {"images": done, "images/s": f"{done / max(time.perf_counter() - self._start, 1e-9):.2f}"}

    def _advance(self, trainer, bar, batch) -> None:
        self._done += len(batch) if isinstance(batch, list) else 1
        if bar is not None:
            bar.set_postfix(self._figures(trainer), refresh=False)

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics | self._figures(trainer)

    def on_predict_start(self, trainer, pl_module):
        super().on_predict_start(trainer, pl_module)
        self._done, self._start = 0, time.perf_counter()

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self._done, self._start = 0, time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._advance(trainer, self.predict_progress_bar, batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._done += len(batch) if isinstance(batch, list) else 1
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # shows get_metrics
