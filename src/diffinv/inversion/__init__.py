"""Inversion methods, one per file, and the Inversion record."""

from .base import InversionMethod
from .optimizing import OptimizingInversion
from .result import ItemResult
from .cycle_diffusion import CycleDiffusion
from .ddim import DDIMInversion
from .ddpm_inversion import DDPMInversion
from .direct_inversion import DirectInversion
from .edict import EDICT
from .latent_top import LatentTrajectoryOptimization
from .negative_prompt import NegativePromptInversion, ProximalNegativePromptInversion
from .null_text import NullTextInversion
from .record import Inversion, check_record

__all__ = [
    "CycleDiffusion",
    "DDIMInversion",
    "DDPMInversion",
    "DirectInversion",
    "EDICT",
    "Inversion",
    "InversionMethod",
    "ItemResult",
    "LatentTrajectoryOptimization",
    "NegativePromptInversion",
    "NullTextInversion",
    "OptimizingInversion",
    "ProximalNegativePromptInversion",
    "check_record",
]
