"""Step rules and post-step hooks of the sampling loop: each in its own small file."""

from .base import Guided, Step, StepHook
from .controlled import ControlledStep
from .coupled import CoupledStep
from .deterministic import DeterministicStep
from .fireflow import FireFlowStep
from .hooks import Controlled, Finite, Observe, Snap
from .rf_solver import RFSolverStep
from .stochastic import StochasticStep

__all__ = ["Controlled", "ControlledStep", "CoupledStep", "DeterministicStep", "FireFlowStep", "Finite", "Guided",
           "Observe", "RFSolverStep", "Snap", "Step", "StepHook", "StochasticStep"]
