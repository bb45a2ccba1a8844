"""dmquant.eval: what quantization cost, in numbers and pictures.

>>> from dmquant.eval import psnr, ssim, fid, frechet_distance, save_grid, format_table
>>> psnr(quantized_images, fp_images).mean()          # vs FP on the same seeds, dB, higher is better
>>> fid(quantized_images, real_images, extractor=judge("miniature-sd"))   # FIDResult(value, n_a, n_b, ...)
"""
from .grid import html_report, image_grid, save_grid
from .metrics import (
                      FIDResult,
                      background_consistency,
                      clip_score,
                      dynamic_degree,
                      fid,
                      frame_quality,
                      frechet_distance,
                      lpips,
                      motion_smoothness,
                      psnr,
                      ssim,
                      subject_consistency,
                      temporal_flickering,
                      video_metrics,
                      video_scores,
)
from .prompts import load_prompts
from .regression import assert_quality, check_baseline, record_baseline
from .runner import EvalConfig, evaluate
from .table import format_table

__all__ = ["frechet_distance", "fid", "FIDResult", "psnr", "ssim", "lpips", "clip_score", "subject_consistency",
           "background_consistency", "temporal_flickering", "motion_smoothness", "dynamic_degree", "frame_quality",
           "video_metrics", "video_scores", "image_grid", "save_grid", "html_report", "format_table", "EvalConfig",
           "evaluate", "load_prompts", "assert_quality", "check_baseline", "record_baseline"]
