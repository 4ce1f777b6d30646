"""DDIM inversion with classifier-free guidance: the baseline of the NPI paper (its Table 1, first row)."""

from __future__ import annotations

from torch import Tensor

from .base import InversionMethod
from .record import Inversion


class DDIMInversion(InversionMethod):
    """DDIM inversion at w = 1, then sampling under CFG with the null prompt "" as the unconditional branch.

    At w > 1 the reconstruction drifts from the image (the error NTI and NPI remove); at w = 1 it is exact up to
    DDIM's discretisation.
    """

    method_name = "ddim"

    def unconditional(self, inversion: Inversion) -> Tensor:
        if inversion.unconditional is not None:
            return inversion.unconditional
        return self.backbone.encode_prompts([""])[0]  # the null-text embedding (NPI eq. 1)
