"""The Lightning side of the ``diffinv`` command: LightningCLI over the inversion methods and the data module, with
the output folder checked, matched against the run and locked before any work (imported only to run ``fit`` or
``predict``: ``diffinv --help`` and ``diffinv bench`` do not pay for Lightning's import)."""

from __future__ import annotations

import inspect
import json
import os
import sys
from argparse import ArgumentError
from dataclasses import dataclass, field

from lightning.pytorch.cli import LightningCLI

from .callbacks import InversionWriter, ItemProgressBar
from .errors import DiffinvError, chain
from .output import OutputLock, check_output_dir, resolve_output_dir
from .usage import SUBCOMMANDS, given_on_command_line, usage_error


@dataclass
class RunState:
    """What one run of :class:`DiffinvCLI` holds and has taken on, for its caller (:mod:`diffinv.run`) to tell
    after a stop by signal and to release however the run ends: one per run, never shared."""

    held: list[OutputLock] = field(default_factory=list)
    """The output folder locks the run holds."""
    output_dir: str | None = None
    """The run's output folder, once checked and locked (None: nothing can have been written)."""
    items: list[str] = field(default_factory=list)
    """The ids of the run's items."""

    def release(self) -> None:
        """Release every lock the run holds (last taken, first released)."""
        while self.held:
            self.held.pop().release()


def _launching_process() -> bool:
    """True in the process a user started (not a rank > 0 process Lightning launched for DDP)."""
    return all(os.environ.get(k, "0") == "0" for k in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK"))


def run_settings(config) -> dict:
    """The options of a parsed run that change its results (method, model, every method option, the image
    preprocessing and perturbation, precision): stored in each record, compared before a rerun skips an item.
    Batch size, devices, logging and metrics are left out: they do not change an image."""
    def plain(x):
        return json.loads(json.dumps(x.as_dict() if hasattr(x, "as_dict") else x, default=str))

    data = config.data
    return {"model": plain(config.model),
            "data": {k: plain(data.get(k)) for k in ("resolution", "square", "perturb")},
            "precision": str(config.trainer.get("precision"))}


class DiffinvCLI(LightningCLI):
    """Lightning's CLI as diffinv runs it: ``fit`` and ``predict`` only, a parsing error in one line
    (:func:`~diffinv.usage.usage_error`, not argparse's usage wall), the output folder resolved once, checked and
    locked before any work, and the method asked whether it runs under this subcommand."""

    argv: list[str]
    """The command line as parsed (set by :meth:`parse_arguments`)."""

    def __init__(self, *args, state: RunState, **kwargs):
        """LightningCLI's arguments, and ``state``: where this run records its locks, output folder and items for
        its caller (set before LightningCLI's constructor runs the subcommand)."""
        self.state = state
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Only what diffinv runs: ``fit`` (optimizing methods) and ``predict``; Lightning's ``validate`` and
        ``test`` have nothing to evaluate here and are not offered."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k in SUBCOMMANDS}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--output_dir", type=str, default="outputs",
                            help="Folder for results: <id>/ PNGs and inversion records, metrics.jsonl.")
        parser.add_lightning_class_args(InversionWriter, "writer")
        parser.add_lightning_class_args(ItemProgressBar, "progress")
        parser.link_arguments("output_dir", "writer.output_dir")
        parser.link_arguments("output_dir", "data.output_dir")
        parser.link_arguments("output_dir", "trainer.default_root_dir")  # TensorBoard logs: OUTPUT_DIR/lightning_logs

    def init_parser(self, **kwargs):
        kwargs.setdefault("exit_on_error", False)  # raise ArgumentError: it becomes one line, not a usage wall
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser, args) -> None:
        self.argv = list(args) if args is not None else sys.argv[1:]
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as e:
            for x in chain(e):  # a config-time check raised while parsing is already one line
                if isinstance(x, DiffinvError):
                    raise x from None
            known = {sub: sorted({o for a in p._actions for o in a.option_strings if o.startswith("--")})
                     for sub, p in getattr(self, "_subcommand_parsers", {}).items()}
            raise DiffinvError(usage_error(str(e), self.argv, known)) from None

    def after_instantiate_classes(self) -> None:
        """The method learns which of its options were typed on the command line (a saved record is sampled with
        its own step count and pinned settings; a typed value against them is refused)."""
        super().after_instantiate_classes()
        model = getattr(self, "model", None)
        if hasattr(model, "given"):
            options = inspect.signature(type(model).__init__).parameters
            model.given = frozenset(name for name in options if given_on_command_line(self.argv, f"model.{name}"))

    def before_instantiate_classes(self) -> None:
        """Resolve ``--output_dir`` once (``~`` expanded, made absolute; empty: refused in one line) and give that
        same folder to everything that writes: the check and the lock, the writer, the data module (skips and
        reconciles), the trainer (TensorBoard's logs)."""
        config = self.config[self.subcommand]
        folder = str(resolve_output_dir(config.output_dir))
        for key in ("output_dir", "writer.output_dir", "data.output_dir", "trainer.default_root_dir"):
            config[key] = folder

    def _instantiate_trainer(self, config, callbacks):
        """``--trainer.enable_progress_bar false`` drops diffinv's progress bar (Lightning refuses a progress bar
        callback when the bar is off)."""
        if config.get("enable_progress_bar") is False:
            callbacks = [c for c in callbacks if not isinstance(c, ItemProgressBar)]
        return super()._instantiate_trainer(config, callbacks)

    def _before_run(self) -> None:
        """Before any work and any write: the output folder is writable, every input is read and checked, the
        items finished there are matched against this run (skipped only if the same work); then the folder is
        locked for this run."""
        config = self.config[self.subcommand]
        check_output_dir(config.output_dir)
        self.datamodule.run_settings = run_settings(config)
        self.datamodule.setup("fit" if self.subcommand == "fit" else "predict")
        if _launching_process():
            self.state.held.append(OutputLock(config.output_dir).acquire())
        self.state.output_dir = config.output_dir
        self.state.items = [item.id for item in getattr(self.datamodule, "items", None) or []]
        check = getattr(self.model, "check_subcommand", None)
        if check is not None:  # before the trainer writes anything (its logs): the method runs under this one?
            check(self.subcommand, getattr(self.datamodule, "items", None) or [])

    before_fit = _before_run
    before_predict = _before_run


