"""Negative-prompt inversion (Miyake et al. 2023) and proximal negative-prompt inversion (Han et al. 2023)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..backbone import BackboneConfig
from ..editing.editor import Row
from ..editing.prompt_to_prompt import Editor
from ..guidance import GuidanceRule, Proximal, ProximalGuidance
from .base import InversionMethod
from .record import Inversion


class NegativePromptInversion(InversionMethod):
    """NPI: DDIM inversion at w = 1, then the source prompt's embedding C wherever CFG used the null embedding.

    Reconstruction then equals DDIM at w = 1 for any w (NPI eq. 6: eps(z, t, C) = eps(z, t, null_t) at the NTI
    optimum); an edit uses the target prompt as condition and the source prompt as negative (NPI Fig. 2c).
    """

    method_name = "npi"

    unconditional_branch = "source"  # null_t := C (NPI section 3.4)


class ProximalNegativePromptInversion(NegativePromptInversion):
    """ProxNPI: NPI whose guidance delta eps_tar - eps_src goes through a proximal operator (Alg. 1), with
    reconstruction and inversion guidance restoring the unedited region.

    The operator acts on the edit rows' delta only. On its own records the guidances pull the reconstruction row
    too (its whole image counts as unedited; the settings are pinned in the record). On another method's record
    (``--data.records``, e.g. null-text inversion's) eps_src is the record's own unconditional prediction: the
    edits are thresholded against it, and the reconstruction row stays the record's own, not pulled."""

    method_name = "proxnpi"

    def __init__(
        self,
        backbone: BackboneConfig | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        proximal: ProximalGuidance | None = None,
        editor: Editor | None = None,
    ):
        """
        Args:
            backbone: The Stable Diffusion to use; default: the embedded shapes model.
            num_inference_steps: DDIM steps of inversion and sampling (the papers use 50).
            guidance_scale: Scale w of the proximal guidance eps_src + w prox(eps_tar - eps_src).
            proximal: Operator, threshold quantile and guidances (see ``ProximalGuidance``).
            editor: How target prompts edit: none (plain prompt swap), Prompt-to-Prompt or SDEdit.
        """
        super().__init__(backbone, num_inference_steps, guidance_scale, editor)
        self.proximal = proximal or ProximalGuidance()
        if not 0 <= self.proximal.quantile <= 1:
            from ..errors import DiffinvError

            raise DiffinvError(f"proximal.quantile must be in [0, 1], got {self.proximal.quantile}")

    def reconstruction_rule(self) -> dict | None:
        """The proximal settings: the guidances pull this method's reconstruction rows too (their whole image
        counts as unedited), so a record pins them."""
        config = self.proximal
        if not (config.reconstruction_guidance or config.inversion_guidance):
            return None
        return dataclasses.asdict(config)

    def guidance(self, scale: float | Tensor, rows: list[Row], inversions: list[Inversion]) -> GuidanceRule:
        """Alg. 1's proximal guidance over the run's rows: each row's item (the threshold's scope 'item'), which
        rows are edits, and their source latents and trajectories (reconstruction and inversion guidance)."""
        dev = self.device
        return Proximal(
            self.proximal, scale,
            groups=torch.tensor([row.item for row in rows], device=dev),
            edit_rows=torch.tensor([row.is_edit for row in rows], device=dev),
            # another method's record keeps its own reconstruction: its row is not pulled
            unguided_rows=torch.tensor([not row.is_edit and inversions[row.item].plan.rule is None for row in rows],
                                       device=dev),
            z0=torch.stack([inversions[row.item].z0 for row in rows]).to(dev),
            trajectory=torch.stack([inversions[row.item].trajectory for row in rows], dim=1).to(dev),
        )
