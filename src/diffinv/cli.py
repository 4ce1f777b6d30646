"""The ``diffinv`` command: Lightning's CLI over the inversion methods (``predict``; ``fit`` for optimizing ones).

    diffinv predict -c configs/npi.yaml [--data.manifest captions.jsonl] [--output_dir DIR]
                    [--model.num_inference_steps N] [--model.backbone.pretrained HUB_ID_OR_FOLDER]

Every problem with the user's input, model, files or settings ends in one line ``diffinv: error: ...`` and exit
status 2, before anything is written (:func:`one_line`; jsonargparse's parsing errors through :func:`usage_error`,
the ``-c`` files checked first by :func:`check_config_file`); SIGINT and SIGTERM stop a run at once, keeping the
finished items and dropping the one in progress, if any (exit 128 + the signal's number).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
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
    r".*configure_optimizers` returned `None`.*",  # diffinv's methods optimise per image, manually
    r".*smaller than the logging interval.*",  # one batch per image group: nothing to average over
    r".*module\(s\) in eval mode.*",  # the frozen backbone is in eval mode on purpose
    r".*Total length of `DataLoader` across ranks is zero.*",  # every item was finished before: skipped
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
    """Lightning's tips and its end-of-fit notice (one epoch is the whole run here) are noise for our users."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return not (text.startswith("💡 Tip") or text.startswith("`Trainer.fit` stopped"))


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


def config_files(argv: list[str]) -> list[str]:
    """The ``-c/--config`` files of a command line, in order (``-c F``, ``--config F``, ``--config=F``); inline
    YAML given to ``-c`` (jsonargparse accepts ``-c '{model: ...}'``) is not a file and left out."""
    found = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif arg.startswith("--config="):
            found.append(arg.split("=", 1)[1])
    return [f for f in found if not (f.lstrip().startswith("{") or "\n" in f or ": " in f)]


def check_config_file(path: str) -> dict:
    """A ``-c`` file's settings; a missing, unreadable, malformed or empty file, or one that is not a mapping of
    options, raises a DiffinvError naming it (jsonargparse's own messages do not name the file)."""
    import yaml

    file = Path(path).expanduser()
    if not file.exists():
        raise DiffinvError(f"config file {path} does not exist (-c {path}): see configs/ for the shipped ones")
    if not file.is_file():
        raise DiffinvError(f"config file {path} is a folder, not a YAML file: give a file such as configs/npi.yaml")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DiffinvError(f"config file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                           f"offset {e.start}): save it as UTF-8") from None
    except OSError as e:
        raise DiffinvError(f"config file {path} cannot be read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise DiffinvError(f"config file {path} is not valid YAML{where}: {problem}; fix the file") from None
    if data is None:
        raise DiffinvError(f"config file {path} is empty: give a config with model:, data: and trainer: settings "
                           "(e.g. configs/npi.yaml)")
    if not isinstance(data, dict):
        raise DiffinvError(f"config file {path} holds a {type(data).__name__}, not a mapping of options "
                           "(model:, data:, trainer: ...): see configs/npi.yaml")
    return data


def _config_setting(argv: list[str], keys: list[str]) -> str | None:
    """The last ``-c`` file that sets the option ``keys`` (e.g. ['model', 'guidance_scale']; a subclass setting's
    options may sit under its ``init_args``), or None."""
    found = None
    for path in config_files(argv):
        try:
            node = check_config_file(path)
        except DiffinvError:
            continue
        for key in keys:
            if isinstance(node, dict) and key not in node and isinstance(node.get("init_args"), dict):
                node = node["init_args"]
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            found = path
    return found


_KEY = re.compile(r'^Parser key "([^"]+)":')
_CLASS = re.compile(r"^Problem with given class_path '([^']+)':")
_STRUCTURE = re.compile(r"^(Does not validate against any of the Union subtypes|Subtypes: |Errors:|Given value|"
                        r"Expected a (?!.*\. Got value: ))")
_EXPECTED = re.compile(r"^Expected a (.+?)\. Got value: (.*)$")
_TYPE_WORDS = {"<class 'float'>": "a number", "<class 'int'>": "a whole number", "<class 'bool'>": "true or false",
               "<class 'str'>": "a string"}


def _problem(message: str) -> tuple[list[str], str | None, str, list[str]]:
    """The innermost problem of a jsonargparse error message: (its option's keys, e.g. ['model', 'proximal',
    'prox'], the class path it belongs to, the problem's line, the Subtypes lines of its option)."""
    stack: list[tuple[int, str, str]] = []  # (indent, 'key' | 'class', value)
    subtypes: dict[tuple, list[str]] = {}
    for raw in message.splitlines():
        text = raw.strip()
        indent = len(raw) - len(raw.lstrip(" -"))
        text = text.removeprefix("- ").strip()
        if not text:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        keys = tuple(v for _, kind, v in stack if kind == "key")
        if m := _KEY.match(text):
            stack.append((indent, "key", m.group(1)))
        elif m := _CLASS.match(text):
            stack.append((indent, "class", m.group(1)))
        elif text.startswith("Subtypes: "):
            subtypes.setdefault(keys, []).append(text)
        elif text.startswith("Given value: ") and keys in subtypes:
            return [k for key in keys for k in key.split(".")], None, text, subtypes[keys]
        elif not _STRUCTURE.match(text):
            classes = [v for _, kind, v in stack if kind == "class"]
            return ([k for key in keys for k in key.split(".")], classes[-1] if classes else None, text,
                    subtypes.get(keys, []))
    return [], None, message.strip().splitlines()[0] if message.strip() else "invalid arguments", []


def _literals(text: str) -> list[str]:
    """The values of every ``typing.Literal[...]`` in ``text``, in order, without repeats."""
    import ast

    values: list[str] = []
    for body in re.findall(r"Literal\[([^\]]*)\]", text):
        try:
            parsed = ast.literal_eval(f"[{body}]")
        except (ValueError, SyntaxError):
            continue
        values += [str(v) for v in parsed if str(v) not in values]
    return values


def _suggest(option: str, known: list[str], sub: str) -> str:
    """': did you mean --x?' for the closest known option, else a pointer to ``--help``."""
    import difflib

    candidates = [k for k in known if not option.startswith(k + ".") and not k.endswith(".help")]
    close = difflib.get_close_matches(option, candidates, n=1, cutoff=0.75)
    return f": did you mean {close[0]}?" if close else f" (diffinv {sub} -c CONFIG --help lists the options)"


def usage_error(message: str, argv: list[str], known: dict[str, list[str]]) -> str:
    """One line for a jsonargparse parsing error (an unknown option, a value of the wrong type, an invalid
    choice, an option of the other subcommand), naming the option (or the config file that set it) and what it
    accepts. ``known``: each subcommand's option names, for 'did you mean'."""
    sub = argv[0] if argv and argv[0] in SUBCOMMANDS else "predict"
    other = next(s for s in SUBCOMMANDS if s != sub)
    mine = known.get(sub, [])
    if m := re.match(r"Subcommand '(\w+)' does not accept option '([^']+)'", message):
        where = _config_setting(argv, m.group(2).split("."))
        run = f"`diffinv {other} -c {where}`" if where else f"`diffinv {other}`"
        return (f"{where or 'the command line'} sets {m.group(2)}, an option of `diffinv {other}` only: this "
                f"method runs with {run}")
    if m := re.match(r"unrecognized arguments: (.*)", message.strip()):
        option = next((a.split("=", 1)[0] for a in m.group(1).split() if a.startswith("-")), m.group(1))
        if option in known.get(other, []):
            return f"{option} is an option of `diffinv {other}` only: drop it under `diffinv {sub}`"
        return f"unknown option {option}{_suggest(option, mine, sub)}"
    keys, class_path, text, subtypes = _problem(message)
    if m := re.match(r"(?:Option '([^']+)' is not accepted|unrecognized arguments: (\S+))", text):
        bad = "--" + ".".join([*keys, (m.group(1) or m.group(2)).lstrip("-").split("=", 1)[0]])
        model = _config_model(argv) if class_path is not None else None
        return f"unknown option {bad}{_suggest(bad, mine + _model_option_names(model), sub)}"
    if not keys:
        return f"invalid arguments: {' '.join(message.split())} (diffinv {sub} -c CONFIG --help lists the options)"
    option = "--" + ".".join(keys)
    on_command_line = any(a.split("=", 1)[0] == option or a.startswith(option + ".") for a in argv)
    given_in = None if on_command_line else _config_setting(argv, keys)
    return _bad_value(f"{'.'.join(keys)} in {given_in}" if given_in else option, text, subtypes)


def _model_option_names(model: tuple[str, dict] | None) -> list[str]:
    """The ``--model.*`` options of a config's model (:func:`_model_fields`); none where it cannot be read."""
    if model is None:
        return []
    try:
        return [option for option, _, _ in _model_fields(*model)]
    except Exception:  # noqa: BLE001 - suggestions are a courtesy: the error is reported without them
        return []


def _bad_value(name: str, text: str, subtypes: list[str]) -> str:
    """One line for a value jsonargparse refused: not one of the choices (every Literal's values listed), not a
    finite number, or not of the option's type."""
    if m := _EXPECTED.match(text):
        expected, value = m.groups()
        kinds = [_TYPE_WORDS.get(expected, expected)]
    elif text.startswith("Given value: "):
        expected, value = " ".join(subtypes), text.removeprefix("Given value: ")
        kinds = [_TYPE_WORDS.get(f"<class '{k}'>", k) for k in re.findall(r"<class '(\w+)'>", expected)
                 if k != "NoneType"]
    else:
        return f"{name}: {text}"
    choices = _literals(expected)
    if choices:
        return f"{name}: {value!r} is not a valid choice: use one of {', '.join(choices)}"
    if value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
        return f"{name}: expected a finite number, got {value!r}"
    return f"{name}: expected {' or '.join(kinds) or 'another value'}, got {value!r}"


def _config_model(argv: list[str]) -> tuple[str, dict] | None:
    """(class path, init args) of the model in the ``-c/--config`` files of ``argv`` (the last one that sets it)."""
    found = None
    for path in config_files(argv):
        try:
            model = check_config_file(path).get("model")
        except DiffinvError:
            continue
        if isinstance(model, dict) and "class_path" in model:
            found = (model["class_path"], model.get("init_args") or {})
    return found


def _given_on_command_line(argv: list[str], option: str) -> bool:
    """True where ``argv`` sets ``option`` (e.g. 'model.num_inference_steps') itself, not through a config file."""
    head, _, tail = option.partition(".")
    spellings = {f"--{option}", f"--{head}.init_args.{tail}"}
    return any(a.split("=", 1)[0] in spellings for a in argv)


@functools.cache
def _cli_class(base: type) -> type:
    """``base`` (diffinv's LightningCLI) whose parsing errors become one line (:func:`usage_error`), and which
    tells the model whether ``--model.num_inference_steps`` was given on the command line (a saved record is
    otherwise sampled with its own step count)."""
    from argparse import ArgumentError

    class OneLineCLI(base):
        def __init__(self, *args, **kwargs):
            _RUN["cli"] = self  # reachable by main when a signal stops the run inside this constructor
            super().__init__(*args, **kwargs)

        def init_parser(self, **kwargs):
            kwargs.setdefault("exit_on_error", False)  # raise ArgumentError: main prints one line, not a usage wall
            return super().init_parser(**kwargs)

        def parse_arguments(self, parser, args) -> None:
            try:
                super().parse_arguments(parser, args)
            except ArgumentError as e:
                for x in _chain(e):  # a config-time check raised while parsing is already one line
                    if isinstance(x, DiffinvError):
                        raise x from None
                argv = list(args) if args is not None else sys.argv[1:]
                known = {sub: sorted({o for a in p._actions for o in a.option_strings if o.startswith("--")})
                         for sub, p in getattr(self, "_subcommand_parsers", {}).items()}
                raise DiffinvError(usage_error(str(e), argv, known)) from None

        def _check_subcommand(self) -> None:
            """After the data is read and the output folder locked, before the trainer writes anything."""
            check = getattr(self.model, "check_subcommand", None)
            if check is not None:
                check(self.subcommand, getattr(self.datamodule, "items", None) or [])

        def before_fit(self) -> None:
            super().before_fit()
            self._check_subcommand()

        def before_predict(self) -> None:
            super().before_predict()
            self._check_subcommand()

        def after_instantiate_classes(self) -> None:
            super().after_instantiate_classes()
            argv = _RUN["argv"]
            if hasattr(self, "model") and hasattr(self.model, "steps_given"):
                self.model.steps_given = _given_on_command_line(argv, "model.num_inference_steps")

    return OneLineCLI


_RUN: dict = {"argv": [], "cli": None}
"""The command line and CLI object of the running ``fit``/``predict`` (for the message of a stop by signal)."""


def _stop_message(signum: int, cli, output: list[str]) -> str:
    """The one line a stop by signal prints: where the finished items are, and how many items of this run were
    not written (an item is said to be dropped only where one was)."""
    from .output import DONE_MARKER

    name = signal.Signals(signum).name
    if not output:  # stopped before the output folder was taken: nothing was written
        return f"diffinv: stopped by {name} before any item was run: nothing was written"
    folder = output[0]
    items = getattr(getattr(cli, "datamodule", None), "items", None)
    if items is None:
        return (f"diffinv: stopped by {name}: the finished items are kept in {folder}; run the same command again "
                "to continue")
    missing = [i.id for i in items if not (Path(folder) / i.id / DONE_MARKER).is_file()]
    if not missing:
        return f"diffinv: stopped by {name}: every item of this run had been written to {folder}; nothing was lost"
    return (f"diffinv: stopped by {name}: the finished items are kept in {folder}; {len(missing)} of {len(items)} "
            "item(s) were not written (none left half-written); run the same command again to continue")


def _model_fields(class_path: str, values: dict):
    """(option, value, documentation) of every option of a config's model, nested settings (dataclasses, the
    editor's class) expanded: the value the config gives it, else its default. A subclass setting (the editor)
    comes as ``(option, class path, documentation)`` before its own options."""
    import dataclasses
    import importlib
    import inspect
    import typing

    from docstring_parser import parse_from_object

    def load(path: str):
        module, name = path.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)

    def nested(hint):
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        return next((a for a in args if dataclasses.is_dataclass(a)), None)

    def walk(target, given: dict, prefix: str):
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
                yield f"{prefix}{name}", value["class_path"], docs.get(name, "")
                yield from walk(load(value["class_path"]), value.get("init_args") or {}, f"{prefix}{name}.")
            elif sub is not None:
                yield from walk(sub, value if isinstance(value, dict) else {}, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", value, docs.get(name, "")

    yield from walk(load(class_path), values, "--model.")


def model_options(class_path: str, values: dict) -> str:
    """The options of a config's model, nested settings (dataclasses, the editor) expanded, each with the value
    the config gives it (else its default) and its documentation."""
    import textwrap

    lines: list[str] = []
    for option, value, doc in _model_fields(class_path, values):
        lines.append(f"  {option} {value if isinstance(value, str) else json.dumps(value)}")
        if doc:
            lines.append(textwrap.fill(doc, 110, initial_indent=" " * 6, subsequent_indent=" " * 6))
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

    for path in config_files(argv):
        try:
            check_config_file(path)
        except DiffinvError as e:
            print(f"diffinv: error: {e}", file=sys.stderr)
            sys.exit(2)
    handlers = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
        handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    _RUN["argv"] = argv
    try:
        _cli_class(lc.DiffinvCLI)(InversionMethod, InversionData, subclass_mode_model=True, args=args,
                                  save_config_callback=None, auto_configure_optimizers=False)
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
        print(_stop_message(e.signum, _RUN["cli"], lc.OUTPUT), file=sys.stderr)
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
        _RUN.update(argv=[], cli=None)


if __name__ == "__main__":
    main()
