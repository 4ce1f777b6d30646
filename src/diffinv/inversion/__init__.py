"""Inversion methods, one per file, and the Inversion record.

The method classes exported here are those of :mod:`diffinv.inversion.registry` (its one line per method), so a
config's ``model.class_path: diffinv.inversion.<Class>`` reaches every registered method and no other list needs
editing when one is added.
"""

from .base import InversionMethod  # noqa: F401 - exported (__all__)
from .optimizing import OptimizingInversion  # noqa: F401 - exported (__all__)
from .record import Inversion, check_record  # noqa: F401 - exported (__all__)
from .registry import METHODS as _METHODS
from .result import ItemResult  # noqa: F401 - exported (__all__)

globals().update({m.cls.__name__: m.cls for m in _METHODS})

__all__ = sorted(["Inversion", "InversionMethod", "ItemResult", "OptimizingInversion", "check_record",
                  *(m.cls.__name__ for m in _METHODS)])
