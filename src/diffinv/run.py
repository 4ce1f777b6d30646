"""One ``diffinv fit`` or ``diffinv predict`` run: Lightning's CLI over the inversion methods, quietened, with
every user's error in one line and a stop by signal that keeps the finished items.

Called by :mod:`diffinv.cli` (the ``diffinv`` command) and by :mod:`diffinv.bench` (each run of a benchmark, in
its own interpreter as ``python -m diffinv.run fit|predict ...`` where the run launches processes of its own).
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
from typing import TYPE_CHECKING

from .errors import DiffinvError, one_line
from .usage import SUBCOMMANDS

if TYPE_CHECKING:  # lightning_cli imports Lightning: only once a run starts
    from .lightning_cli import RunState

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
    r".*LightningCLI's args parameter is intended.*",  # run_lightning always passes the command line it was given
)


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived: unwinds the run (Lightning's teardown included) up to :func:`run_lightning`."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum: int, frame) -> None:
    """Turn SIGINT/SIGTERM into :class:`Stopped`, ignoring any further one."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the unwinding
    raise Stopped(signum)


_default_format = warnings.formatwarning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """diffinv's own user warnings as one line ``diffinv: warning: ...``; any other warning as Python shows it."""
    if issubclass(category, UserWarning) and "diffinv" in filename:
        return f"diffinv: warning: {message}\n"
    return _default_format(message, category, filename, lineno, line)


class _NoAdverts(logging.Filter):
    """Lightning's tips and its end-of-fit notice (one epoch is the whole run here) are noise for our users."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return not (text.startswith("💡 Tip") or text.startswith("`Trainer.fit` stopped"))


def _stop_message(signum: int, state: RunState) -> str:
    """The one line a stop by signal prints: where the finished items are, and how many of this run's items
    (``state.items``) were not written (an item is said to be dropped only where one was)."""
    from .output import DONE_MARKER

    name = signal.Signals(signum).name
    if state.output_dir is None:  # stopped before the output folder was taken: nothing was written
        return f"diffinv: stopped by {name} before any item was run: nothing was written"
    folder = state.output_dir
    missing = [i for i in state.items if not (Path(folder) / i / DONE_MARKER).is_file()]
    if not missing:
        return f"diffinv: stopped by {name}: every item of this run had been written to {folder}; nothing was lost"
    return (f"diffinv: stopped by {name}: the finished items are kept in {folder}; {len(missing)} of "
            f"{len(state.items)} item(s) were not written (none left half-written); run the same command again to "
            "continue")


def _quieten() -> None:
    """Only what a user can act on reaches the terminal: Lightning's adverts and known-harmless warnings dropped,
    diffinv's own warnings in one line."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdverts())
    warnings.formatwarning = _one_line_warning
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)


def _check_config_files(argv: list[str]) -> int:
    """Read every ``-c`` file before Lightning does: 0, or 2 after printing the first problem in one line."""
    from .usage import check_config_file, config_files

    for path in config_files(argv):
        try:
            check_config_file(path)
        except DiffinvError as e:
            print(f"diffinv: error: {e}", file=sys.stderr)
            return 2
    return 0


def _print_model_help(argv: list[str], code) -> None:
    """After ``diffinv fit|predict -c CONFIG --help``: the options of the config's model (Lightning's help shows
    only the base class's)."""
    from .usage import config_model, model_options

    wants_help = any(a in ("-h", "--help") for a in argv) and argv[:1] and argv[0] in SUBCOMMANDS
    model = config_model(argv) if wants_help and code in (0, None) else None
    if model is not None:
        try:
            print(model_options(*model), end="")
        except Exception as err:  # noqa: BLE001 - the help above is printed already
            print(f"(the model's options could not be listed: {err})")


def _run_cli(argv: list[str], state: RunState) -> int:
    """Run Lightning's CLI on ``argv``: 0 when done, 2 after a user's error in one line, 128 + the signal's
    number after a stop; Lightning's own exits (``--help``) pass through as SystemExit."""
    from .data import InversionData
    from .inversion.base import InversionMethod
    from .lightning_cli import DiffinvCLI

    try:
        DiffinvCLI(InversionMethod, InversionData, subclass_mode_model=True, args=argv, save_config_callback=None,
                   auto_configure_optimizers=False, state=state)
    except SystemExit as e:
        _print_model_help(argv, e.code)
        raise
    except Stopped as e:
        print(_stop_message(e.signum, state), file=sys.stderr)
        return 128 + e.signum
    except Exception as e:  # noqa: BLE001 - a user's error in one line; anything else re-raised with its traceback
        message = one_line(e)
        if message is None:
            raise
        print(f"diffinv: error: {message}", file=sys.stderr)
        return 2
    return 0


def run_lightning(argv: list[str]) -> int:
    """``diffinv fit|predict ...`` (``argv`` without the program name): the run's exit status (0, 2 after a
    user's error, 128 + the signal's number after a stop by signal). The output folder's lock is released however
    the run ends."""
    from .lightning_cli import RunState

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quieten()
    code = _check_config_files(argv)
    if code:
        return code
    state = RunState()
    handlers = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
        handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run_cli(argv, state)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        state.release()


if __name__ == "__main__":
    sys.exit(run_lightning(sys.argv[1:]))
