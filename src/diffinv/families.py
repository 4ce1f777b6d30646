"""Kept for imports (``from diffinv.families import ...``): the model families now live in :mod:`diffinv.models`,
one module per family (models/sd.py, sdxl.py, sd3.py, flux.py), their interface and shared helpers in
models/family.py, the ε/v-prediction and rectified-flow bases in models/diffusion.py and models/flow.py, and
detection (``family_of`` over the registry ``FAMILIES``) in models/detect.py."""

from .models import (FAMILIES, Diffusion, Family, Flow, Flux, StableDiffusion, StableDiffusion3, StableDiffusionXL,
                     calculate_shift, family_of, first_line, model_index)

__all__ = ["FAMILIES", "Diffusion", "Family", "Flow", "Flux", "StableDiffusion", "StableDiffusion3",
           "StableDiffusionXL", "calculate_shift", "family_of", "first_line", "model_index"]
