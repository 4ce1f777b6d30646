"""The ``diffinv`` command: Lightning's CLI over the inversion methods (``predict``; ``fit`` for optimizing ones).

    diffinv predict -c configs/npi.yaml [--data.manifest captions.jsonl] [--output_dir DIR]
                    [--model.num_inference_steps N] [--model.backbone.pretrained HUB_ID_OR_FOLDER]
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from lightning.pytorch.cli import LightningCLI

from .callbacks import InversionWriter, ItemProgressBar
from .data import InversionData
from .errors import DiffinvError
from .inversion.base import InversionMethod

_QUIET = (
    r".*does not have many workers.*",
    r".*GPU available but not used.*",
    r".*predict_dataloader.*",
    r".*LeafSpec.*",
    r".*`isinstance\(treespec, LeafSpec\)`.*",
    r".*Trying to infer the `batch_size`.*",
    r".*`configure_optimizers` returned `None`.*",
    r".*train_dataloader.*",
    r".*val_dataloader.*",
)


class DiffinvCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--output_dir", type=str, default="outputs",
                            help="Folder for results: <id>/ PNGs and inversion records, metrics.jsonl.")
        parser.add_lightning_class_args(InversionWriter, "writer")
        parser.add_lightning_class_args(ItemProgressBar, "progress")
        parser.link_arguments("output_dir", "writer.output_dir")
        parser.link_arguments("output_dir", "data.output_dir")
        parser.link_arguments("output_dir", "trainer.default_root_dir")  # TensorBoard logs: OUTPUT_DIR/lightning_logs


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    if issubclass(category, UserWarning) and "diffinv" in filename:
        return f"diffinv: warning: {message}\n"
    return _default_format(message, category, filename, lineno, line)


_default_format = warnings.formatwarning


class _NoAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def main(args: list[str] | None = None) -> None:
    """``diffinv fit|predict ...`` (LightningCLI) or ``diffinv bench -c configs/bench_*.yaml``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        try:
            return bench_main(argv[1:])
        except DiffinvError as e:
            print(f"diffinv: error: {e}", file=sys.stderr)
            sys.exit(2)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdverts())
    warnings.formatwarning = _one_line_warning
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    try:
        DiffinvCLI(
            InversionMethod,
            InversionData,
            subclass_mode_model=True,
            args=args,
            save_config_callback=None,
            auto_configure_optimizers=False,
        )
    except DiffinvError as e:
        print(f"diffinv: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
