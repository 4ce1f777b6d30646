"""Every inversion method, once: its name, its class, its subcommand, its label and what the browser page needs.

Read by ``diffinv.inversion`` (its exports), :mod:`diffinv.bench` (``fit`` or ``predict``), the browser editor
(:mod:`diffinv.app.session`: the method menu, the records it loads, ProxNPI's setting, the progress phases), the
tests (``tests/test_registry.py``) and the scripts. Nothing else lists the methods, and no caller inspects a
class's signature or name.

Adding a method: write its file in ``diffinv/inversion/`` (a subclass of
:class:`~diffinv.inversion.base.InversionMethod`, or of :class:`~diffinv.inversion.optimizing.OptimizingInversion`
when it optimises per image), then add one :class:`Method` line to :data:`METHODS` below (and its config in
configs/). ``tests/test_registry.py`` checks that the line agrees with the class.

No import cycle: this module imports the method modules; no method module imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import DiffinvError
from .base import InversionMethod
from .cycle_diffusion import CycleDiffusion
from .ddim import DDIMInversion
from .ddpm_inversion import DDPMInversion
from .direct_inversion import DirectInversion
from .edict import EDICT
from .fireflow import FireFlowInversion
from .latent_top import LatentTrajectoryOptimization
from .negative_prompt import NegativePromptInversion, ProximalNegativePromptInversion
from .null_text import NullTextInversion
from .rf_inversion import RFInversion
from .rf_solver import RFSolverInversion


@dataclass(frozen=True)
class Method:
    """One registered inversion method."""

    cls: type[InversionMethod]
    """The LightningModule (a config's ``model.class_path`` is ``diffinv.inversion.<cls.__name__>``)."""
    run: Literal["fit", "predict"]
    """The ``diffinv`` subcommand: ``fit`` for the methods that optimise per image, ``predict`` for the others."""
    label: str
    """A short human name (tables, help text, the browser page's method menu)."""
    in_app: bool = False
    """Offered in the browser page's method menu (the page loads and edits every method's records anyway)."""
    proximal: bool = False
    """Takes a ``proximal`` setting (:class:`~diffinv.guidance.ProximalGuidance`: the page's quantile)."""
    long_label: str = ""
    """The label spelt out where help text does (``diffinv --help``); empty: the label itself."""

    @property
    def name(self) -> str:
        """The class's ``method_name``: what records and metrics.jsonl store."""
        return self.cls.method_name

    @property
    def help_label(self) -> str:
        """How ``diffinv --help`` names the method."""
        return self.long_label or self.label

    @property
    def optimizes(self) -> bool:
        """Optimises per image (``fit``): the page shows an optimising phase between inverting and sampling."""
        return self.run == "fit"


METHODS: tuple[Method, ...] = (
    Method(DDIMInversion, "predict", "DDIM", in_app=True),
    Method(NegativePromptInversion, "predict", "NPI", in_app=True),
    Method(ProximalNegativePromptInversion, "predict", "ProxNPI", in_app=True, proximal=True),
    Method(NullTextInversion, "fit", "NTI", in_app=True, long_label="null-text inversion"),
    Method(LatentTrajectoryOptimization, "fit", "latent-TOP", in_app=True),
    Method(CycleDiffusion, "predict", "CycleDiffusion"),
    Method(DDPMInversion, "predict", "DDPM inversion"),
    Method(DirectInversion, "predict", "DirectInversion"),
    Method(EDICT, "predict", "EDICT"),
    Method(RFSolverInversion, "predict", "RF-Solver"),
    Method(FireFlowInversion, "predict", "FireFlow"),
    Method(RFInversion, "predict", "RF-Inversion"),
)
"""Every inversion method, in the order menus and messages list them (the page's methods first)."""


def methods(*, in_app: bool | None = None, run: str | None = None) -> tuple[Method, ...]:
    """The registered methods, optionally only those offered on the page (``in_app``) or run by ``run``."""
    return tuple(m for m in METHODS
                 if (in_app is None or m.in_app == in_app) and (run is None or m.run == run))


def names() -> tuple[str, ...]:
    """Every method's ``method_name``."""
    return tuple(m.name for m in METHODS)


def by_name(name: str) -> Method:
    """The method whose ``method_name`` (what a record stores) is ``name``; else a one-line DiffinvError."""
    for m in METHODS:
        if m.name == name:
            return m
    raise DiffinvError(f"unknown inversion method {name!r}: one of {', '.join(names())}")


def by_label(label: str) -> Method:
    """The method of this label (the page's menu); else a one-line DiffinvError."""
    for m in METHODS:
        if m.label == label:
            return m
    raise DiffinvError(f"unknown method {label!r}: choose one of {', '.join(m.label for m in METHODS)}")


def by_class(cls: type) -> Method:
    """The registered method of ``cls``, or of its nearest registered base class (a user's subclass of a
    registered method runs as that method does); else a one-line DiffinvError."""
    for base in getattr(cls, "__mro__", ()):
        for m in METHODS:
            if m.cls is base:
                return m
    raise DiffinvError(f"{getattr(cls, '__qualname__', cls)} is not a registered inversion method (add it to "
                       "diffinv/inversion/registry.py)")
