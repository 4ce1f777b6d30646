"""DirectInversion (Ju et al. 2024, "PnP Inversion: boosting diffusion-based editing with 3 lines of code"): DDIM
inversion at w = 1; while sampling under CFG, the source branch is put back onto the inversion trajectory after
every step by adding the difference z*_{t-1} - z~_{t-1} (their Alg. 1; nothing is optimised), and the target
branches run free. With Prompt-to-Prompt the edits then read their attention from the exact source branch.
"""

from __future__ import annotations

from .ddim import DDIMInversion


class DirectInversion(DDIMInversion):
    """DirectInversion: DDIM inversion at w = 1, CFG sampling with the null prompt, the source (reconstruction)
    row snapped back onto its trajectory after each step, so it returns z*_0 exactly at any w; the edit rows are
    DDIM + CFG from z*_N. The record is the DDIM trajectory (the offsets are computed while sampling: the
    reference code precomputes them with N extra CFG calls; they are the same numbers, since the source branch's
    step from z*_t is the same computation both times)."""

    method_name = "direct_inversion"

    def snaps_source(self) -> bool:
        return True
