"""The one exception type users see: the CLI prints its message on one line, never a traceback; and the checks
of settings every method and editor share."""

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
