"""Metrics: against a dataset or the prompts (FID, CLIP score) and against FP samples (PSNR, SSIM, LPIPS)."""
from .fid import FIDResult, fid, frechet_distance
from .similarity import lpips, psnr, ssim
from .video import (background_consistency, dynamic_degree, motion_smoothness, subject_consistency,
                    temporal_flickering, video_metrics)

__all__ = ["frechet_distance", "fid", "FIDResult", "psnr", "ssim", "lpips", "subject_consistency",
           "background_consistency", "temporal_flickering", "motion_smoothness", "dynamic_degree", "video_metrics"]
