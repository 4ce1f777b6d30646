"""DDIM inversion with classifier-free guidance: the baseline of the NPI paper (its Table 1, first row)."""

from __future__ import annotations

from .base import InversionMethod


class DDIMInversion(InversionMethod):
    """DDIM inversion at w = 1, then sampling under CFG with the null prompt "" as the unconditional branch.

    At w > 1 the reconstruction drifts from the image (the error NTI and NPI remove); at w = 1 it is exact up to
    DDIM's discretisation.
    """

    method_name = "ddim"

