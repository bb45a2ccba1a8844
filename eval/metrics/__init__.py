"""Metrics: against a dataset or the prompts (FID, CLIP score) and against FP samples (PSNR, SSIM, LPIPS),
plus VBench-style video metrics. Heavy optional packages load inside the functions that need them."""
from .clip import clip_score
from .fid import FIDResult, fid, frechet_distance
from .similarity import lpips, psnr, ssim
from .video import (
                    background_consistency,
                    dynamic_degree,
                    frame_quality,
                    motion_smoothness,
                    subject_consistency,
                    temporal_flickering,
                    video_metrics,
                    video_scores,
)

__all__ = ["frechet_distance", "fid", "FIDResult", "psnr", "ssim", "lpips", "clip_score", "subject_consistency",
           "background_consistency", "temporal_flickering", "motion_smoothness", "dynamic_degree", "frame_quality",
           "video_metrics", "video_scores"]
