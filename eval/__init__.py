"""dmquant.eval: what quantization cost, in numbers and pictures.

>>> from dmquant.eval import psnr, ssim, fid, frechet_distance, save_grid
>>> psnr(quantized_images, fp_images).mean()
"""
from .grid import html_report, image_grid, save_grid
from .metrics import (FIDResult, background_consistency, dynamic_degree, fid, frechet_distance, lpips,
                      motion_smoothness, psnr, ssim, subject_consistency, temporal_flickering, video_metrics)
from .metrics.clip import clip_score
from .prompts import load_prompts
from .regression import assert_quality, check_baseline, record_baseline
from .runner import EvalConfig, evaluate
from .table import format_table

__all__ = ["frechet_distance", "fid", "FIDResult", "psnr", "ssim", "lpips", "clip_score", "subject_consistency",
           "background_consistency", "temporal_flickering", "motion_smoothness", "dynamic_degree",
           "video_metrics", "image_grid", "save_grid", "html_report", "format_table", "EvalConfig", "evaluate",
           "load_prompts", "assert_quality", "check_baseline", "record_baseline"]
