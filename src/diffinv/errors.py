"""The one exception type users see (the entry points print its message on one line, never a traceback), the
one line of any error a user can act on (:func:`one_line`, which every entry point imports from here), and the
checks of settings every method and editor share."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping


class DiffinvError(Exception):
    """A problem with the user's input, model or files, with a message that names it and says what to do."""


def _numbers(value: object, name: str):
    """(name, number) of every float in ``value``: nested dataclasses, lists, tuples and dicts searched."""
    if isinstance(value, bool):
        return
    if isinstance(value, float):
        yield name, value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _numbers(getattr(value, f.name), f"{name}.{f.name}")
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _numbers(v, f"{name}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{name}[{i}]")


def check_finite(settings: Mapping[str, object], prefix: str = "") -> None:
    """Refuse NaN or infinity in any number of ``settings`` (e.g. an ``__init__``'s ``locals()``; ``self`` and
    private names skipped): a DiffinvError naming the setting as ``prefix`` + its name (``proximal.step_size``)."""
    for key, value in settings.items():
        if key == "self" or key.startswith("_"):
            continue
        for name, number in _numbers(value, f"{prefix}{key}"):
            if not math.isfinite(number):
                raise DiffinvError(f"{name} must be a finite number, got {number}")


def check_at_least(name: str, value: float | int | None, low: float, *, strict: bool = False, hint: str = "") -> None:
    """Refuse ``value`` below ``low`` (or equal to it where ``strict``); None passes (an unset option). The
    message names the setting, the bound and what it got, then ``hint``."""
    if value is None or (value > low if strict else value >= low):
        return
    bound = f"> {low}" if strict else f">= {low}"
    raise DiffinvError(f"{name} must be {bound}, got {value}{f' ({hint})' if hint else ''}")


def check_fraction(name: str, value: float, hint: str = "") -> None:
    """Refuse ``value`` outside [0, 1], naming the setting."""
    if not 0 <= value <= 1:
        raise DiffinvError(f"{name} must be in [0, 1], got {value}{f' ({hint})' if hint else ''}")


def chain(e: BaseException):
    """``e``, then its causes and contexts, each once."""
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

    for x in chain(e):
        if isinstance(x, DiffinvError):
            return str(x)
    for x in chain(e):
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
