"""The LightningDataModule: picks the item source, builds and perturbs the items, skips those finished in the
output folder (resume), and shards the items over processes (every item exactly once)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..errors import DiffinvError
from ..output import finished_items, identity
from .items import MAX_ASPECT, InputRow, Item, build_items
from .perturb import Perturbation
from .sources import EXAMPLES, coco_rows, pie_bench_rows, read_manifest, record_rows

MIN_RESOLUTION = 16
"""The smallest ``--data.resolution``: below it the embedded model's latents are 2x2 or less and its UNet has one
value per normalisation group (an error), and no model gives a usable image."""


def collate(items: list[Item | None]) -> list[Item]:
    return [i for i in items if i is not None]


class ItemList(torch.utils.data.Dataset):
    """The items; index -1 is "no item" (a padding slot of :class:`ShardSampler`)."""

    def __init__(self, items: list[Item]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Item | None:
        return None if index < 0 else self.items[index]


class ShardSampler(DistributedSampler):
    """Process r of R takes items r, r + R, ...: every item exactly once (Lightning's training sampler pads with
    repeated items, which two processes would then both write). Shards are filled up to equal length with
    "no item" slots, so every process runs the same number of steps (DDP's collectives stay in step)."""

    def __init__(self, dataset: ItemList, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = -(-len(dataset) // num_replicas)

    def __iter__(self):
        own = list(range(self.rank, len(self.dataset), self.num_replicas))
        return iter(own + [-1] * (self.num_samples - len(own)))

    def __len__(self) -> int:
        return self.num_samples


class InversionData(L.LightningDataModule):
    """Images and prompts to invert and edit: one from the command line, a manifest, saved inversion records,
    PIE-Bench, COCO captions, or (given none) the bundled example."""

    def __init__(
        self,
        image: str | None = None,
        source_prompt: str | None = None,
        target_prompts: list[str] | None = None,
        manifest: str | None = None,
        resolution: int | None = None,
        square: bool = False,
        records: str | None = None,
        pie_bench: str | None = None,
        coco_captions: str | None = None,
        coco_images: str | None = None,
        limit: int | None = None,
        seed: int = 0,
        batch_size: int = 1,
        perturb: Perturbation | None = None,
        max_aspect: float = MAX_ASPECT,
        output_dir: str | None = None,
    ):
        """
        Args:
            image: One image file to invert (with ``source_prompt``). Neither this nor ``manifest``: the bundled
                shapes example.
            source_prompt: Caption of ``image``.
            target_prompts: Edit prompts for ``image``; none = reconstruction only.
            manifest: A captions.jsonl, one JSON object per line: {"image": path (relative to the manifest's
                folder), "source_prompt": str, "target_prompts": [str, ...], "id": optional name}.
            resolution: Shorter image side after resizing; default: the model's native size (512 for SD 1.x).
            square: Centre-crop images to a square first (the NPI paper's COCO protocol).
            records: Edit saved inversions instead of inverting: a record file or the --output_dir of an earlier
                run (its <id>/inversion.safetensors); targets from --data.target_prompts, else the saved ones.
            pie_bench: PIE-Bench's folder (mapping_file.json + annotation_images/): 700 images, one edit each.
            coco_captions: A COCO captions_val*.json: reconstruction of its images with their first caption (the NPI
                paper's protocol: --data.limit 100 --data.square true --data.resolution 512).
            coco_images: COCO's image folder (default: val2017 or val2014 beside the captions file).
            limit: Use this many items: the first ones (COCO: a random draw seeded by ``seed``).
            seed: Seed of the COCO draw.
            batch_size: Images inverted together in one step.
            perturb: Perturb the inputs (pixel noise, a dropped or replaced caption word) to measure robustness;
                none: the inputs as they are.
            max_aspect: Refuse images whose long side is over this many times the short one (a 10000x20 panorama
                would become 32x16000 on the shapes model, 512x256000 on SD): crop them, or use ``square``.
            output_dir: Set by the CLI's --output_dir: items already finished there are skipped, not redone.
        """
        super().__init__()
        if sum(x is not None for x in (image, manifest, records, pie_bench, coco_captions)) > 1:
            raise DiffinvError("give one of --data.image (with --data.source_prompt), --data.manifest, --data.records, "
                               "--data.pie_bench or --data.coco_captions")
        if limit is not None and limit < 1:
            raise DiffinvError(f"limit must be >= 1, got {limit}")
        if image is None and records is None and (source_prompt is not None or target_prompts):
            raise DiffinvError("--data.source_prompt/--data.target_prompts need --data.image")
        if image is not None and source_prompt is None:
            raise DiffinvError("--data.image needs --data.source_prompt (a caption of the image)")
        if batch_size < 1:
            raise DiffinvError(f"batch_size must be >= 1, got {batch_size}")
        if resolution is not None and resolution < MIN_RESOLUTION:
            raise DiffinvError(f"--data.resolution must be at least {MIN_RESOLUTION} pixels (the shorter image side; "
                               f"leave it out for the model's native size), got {resolution}")
        if not max_aspect >= 1:
            raise DiffinvError(f"max_aspect must be >= 1, got {max_aspect}")
        self.image, self.source_prompt, self.target_prompts = image, source_prompt, list(target_prompts or [])
        self.manifest, self.resolution, self.square, self.records = manifest, resolution, square, records
        self.pie_bench, self.coco_captions, self.coco_images = pie_bench, coco_captions, coco_images
        self.limit, self.seed = limit, seed
        self.batch_size, self.output_dir = batch_size, output_dir
        self.perturb, self.max_aspect = perturb, max_aspect
        self.run_settings: dict | None = None
        """Set by the CLI: the options of this run that change a result (stored with each item, compared on a
        rerun before an item is skipped)."""
        if perturb is not None:
            perturb.check()
        if perturb is not None and records is not None:
            raise DiffinvError("--data.perturb perturbs images to invert: it does not apply to --data.records")
        self.items: list[Item] | None = None
        self.skipped: list[str] = []

    def rows(self) -> list[InputRow]:
        """The items' rows; ``limit`` keeps the first ones (COCO: a seeded random draw)."""
        if self.coco_captions is not None:
            return coco_rows(self.coco_captions, self.coco_images, self.limit, self.seed)
        if self.pie_bench is not None:
            rows = pie_bench_rows(self.pie_bench)
        elif self.records is not None:
            rows = record_rows(self.records, self.target_prompts)
        elif self.image is not None:
            rows = [InputRow(where="--data.image", image=Path(self.image).expanduser(), source_prompt=self.source_prompt,
                        target_prompts=self.target_prompts)]
        else:
            rows = read_manifest(self.manifest or EXAMPLES)
        return rows[: self.limit]

    def prepare_data(self) -> None:
        """Once, before the processes start: make OUTPUT_DIR/metrics.jsonl hold exactly the finished items' lines
        (:func:`diffinv.output.reconcile_metrics`: a run killed part-way leaves it one item behind or ahead)."""
        if self.output_dir is not None and Path(self.output_dir).is_dir():
            from ..output import reconcile_metrics

            restored, dropped = reconcile_metrics(Path(self.output_dir))
            if restored or dropped:
                print(f"diffinv: metrics.jsonl in {self.output_dir} now matches its finished items "
                      f"({restored} line(s) restored, {dropped} dropped)")

    def identity(self, item: Item) -> dict:
        """What a rerun compares before skipping ``item`` (:func:`diffinv.output.identity`)."""
        return identity(item.image, item.source_prompt, item.target_prompts, self.run_settings)

    def setup(self, stage: str | None = None) -> None:
        if self.items is not None:
            return
        items = build_items(self.rows(), self.resolution, self.square, self.max_aspect)
        if self.perturb is not None:
            items = [self.perturb.apply(i) for i in items]
            unchanged = [i.id for i in items
                         if self.perturb.caption != "none" and "caption_before_perturbation" not in i.meta]
            if unchanged:
                print(f"diffinv: {len(unchanged)} item(s) have no word to {self.perturb.caption.replace('_', ' ')}: "
                      f"their captions are unchanged ({', '.join(unchanged[:5])}{'...' if len(unchanged) > 5 else ''})")
        if self.output_dir is not None:
            done = set(finished_items(Path(self.output_dir), {i.id: self.identity(i) for i in items}))
            self.skipped = sorted(done)
            items = [i for i in items if i.id not in done]
            if done:
                print(f"diffinv: skipping {len(done)} item(s) already finished in {self.output_dir} with these "
                      f"settings ({', '.join(self.skipped[:5])}{'...' if len(done) > 5 else ''}); delete their "
                      "folders to redo them")
        lone = [i.id for i in items if not i.target_prompts]
        if lone:
            print(f"diffinv: {len(lone)} item(s) have no target prompts and are only reconstructed "
                  f"({', '.join(lone[:5])}{'...' if len(lone) > 5 else ''})")
        self.items = items

    def _loader(self) -> DataLoader:
        data, sampler = ItemList(self.items), None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sampler = ShardSampler(data, torch.distributed.get_world_size(), torch.distributed.get_rank())
        return DataLoader(data, batch_size=self.batch_size, shuffle=False, sampler=sampler, collate_fn=collate)

    predict_dataloader = _loader
    train_dataloader = _loader

