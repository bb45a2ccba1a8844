"""dmquant: quantize diffusion models (UNet and DiT, image and video) and measure what it cost.

>>> import dmquant
>>> pipe = dmquant.quantize(pipe, "w8a8")     # any diffusers pipeline with .unet/.transformer
>>> print(dmquant.report(pipe))
>>> dmquant.save_quantized(pipe, "out/")
>>> pipe = dmquant.load_quantized("out/")

The top level holds the verbs and the recipe types a user writes; everything else lives in its
module (`dmquant.formats`, `dmquant.observe`, `dmquant.state`, `dmquant.timestep`, ...), and the
diffusers integration (`DmquantConfig` for `from_pretrained`) in `dmquant.pipelines`.
"""
from .api import quantize
from .apply import hold_codes, pack_weights
from .config import AttentionSpec, Override, QuantSpec, Recipe
from .nn import quantization_disabled
from .recipes import get_recipe, recipes
from .report import report
from .serialization import load_quantized, save_quantized
from .transforms import merge_lora, unmerge_lora

__version__ = "0.1.0"
__all__ = [
    "quantize", "pack_weights", "hold_codes", "report", "save_quantized", "load_quantized", "merge_lora",
    "unmerge_lora", "quantization_disabled", "recipes", "get_recipe", "Recipe", "QuantSpec", "AttentionSpec",
    "Override",
]
