"""The ``diffinv`` command: Lightning's CLI over the inversion methods (``predict``; ``fit`` for optimizing ones).

    diffinv predict -c configs/npi.yaml [--data.manifest captions.jsonl] [--output_dir DIR]
                    [--model.num_inference_steps N] [--model.backbone.pretrained HUB_ID_OR_FOLDER]

Every problem with the user's input, model, files or settings ends in one line ``diffinv: error: ...`` and exit
status 2, before anything is written (:func:`one_line`); SIGINT and SIGTERM stop a run at once, keeping the
finished items and dropping the one in progress (exit 128 + the signal's number).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

from .errors import DiffinvError

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
SUBCOMMANDS = ("fit", "predict")
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
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def one_line(e: BaseException) -> str | None:
    """The one-line message of an error a user can act on (their input, files, model, settings, memory), or None
    for anything else (a bug: its traceback is worth seeing). Config-time checks raised inside jsonargparse's
    instantiation are found in the exception's chain."""
    import torch
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    for x in _chain(e):
        if isinstance(x, DiffinvError):
            return str(x)
    for x in _chain(e):
        if isinstance(x, torch.OutOfMemoryError) or "out of memory" in str(x).lower().split("\n")[0]:
            return ("out of memory: lower --data.batch_size (1 is the least), use --trainer.precision bf16-mixed on a "
                    "GPU, lower --data.resolution, or (latent-TOP) --model.num_starts")
        if isinstance(x, MisconfigurationException):
            text = " ".join(str(x).split())
            if "gpu" in text.lower() or "cuda" in text.lower() or "mps" in text.lower():
                return (f"--trainer.accelerator: {text} (no such accelerator is visible to this process: use "
                        "--trainer.accelerator cpu, or auto to take a GPU when there is one)")
            return f"invalid trainer settings: {text}"
    return None


def _config_model(argv: list[str]) -> tuple[str, dict] | None:
    """(class path, init args) of the model in the ``-c/--config`` files of ``argv`` (the last one that sets it)."""
    import yaml

    found = None
    for flag, value in zip(argv, argv[1:]):
        if flag in ("-c", "--config") and Path(value).is_file():
            model = (yaml.safe_load(Path(value).read_text()) or {}).get("model")
            if isinstance(model, dict) and "class_path" in model:
                found = (model["class_path"], model.get("init_args") or {})
    return found


def model_options(class_path: str, values: dict) -> str:
    """The options of a config's model, nested settings (dataclasses, the editor) expanded, each with the value
    the config gives it (else its default) and its documentation."""
    import dataclasses
    import importlib
    import inspect
    import textwrap
    import typing

    from docstring_parser import parse_from_object

    def load(path: str):
        module, name = path.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)

    def nested(hint):
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        return next((a for a in args if dataclasses.is_dataclass(a)), None)

    lines: list[str] = []

    def walk(target, given: dict, prefix: str) -> None:
        init = target if dataclasses.is_dataclass(target) else target.__init__
        docs = {p.arg_name: " ".join((p.description or "").split()) for p in parse_from_object(target).params}
        if not dataclasses.is_dataclass(target):
            docs |= {p.arg_name: " ".join((p.description or "").split()) for p in parse_from_object(init).params}
        hints = typing.get_type_hints(init)
        for name, param in inspect.signature(init).parameters.items():
            if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            value = given.get(name, None if param.default is inspect.Parameter.empty else param.default)
            sub = nested(hints.get(name))
            if isinstance(value, dict) and "class_path" in value:  # a subclass setting, e.g. the editor
                lines.append(f"  {prefix}{name} {value['class_path']}")
                lines.append(textwrap.fill(docs.get(name, ""), 110, initial_indent=" " * 6, subsequent_indent=" " * 6))
                walk(load(value["class_path"]), value.get("init_args") or {}, f"{prefix}{name}.")
                continue
            if sub is not None:
                walk(sub, value if isinstance(value, dict) else {}, f"{prefix}{name}.")
                continue
            shown = json.dumps(value) if not isinstance(value, str) else value
            lines.append(f"  {prefix}{name} {shown}")
            if docs.get(name):
                lines.append(textwrap.fill(docs[name], 110, initial_indent=" " * 6, subsequent_indent=" " * 6))

    cls = load(class_path)
    walk(cls, values, "--model.")
    head = (f"\nthis config's model: {class_path} (values: the config's, else the defaults; each is a command-line "
            "option, e.g. --model.num_inference_steps 20)")
    return "\n".join([head, *lines]) + "\n"


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

    handlers = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
        handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        lc.DiffinvCLI(InversionMethod, InversionData, subclass_mode_model=True, args=args, save_config_callback=None,
                   auto_configure_optimizers=False)
    except SystemExit as e:
        wants_help = any(a in ("-h", "--help") for a in argv) and argv[:1] and argv[0] in SUBCOMMANDS
        model = _config_model(argv) if wants_help and e.code in (0, None) else None
        if model is not None:
            try:
                print(model_options(*model), end="")
            except Exception as err:  # noqa: BLE001 - the help above is printed already
                print(f"(the model's options could not be listed: {err})")
        raise
    except Stopped as e:
        name = signal.Signals(e.signum).name
        where = f" in {lc.OUTPUT[0]}" if lc.OUTPUT else ""
        print(f"diffinv: stopped by {name}: the finished items are kept{where}, the one in progress was not written; "
              "run the same command again to continue", file=sys.stderr)
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


if __name__ == "__main__":
    main()
