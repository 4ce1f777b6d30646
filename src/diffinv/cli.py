"""The ``diffinv`` command: Lightning's CLI over the inversion methods (``predict``; ``fit`` for optimizing ones).

    diffinv predict -c configs/npi.yaml [--data.manifest captions.jsonl] [--output_dir DIR]
                    [--model.num_inference_steps N] [--model.backbone.pretrained HUB_ID_OR_FOLDER]

Every problem with the user's input, model, files or settings ends in one line ``diffinv: error: ...`` and exit
status 2, before anything is written (:func:`~diffinv.errors.one_line`; jsonargparse's parsing errors through
:func:`~diffinv.usage.usage_error`, the ``-c`` files checked first by :func:`~diffinv.usage.check_config_file`);
SIGINT and SIGTERM stop a run at once, keeping the finished items and dropping the one in progress, if any (exit
128 + the signal's number).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

from .errors import DiffinvError, one_line
from .usage import SUBCOMMANDS

_QUIET = (
    r".*does not have many workers.*",
    r".*GPU available but not used.*",
    r".*predict_dataloader.*",
    r".*LeafSpec.*",
    r".*`isinstance\(treespec, LeafSpec\)`.*",
    r".*Trying to infer the `batch_size`.*",
    r".*configure_optimizers` returned `None`.*",  # diffinv's methods optimise per image, manually
    r".*smaller than the logging interval.*",  # one batch per image group: nothing to average over
    r".*module\(s\) in eval mode.*",  # the frozen backbone is in eval mode on purpose
    r".*Total length of `DataLoader` across ranks is zero.*",  # every item was finished before: skipped
    r".*train_dataloader.*",
    r".*val_dataloader.*",
)
# Written out, not built from diffinv.inversion.registry: that imports torch, which `diffinv --help` must not.
# tests/test_registry.py checks that it names every registered method under its subcommand.
USAGE = """usage: diffinv {fit,predict,bench,serve} ...

Real-image inversion and text-guided editing with latent diffusion models.

  diffinv predict -c configs/npi.yaml [--data.manifest captions.jsonl] [--output_dir DIR] [...]
                  invert and edit with an optimization-free method (DDIM, NPI, ProxNPI, CycleDiffusion,
                  DirectInversion, EDICT, DDPM inversion), or edit saved inversions (--data.records DIR)
  diffinv fit -c configs/null_text.yaml [...]
                  the optimizing methods (null-text inversion, latent-TOP)
  diffinv bench -c configs/bench_reconstruction.yaml [--output_dir DIR]
                  several runs over one dataset, then tables and plots
  diffinv serve [--host 127.0.0.1] [--port 7860] [--output_dir DIR]
                  the browser editor: invert an image once, then edit it by typing (pip install 'diffinv[app]')

'diffinv predict -c CONFIG --help' lists every option, the config's model options last.
"""


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived: unwinds the run (Lightning's teardown included) up to :func:`main`."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame) -> None:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the unwinding
    raise Stopped(signum)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    if issubclass(category, UserWarning) and "diffinv" in filename:
        return f"diffinv: warning: {message}\n"
    return _default_format(message, category, filename, lineno, line)


_default_format = warnings.formatwarning


class _NoAdverts(logging.Filter):
    """Lightning's tips and its end-of-fit notice (one epoch is the whole run here) are noise for our users."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return not (text.startswith("💡 Tip") or text.startswith("`Trainer.fit` stopped"))


def _stop_message(signum: int, output: list[str], items: list[str]) -> str:
    """The one line a stop by signal prints: where the finished items are, and how many of this run's ``items``
    (their ids) were not written (an item is said to be dropped only where one was)."""
    from .output import DONE_MARKER

    name = signal.Signals(signum).name
    if not output:  # stopped before the output folder was taken: nothing was written
        return f"diffinv: stopped by {name} before any item was run: nothing was written"
    folder = output[0]
    missing = [i for i in items if not (Path(folder) / i / DONE_MARKER).is_file()]
    if not missing:
        return f"diffinv: stopped by {name}: every item of this run had been written to {folder}; nothing was lost"
    return (f"diffinv: stopped by {name}: the finished items are kept in {folder}; {len(missing)} of {len(items)} "
            "item(s) were not written (none left half-written); run the same command again to continue")


def main(args: list[str] | None = None) -> None:
    """``diffinv fit|predict ...`` (LightningCLI), ``diffinv bench -c configs/bench_*.yaml`` or ``diffinv serve``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] in (["bench"], ["serve"]):
        if argv[0] == "bench":
            from .bench import main as run
        else:
            from .app.ui import main as run
        try:
            return run(argv[1:])
        except DiffinvError as e:
            print(f"diffinv: error: {e}", file=sys.stderr)
            sys.exit(2)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdverts())
    warnings.formatwarning = _one_line_warning
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return None if argv else sys.exit(2)
    if not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
        print(f"diffinv: error: unknown subcommand {argv[0]!r}: use fit, predict, bench or serve (diffinv --help)",
              file=sys.stderr)
        sys.exit(2)
    from . import lightning_cli as lc
    from .data import InversionData
    from .inversion.base import InversionMethod
    from .usage import check_config_file, config_files, config_model, model_options

    for path in config_files(argv):
        try:
            check_config_file(path)
        except DiffinvError as e:
            print(f"diffinv: error: {e}", file=sys.stderr)
            sys.exit(2)
    handlers = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
        handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        lc.DiffinvCLI(InversionMethod, InversionData, subclass_mode_model=True, args=args, save_config_callback=None,
                      auto_configure_optimizers=False)
    except SystemExit as e:
        wants_help = any(a in ("-h", "--help") for a in argv) and argv[:1] and argv[0] in SUBCOMMANDS
        model = config_model(argv) if wants_help and e.code in (0, None) else None
        if model is not None:
            try:
                print(model_options(*model), end="")
            except Exception as err:  # noqa: BLE001 - the help above is printed already
                print(f"(the model's options could not be listed: {err})")
        raise
    except Stopped as e:
        print(_stop_message(e.signum, lc.OUTPUT, lc.ITEMS), file=sys.stderr)
        sys.exit(128 + e.signum)
    except Exception as e:  # noqa: BLE001 - a user's error in one line; anything else re-raised with its traceback
        message = one_line(e)
        if message is None:
            raise
        print(f"diffinv: error: {message}", file=sys.stderr)
        sys.exit(2)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        while lc.HELD:
            lc.HELD.pop().release()
        lc.OUTPUT.clear()
        lc.ITEMS.clear()


if __name__ == "__main__":
    main()
