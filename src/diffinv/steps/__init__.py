"""Step rules and post-step hooks of the sampling loop: each in its own small file."""

from .base import Guided, Step, StepHook
from .coupled import CoupledStep
from .deterministic import DeterministicStep
from .hooks import Controlled, Finite, Observe, Snap
from .stochastic import StochasticStep

__all__ = ["Controlled", "CoupledStep", "DeterministicStep", "Finite", "Guided", "Observe", "Snap", "Step",
           "StepHook", "StochasticStep"]
