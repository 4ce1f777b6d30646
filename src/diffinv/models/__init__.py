"""The model families, one module each (sd.py, sdxl.py, sd3.py, flux.py), behind the interface of family.py
(:class:`Family` and the helpers the families share); diffusion.py and flow.py are the ε/v-prediction and the
rectified-flow bases; detect.py tells a model's family from the registry :data:`FAMILIES`. Adding a family: its
module and its line in ``FAMILIES``."""

from .conditioning import Conditioning, Segment, TextLayout
from .detect import FAMILIES, family_of
from .diffusion import Diffusion
from .family import Family, first_line, model_index
from .flow import Flow, calculate_shift
from .flux import Flux
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL

__all__ = ["FAMILIES", "Conditioning", "Diffusion", "Family", "Flow", "Flux", "Segment", "StableDiffusion",
           "StableDiffusion3", "StableDiffusionXL", "TextLayout", "calculate_shift", "family_of", "first_line", "model_index"]
