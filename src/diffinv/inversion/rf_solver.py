"""RF-Solver inversion (Wang et al., ICML 2025, "Taming rectified flow for inversion and editing"): the rectified-flow
ODE solved both ways by its second-order Taylor step (:mod:`diffinv.steps.rf_solver`), on flow models."""

from __future__ import annotations

import torch
from torch import Tensor

from ..backbone import BackboneConfig
from ..ddim import Schedule
from ..editing.editor import Editor
from ..steps.rf_solver import Move, backbone_velocity, invert_with, rf_solver_move
from ..errors import check_finite
from .base import InversionMethod
from .record import Sampling, StepKind


def inverting_guidance(backbone, value: float):
    """Within the block a guidance-distilled model's denoiser gets ``value`` (its embedded guidance while
    inverting); a model without a guidance embedding is left as it is."""
    return backbone.embedded_guidance_of(value if backbone.family.embedded_guidance(backbone) is not None else None)


class RFSolverInversion(InversionMethod):
    """RF-Solver: inversion from the image up to noise and sampling back down by the second-order step x' = x +
    ds v + 1/2 ds^2 v' (v' by a finite difference at the midpoint: 2 evaluations a step), the velocity under the
    source prompt at w = 1 while inverting, evaluated where the latent sits (timestep 0 at the image), as the paper
    does. Its records are sampled with the same step (the record's typed sampling: 'rf_solver'), by any method.

    Runs on flow models (SD 3 / 3.5, FLUX.1) only. The editing of the paper (RF-Solver-Edit: the inversion's
    attention values injected into FLUX's last single-stream blocks) is the editor :class:`diffinv.editing.RFEdit`
    (``configs/flow/rf_edit_*.yaml``); any other editor works too.
    """

    method_name = "rf_solver"
    needs_flow = True
    step_kind: StepKind = "rf_solver"

    def __init__(self, backbone: BackboneConfig | None = None, num_inference_steps: int = 28,
                 guidance_scale: float = 1.0, inversion_guidance: float = 1.0, editor: Editor | None = None):
        """
        Args:
            backbone: A flow model (SD 3 / 3.5 or FLUX.1 in diffusers layout).
            num_inference_steps: Steps of inversion and sampling (FLUX's usual 28; the paper's editing runs use
                25-30).
            guidance_scale: Classifier-free guidance of reconstruction and edits ("true" CFG, with the null
                prompt). 1: none, the paper's setting on FLUX.1-dev, whose distilled guidance is the family's own;
                SD 3 needs it above 1 for edits to take (at the cost of the reconstruction, as DDIM + CFG).
            inversion_guidance: A guidance-distilled model's embedded guidance while inverting (FLUX.1-dev; the
                authors' released code inverts at 1 and samples at the model's own, ``--model.backbone.
                embedded_guidance``); ignored on a model without a guidance embedding (SD 3, FLUX.1-schnell).
            editor: How target prompts edit: none (plain prompt swap), RF-Edit's value injection, Prompt-to-Prompt,
                SDEdit or FlowEdit.
        """
        super().__init__(backbone, num_inference_steps, guidance_scale, editor)
        check_finite({"inversion_guidance": inversion_guidance})
        self.inversion_guidance = inversion_guidance

    def move(self) -> Move:
        """The solver's step between adjacent levels (a fresh one per inversion: FireFlow's carries a velocity)."""
        return rf_solver_move

    def invert_latents(self, z0: Tensor, source_emb: Tensor, schedule: Schedule, ids: list[str] | None = None) -> dict:
        velocity = backbone_velocity(lambda z, t, alpha: self.backbone.predict(z, t, source_emb, alpha), schedule)
        with torch.no_grad(), inverting_guidance(self.backbone, self.inversion_guidance):
            trajectory = invert_with(self.move(), z0, schedule, velocity)
        return {"trajectory": trajectory,
                "sampling": Sampling(step=self.step_kind, guidance_scale=float(self.guidance_scale))}
