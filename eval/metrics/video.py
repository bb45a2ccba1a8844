"""VBench-style video metrics that run offline on (N, F, 3, H, W) videos in [0, 1].

- subject_consistency: mean cosine similarity of each frame's features to the first and the previous
  frame (VBench uses DINO; any extractor here, the judge's per-frame features by default). [-1, 1], higher better.
- background_consistency: the same on frames with the moving foreground masked out (pixels that change
  over the clip), i.e. how stable the static scene stays. [-1, 1], higher better.
- temporal_flickering: (1 - mean |frame_t - frame_t-1| over static pixels); 1 = no flicker. [0, 1], higher better.
- motion_smoothness: 1 - mean |frame_t - (frame_t-1 + frame_t+1) / 2| (error of linear frame
  interpolation, VBench uses a learned interpolator). [0, 1], higher better.
- dynamic_degree: mean optical-flow magnitude in pixels per frame (Lucas-Kanade on a coarse grid),
  how much moves. [0, inf), neither direction is better: compare with FP.
- frame_psnr / frame_ssim vs FP: per-frame image quality against the FP video (see similarity).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def _check(v: torch.Tensor) -> torch.Tensor:
    if v.dim() != 5 or v.shape[2] != 3:
        raise ValueError(f"videos must be (N, F, 3, H, W), got {tuple(v.shape)}")
    if v.shape[1] < 3:
        raise ValueError("video metrics need at least 3 frames")
    return v.double()


def _cos_to_first_and_previous(feats: torch.Tensor) -> torch.Tensor:
    """feats (N, F, D) -> (N,) mean of cos(f_t, f_0) and cos(f_t, f_t-1) over t >= 1."""
    f = F.normalize(feats.double(), dim=-1)
    first = (f[:, 1:] * f[:, :1]).sum(-1)
    prev = (f[:, 1:] * f[:, :-1]).sum(-1)
    return ((first + prev) / 2).mean(1)


def _pixel_features(frames: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(frames, 4).flatten(1)


def subject_consistency(videos: torch.Tensor, extractor: Callable | None = None) -> torch.Tensor:
    v = _check(videos)
    fn = extractor or _pixel_features
    n, f = v.shape[:2]
    feats = fn(v.flatten(0, 1).float()).reshape(n, f, -1)
    return _cos_to_first_and_previous(feats).float()


def static_mask(videos: torch.Tensor, threshold: float = 0.05) -> torch.Tensor:
    """(N, 1, 1, H, W) True where a pixel never changes by more than `threshold` over the clip."""
    v = _check(videos)
    change = (v - v[:, :1]).abs().amax(dim=(1, 2))
    return (change <= threshold)[:, None, None]


def background_consistency(videos: torch.Tensor, extractor: Callable | None = None) -> torch.Tensor:
    v = _check(videos)
    mask = static_mask(v)
    return subject_consistency(v * mask, extractor)


def temporal_flickering(videos: torch.Tensor) -> torch.Tensor:
    v = _check(videos)
    mask = static_mask(v).expand_as(v[:, 1:])
    diff = (v[:, 1:] - v[:, :-1]).abs()
    per_video = (diff * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1)
    return (1 - per_video).float()


def motion_smoothness(videos: torch.Tensor) -> torch.Tensor:
    v = _check(videos)
    err = (v[:, 1:-1] - (v[:, :-2] + v[:, 2:]) / 2).abs()
    return (1 - err.flatten(1).mean(1)).float()


def lucas_kanade(prev: torch.Tensor, nxt: torch.Tensor, window: int = 5) -> torch.Tensor:
    """Dense Lucas-Kanade flow (B, 2, H, W) between grey frames (B, 1, H, W) in float64."""
    kx = torch.tensor([[[[-0.5, 0.0, 0.5]]]], dtype=prev.dtype)
    ix = F.conv2d(F.pad(prev, (1, 1, 0, 0), mode="replicate"), kx)
    iy = F.conv2d(F.pad(prev, (0, 0, 1, 1), mode="replicate"), kx.transpose(-1, -2))
    it = nxt - prev
    box = lambda t: F.avg_pool2d(F.pad(t, (window // 2,) * 4, mode="replicate"), window, stride=1)  # noqa: E731
    a, b, c = box(ix * ix), box(ix * iy), box(iy * iy)
    d, e = box(ix * it), box(iy * it)
    det = a * c - b * b
    ok = det > 1e-9
    u = torch.where(ok, (-c * d + b * e) / det.clamp(min=1e-9), torch.zeros_like(det))
    w = torch.where(ok, (b * d - a * e) / det.clamp(min=1e-9), torch.zeros_like(det))
    return torch.cat([u, w], 1)


def dynamic_degree(videos: torch.Tensor) -> torch.Tensor:
    """Mean flow magnitude (pixels/frame) over pixels that move (textured, changing), per video."""
    v = _check(videos)
    grey = v.mean(2, keepdim=True)  # (N, F, 1, H, W)
    n, f = grey.shape[:2]
    flow = lucas_kanade(grey[:, :-1].flatten(0, 1), grey[:, 1:].flatten(0, 1))
    mag = flow.norm(dim=1)
    moving = (grey[:, 1:] - grey[:, :-1]).abs().flatten(0, 1)[:, 0] > 0.02
    per = (mag * moving).flatten(1).sum(1) / moving.flatten(1).sum(1).clamp(min=1)
    return per.reshape(n, f - 1).mean(1).float()


def video_metrics(videos: torch.Tensor, extractor: Callable | None = None) -> dict[str, float]:
    """All no-reference VBench-style metrics, averaged over the videos."""
    return {
        "subject_consistency": float(subject_consistency(videos, extractor).mean()),
        "background_consistency": float(background_consistency(videos, extractor).mean()),
        "temporal_flickering": float(temporal_flickering(videos).mean()),
        "motion_smoothness": float(motion_smoothness(videos).mean()),
        "dynamic_degree": float(dynamic_degree(videos).mean()),
    }
