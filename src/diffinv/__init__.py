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
    "Inversion": ".inversion",
    "InversionMethod": ".inversion",
    "load": ".api",
    "load_inversion": ".api",
    "methods": ".api",
    "Model": ".api",
    "Inverted": ".api",
    "Edited": ".api",
    "PromptToPrompt": ".editing",
    "SDEdit": ".editing",
    "FlowEdit": ".editing",
    "RFEdit": ".editing",
}
"""Names imported on first use; the inversion methods' classes come on top, from their registry
(:mod:`diffinv.inversion.registry`), imported when one is first asked for."""


def _method_classes() -> list[str]:
    from .inversion.registry import METHODS

    return [m.cls.__name__ for m in METHODS]


def __getattr__(name: str):
    if name == "__all__":  # the registry's classes need torch: listed only when asked for
        value = sorted({*_EXPORTS, *_method_classes()})
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif not name.startswith("_") and name in _method_classes():
        value = getattr(importlib.import_module(".inversion", __name__), name)
    else:
        raise AttributeError(f"module 'diffinv' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_method_classes()))
