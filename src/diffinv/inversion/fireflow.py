"""FireFlow inversion (Deng et al., ICML 2025, "FireFlow: fast inversion of rectified flow for image semantic
editing"): RF-Solver's midpoint step whose start velocity is the previous step's midpoint velocity
(:mod:`diffinv.steps.fireflow`): second order at one evaluation a step, on flow models."""

from __future__ import annotations

from ..steps.fireflow import FireFlowMover
from ..steps.rf_solver import Move
from .record import StepKind
from .rf_solver import RFSolverInversion


class FireFlowInversion(RFSolverInversion):
    """FireFlow: inversion and sampling by the midpoint rule with the velocity reused from the previous step's
    midpoint (N + 1 evaluations for N steps, against RF-Solver's 2N), the velocity under the source prompt at w = 1
    while inverting. Its records are sampled with the same step ('fireflow'). Runs on flow models only; the
    paper's editing (its attention-value injection) is the editor :class:`diffinv.editing.RFEdit`."""

    method_name = "fireflow"
    step_kind: StepKind = "fireflow"

    def move(self) -> Move:
        return FireFlowMover().move
