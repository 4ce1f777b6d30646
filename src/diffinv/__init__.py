"""diffinv: real-image inversion and text-guided editing with latent diffusion models."""

from .backbone import Backbone, BackboneConfig
from .errors import DiffinvError
from .guidance import ProximalGuidance
from .inversion import (
    CycleDiffusion,
    DDIMInversion,
    DDPMInversion,
    DirectInversion,
    EDICT,
    Inversion,
    InversionMethod,
    LatentTrajectoryOptimization,
    NegativePromptInversion,
    NullTextInversion,
    ProximalNegativePromptInversion,
)

__version__ = "0.1.0"
__all__ = [
    "Backbone",
    "BackboneConfig",
    "CycleDiffusion",
    "DDIMInversion",
    "DDPMInversion",
    "DirectInversion",
    "EDICT",
    "DiffinvError",
    "Inversion",
    "InversionMethod",
    "LatentTrajectoryOptimization",
    "NegativePromptInversion",
    "NullTextInversion",
    "ProximalGuidance",
    "ProximalNegativePromptInversion",
]
