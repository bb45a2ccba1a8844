"""dmquant.eval: what quantization cost, in numbers and pictures.

>>> from dmquant.eval import psnr, ssim, fid, frechet_distance, save_grid, format_table
>>> psnr(quantized_images, fp_images).mean()          # vs FP on the same seeds, dB, higher is better
>>> fid(quantized_images, real_images, extractor=judge("miniature-sd"))   # FIDResult(value, n_a, n_b, ...)
"""
from . import metrics
from .grid import html_report, image_grid, save_grid
from .metrics import *  # noqa: F403  (the metric functions, re-exported: metrics.__all__)
from .prompts import load_prompts
from .regression import assert_quality, check_baseline, record_baseline
from .runner import EvalConfig, evaluate
from .table import format_table

__all__ = [*metrics.__all__, "image_grid", "save_grid", "html_report", "format_table", "EvalConfig", "evaluate",
           "load_prompts", "assert_quality", "check_baseline", "record_baseline"]
