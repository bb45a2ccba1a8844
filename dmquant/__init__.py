"""dmquant: quantize diffusion models (UNet and DiT, image and video) and measure what it cost.

>>> import dmquant
>>> pipe = dmquant.quantize(pipe, "w8a8")     # any diffusers pipeline with .unet/.transformer
>>> print(dmquant.report(pipe))
>>> dmquant.save_quantized(pipe, "out/")
>>> pipe = dmquant.load_quantized("out/")
"""
from .api import quantize
from .observe import observing
from .plans import LayerPlan
from .state import QuantState
from .config import AttentionSpec, Override, QuantSpec, Recipe
from .formats import get_format, list_formats
from .granularity import PerChannel, PerGroup, PerTensor, PerToken
from .nn import quantization_disabled
from .observers import parse_observer
from .primitives import fake_quantize
from .recipes import get_recipe, recipes
from .report import report
from .serialization import load_quantized, save_quantized
from .timestep import current_noise_level, noise_level
from .transforms import merge_lora, unmerge_lora

__version__ = "0.1.0"
__all__ = [
    "quantize", "recipes", "get_recipe", "report", "save_quantized", "load_quantized", "observing",
    "Recipe", "QuantSpec", "AttentionSpec", "Override", "LayerPlan", "QuantState",
    "get_format", "list_formats", "fake_quantize", "PerTensor", "PerChannel", "PerGroup", "PerToken",
    "quantization_disabled", "parse_observer", "noise_level", "current_noise_level", "merge_lora", "unmerge_lora",
]
