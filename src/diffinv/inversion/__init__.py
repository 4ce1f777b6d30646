"""Inversion methods, one per file, and the Inversion record."""

from .base import InversionMethod, ItemResult
from .ddim import DDIMInversion
from .negative_prompt import NegativePromptInversion, ProximalNegativePromptInversion
from .record import Inversion

__all__ = [
    "DDIMInversion",
    "Inversion",
    "InversionMethod",
    "ItemResult",
    "NegativePromptInversion",
    "ProximalNegativePromptInversion",
]
