"""RF-Inversion (Rout et al., ICLR 2025, "Semantic image inversion and editing using rectified stochastic
differential equations"): the controlled forward ODE toward a noise sample (gamma, eq. 8) inverts; the controlled
reverse ODE toward the image (eta over the steps [start, stop)) reconstructs and edits
(:mod:`diffinv.steps.controlled`), on flow models."""

from __future__ import annotations

import torch
from torch import Tensor

from ..backbone import BackboneConfig
from ..ddim import Schedule, flow_x, flow_z
from ..editing.editor import Editor
from ..errors import DiffinvError, check_finite, check_fraction
from ..seeds import keyed_normal
from ..steps.controlled import rf_invert
from .base import InversionMethod
from .record import Sampling
from .rf_solver import inverting_guidance


def controlled_inversion(velocity, z0: Tensor, y1: Tensor, schedule: Schedule, gamma: float) -> Tensor:
    """The trajectory (N + 1, B, ...) in DDIM coordinates of :func:`~diffinv.steps.controlled.rf_invert` (the
    controlled forward ODE, eq. 8, by Euler steps) on the schedule's levels from z0 at level 0, in the flow's
    coordinates x = z sqrt((1 - s)^2 + s^2); v = ``velocity(z, timestep, alpha)`` evaluated where Y sits (level k's
    timestep and alpha; timestep 0 at the image)."""
    sigmas = schedule.sigmas
    level = {float(s): k for k, s in enumerate(sigmas)}  # rf_invert asks at the levels' sigmas, in order

    def at_level(x: Tensor, s: float) -> Tensor:
        k = level[s]
        return velocity(flow_z(x, sigmas[k]), schedule.level_timestep(k), schedule.alphas[k])

    xs, _ = rf_invert(at_level, flow_x(z0, sigmas[0]), sigmas, y1.to(z0), gamma)
    return torch.stack([flow_z(x, s) for x, s in zip(xs, sigmas)])


class RFInversion(InversionMethod):
    """RF-Inversion: inverts by the controlled forward ODE, pulled by ``gamma`` toward a noise sample y1 (keyed by
    the item id and ``seed``, never by batch position), the velocity under the source prompt at w = 1; samples by
    the controlled reverse ODE, every row (the reconstruction and the edits) pulled by ``eta`` toward its item's
    image latent on the steps [eta_start, eta_stop) (fractions of the steps), plain Euler after. Records are
    sampled with the same controlled step ('rf_inversion'), by any method. Runs on flow models only.

    gamma = 0 is Euler inversion, eta = 0 Euler sampling (tested on hand-made fields); gamma trades faithfulness
    for editability (the paper's Fig. 4), eta the reverse.
    """

    method_name = "rf_inversion"
    needs_flow = True

    def __init__(self, backbone: BackboneConfig | None = None, num_inference_steps: int = 28,
                 guidance_scale: float = 1.0, gamma: float = 0.5, eta: float = 0.9, eta_start: float = 0.0,
                 eta_stop: float = 0.25, seed: int = 0, inversion_guidance: float = 0.0,
                 editor: Editor | None = None):
        """
        Args:
            backbone: A flow model (SD 3 / 3.5 or FLUX.1 in diffusers layout).
            num_inference_steps: Steps of inversion and sampling (the paper's FLUX runs: 28).
            guidance_scale: "True" classifier-free guidance of reconstruction and edits; 1: none, the paper's
                setting on FLUX.1-dev (its distilled guidance is the family's own).
            gamma: The forward controller's strength toward the noise sample (paper: 0.5).
            eta: The reverse controller's strength toward the image (paper: 0.9 for its stylisation and edits;
                1 over every step lands on the image).
            eta_start: The fraction of the sampled steps after which the reverse controller starts (paper: 0).
            eta_stop: The fraction of the sampled steps at which it stops (paper: 0.25, 7 of 28 steps; the
                diffusers community pipeline's ``stop_timestep``).
            seed: Keys the noise sample y1 with each item's id.
            inversion_guidance: A guidance-distilled model's embedded guidance while inverting (FLUX.1-dev): 0, as
                the FLUX implementations of RF-Inversion invert (ComfyUI-Fluxtapoz: "for unsampling use 0"; the
                paper gives none); ignored on a model without a guidance embedding (SD 3, FLUX.1-schnell).
            editor: How target prompts edit: none (plain prompt swap), Prompt-to-Prompt or SDEdit.
        """
        super().__init__(backbone, num_inference_steps, guidance_scale, editor)
        check_fraction("gamma", gamma, "the forward controller's strength; paper 0.5")
        check_fraction("eta", eta, "the reverse controller's strength; paper 0.9")
        if not 0 <= eta_start <= eta_stop <= 1:
            raise DiffinvError(f"eta_start and eta_stop must be fractions with eta_start <= eta_stop, got "
                               f"{eta_start}, {eta_stop}")
        self.gamma, self.eta, self.eta_start, self.eta_stop, self.seed = gamma, eta, eta_start, eta_stop, seed
        check_finite({"inversion_guidance": inversion_guidance})
        self.inversion_guidance = inversion_guidance

    def pinned(self, plan: Sampling) -> dict[str, tuple[object, object]]:
        """The reverse controller's strength and steps (a record of RF-Inversion)."""
        if plan.step != "rf_inversion":
            return {}
        return {"eta": (self.eta, plan.eta), "eta_start": (self.eta_start, plan.eta_start),
                "eta_stop": (self.eta_stop, plan.eta_stop)}

    def invert_latents(self, z0: Tensor, source_emb: Tensor, schedule: Schedule, ids: list[str] | None = None) -> dict:
        ids = ids or [str(b) for b in range(len(z0))]
        y1 = torch.stack([keyed_normal(tuple(z0.shape[1:]), self.seed, "rf_inversion", i) for i in ids]).to(z0.device)
        with torch.no_grad(), inverting_guidance(self.backbone, self.inversion_guidance):
            trajectory = controlled_inversion(lambda z, t, alpha: _velocity(self.backbone, z, t, source_emb, alpha),
                                              z0, y1, schedule, self.gamma)
        return {"trajectory": trajectory,
                "sampling": Sampling(step="rf_inversion", eta=float(self.eta), eta_start=float(self.eta_start),
                                     eta_stop=float(self.eta_stop), guidance_scale=float(self.guidance_scale))}


def _velocity(backbone, z: Tensor, t: Tensor, emb: Tensor, alpha: Tensor) -> Tensor:
    """v = eps - x0 of latents z at the level of ``alpha`` under ``emb`` (one evaluation)."""
    eps, x0 = backbone.predict(z, t, emb, alpha)
    return eps - x0
