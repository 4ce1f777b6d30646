"""diffinv: real-image inversion and text-guided editing with latent diffusion models.

The public names below are imported on first use (PEP 562), so ``import diffinv`` and the ``diffinv`` command's
help do not pay for importing torch and Lightning until something needs them.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
_EXPORTS = {
    "Backbone": ".backbone",
    "BackboneConfig": ".backbone",
    "DiffinvError": ".errors",
    "ProximalGuidance": ".guidance",
    **{name: ".inversion" for name in (
        "CycleDiffusion", "DDIMInversion", "DDPMInversion", "DirectInversion", "EDICT", "Inversion",
        "InversionMethod", "LatentTrajectoryOptimization", "NegativePromptInversion", "NullTextInversion",
        "ProximalNegativePromptInversion")},
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffinv' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
