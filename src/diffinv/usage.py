"""What a ``diffinv fit|predict`` command line and its ``-c`` files say, and one line for whatever jsonargparse
refuses (an unknown option with 'did you mean', a value of the wrong type or not finite, an invalid choice with
the valid ones, an option of the other subcommand); the ``--help`` listing of a config's model options.

Imports neither torch nor Lightning: ``diffinv --help`` stays fast.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import DiffinvError

SUBCOMMANDS = ("fit", "predict")
"""The Lightning subcommands diffinv offers."""


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
        model = config_model(argv) if class_path is not None else None
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


def config_model(argv: list[str]) -> tuple[str, dict] | None:
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


def given_on_command_line(argv: list[str], option: str) -> bool:
    """True where ``argv`` sets ``option`` (e.g. 'model.num_inference_steps') itself, not through a config file."""
    head, _, tail = option.partition(".")
    spellings = {f"--{option}", f"--{head}.init_args.{tail}"}
    return any(a.split("=", 1)[0] in spellings for a in argv)


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
