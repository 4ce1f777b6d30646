"""The step rule of each record step kind (:attr:`diffinv.inversion.record.Sampling.step`): the one table the
pipeline reads to sample a record as it was inverted. A new step kind is a row here and a file in
:mod:`diffinv.steps`; the pipeline (:meth:`diffinv.inversion.base.InversionMethod.edit`) has no branch per kind."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..steps import ControlledStep, CoupledStep, DeterministicStep, FireFlowStep, RFSolverStep, Step, StochasticStep

if TYPE_CHECKING:
    from .record import Inversion, Sampling


@dataclass(frozen=True)
class StepKindSpec:
    """How records of one step kind are sampled."""

    build: Callable[["Sampling", list["Inversion"], object, bool], Step]
    """build(plan, records, device, from_editor) -> the step rule of a run whose rows come from ``records`` (one
    per row, in row order); ``from_editor``: the run starts at a level the editor chose (SDEdit), not the
    records' own start."""
    settings: Callable[["Sampling"], tuple] = lambda plan: ()
    """The plan's settings every record of one batch must share (beside the kind)."""
    flow: bool = False
    """The step moves a rectified flow's latents (sampled on flow models only)."""


def _stochastic(plan, records, device, from_editor) -> Step:
    noise = torch.stack([r.extra["step_noise"] for r in records], dim=1).to(device)
    return StochasticStep(eta=plan.eta, noise=noise, variance=plan.variance)


def _coupled(plan, records, device, from_editor) -> Step:
    # a run from the editor's own level starts EDICT's second sequence at the same latents
    y = None if from_editor else torch.stack([r.extra["edict_y_T"] for r in records]).to(device)
    return CoupledStep(mix=plan.mix, y_start=y, leapfrog=plan.leapfrog)


def _controlled(plan, records, device, from_editor) -> Step:
    y0 = torch.stack([r.z0 for r in records]).to(device)
    return ControlledStep(y0=y0, eta=plan.eta, eta_start=plan.eta_start, eta_stop=plan.eta_stop)


STEP_KINDS: dict[str, StepKindSpec] = {
    "ddim": StepKindSpec(lambda *_: DeterministicStep()),
    "stochastic": StepKindSpec(_stochastic, lambda p: (p.eta, p.variance)),  # CycleDiffusion, DDPM inversion
    "coupled": StepKindSpec(_coupled, lambda p: (p.mix, p.leapfrog)),  # EDICT
    "rf_solver": StepKindSpec(lambda *_: RFSolverStep(), flow=True),
    "fireflow": StepKindSpec(lambda *_: FireFlowStep(), flow=True),
    "rf_inversion": StepKindSpec(_controlled, lambda p: (p.eta, p.eta_start, p.eta_stop), flow=True),
}
"""Every :data:`diffinv.inversion.record.StepKind` (tested to cover them all)."""


def batch_key(plan: "Sampling") -> tuple:
    """What records sampled in one batch must share: the step kind and its settings."""
    return (plan.step, *STEP_KINDS[plan.step].settings(plan))
