"""dmquant.pipelines: trained miniatures, tiny test pipelines, the judge, and adapters for diffusers
(including dmquant as a diffusers quantization backend: `DmquantConfig`, registered on import).

>>> from dmquant.pipelines import load, generate, miniature_prompts, judge
>>> pipe = load("miniature-pixart")
>>> images = generate(pipe, miniature_prompts("miniature-pixart"), seed=0)   # (N, 3, 32, 32) in [0, 1]
>>> judge("miniature-pixart").adherence(images, miniature_prompts("miniature-pixart"))
"""
from dmquant.families import FAMILIES, family_of

from .data import make_images, make_videos, parse_prompt
from .generate import generate
from .judge import judge
from .loading import available, load
from .prompts import calibration_prompts, miniature_name, miniature_prompts
from .quantizer import DmquantConfig, register
from .tiny import build_tiny_pipeline

register()  # diffusers' from_pretrained then reads and writes quant_method "dmquant"

__all__ = ["load", "generate", "judge", "miniature_prompts", "build_tiny_pipeline", "family_of", "FAMILIES",
           "available", "make_images", "make_videos", "parse_prompt", "calibration_prompts", "miniature_name",
           "DmquantConfig"]
