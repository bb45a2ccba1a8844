"""VBench-style video metrics that run offline on (N, F, 3, H, W) videos in [0, 1]; one value per video.

- subject_consistency: cos similarity of each frame's features to the first and previous frame
  (VBench: DINO; here any extractor, default zero-mean 8x8 thumbnails). [0, 1], higher is better.
- background_consistency: the same on whole-frame scene features (VBench: CLIP; default zero-mean 4x4
  colour layout). [0, 1], higher is better.
- temporal_flickering: 1 - mean |frame_t - frame_t-1| over static pixels, i.e. VBench's
  (255 - MAE) / 255. [0, 1], higher is better.
- motion_smoothness: 1 - mean |frame_t - flow-interpolated(frame_t-1, frame_t+1)| (VBench: AMT
  interpolator; here Lucas-Kanade). [0, 1], higher is better.
- dynamic_degree: mean Lucas-Kanade flow magnitude in pixels/frame over pixels that change (VBench:
  RAFT, thresholded). [0, inf), neither is better: compare with FP.
- frame_quality: PSNR (dB, higher better) and SSIM ([0, 1], higher better) of every frame against the
  FP video on the same seed.

Flow is a dense iterative Lucas-Kanade on Gaussian-smoothed grey frames: accurate to ~0.1 px for
displacements up to ~2 px on smooth content, which is what 16-64 px miniature videos show; larger
motion is underestimated (no pyramid).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from .similarity import psnr, ssim

STATIC_CHANGE = 0.05  # a pixel that never moves further than this from frame 0 is static
FLAT_GRADIENT = 0.01  # |grad| per pixel below which motion cannot change a pixel: any change is flicker
MOVING_CHANGE = 0.02  # |frame_t - frame_t-1| above which a pixel counts as moving for dynamic_degree


def _check(v: torch.Tensor, min_frames: int = 2) -> torch.Tensor:
    if v.dim() != 5 or v.shape[2] != 3:
        raise ValueError(f"videos must be (N, F, 3, H, W), got {tuple(v.shape)}")
    if v.shape[1] < min_frames:
        raise ValueError(f"this metric needs at least {min_frames} frames, got {v.shape[1]}")
    return v.double()


def _thumbnail_features(grid: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Zero-mean grid x grid colour thumbnails: their cosine is the frames' Pearson correlation."""
    def features(frames: torch.Tensor) -> torch.Tensor:
        f = F.adaptive_avg_pool2d(frames, grid).flatten(1)
        return f - f.mean(1, keepdim=True)
    return features


def _consistency(videos: torch.Tensor, extractor: Any) -> torch.Tensor:
    """VBench: mean over t >= 1 of (max(0, cos(f_t, f_t-1)) + max(0, cos(f_t, f_0))) / 2."""
    v = _check(videos)
    fn = extractor.features if hasattr(extractor, "features") else extractor
    n, f = v.shape[:2]
    feats = F.normalize(fn(v.flatten(0, 1).float()).double().reshape(n, f, -1), dim=-1)
    prev = (feats[:, 1:] * feats[:, :-1]).sum(-1).clamp(min=0)
    first = (feats[:, 1:] * feats[:, :1]).sum(-1).clamp(min=0)
    return ((prev + first) / 2).mean(1).float()


def subject_consistency(videos: torch.Tensor, extractor: Any = None) -> torch.Tensor:
    """Does the subject keep its look? [0, 1], higher is better; pass the judge's features when you have them."""
    return _consistency(videos, extractor or _thumbnail_features(8))


def background_consistency(videos: torch.Tensor, extractor: Any = None) -> torch.Tensor:
    """Does the scene layout stay put? [0, 1], higher is better."""
    return _consistency(videos, extractor or _thumbnail_features(4))


def _gaussian_blur(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    r = max(1, round(2.5 * sigma))
    g = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype) ** 2 / (2 * sigma**2))
    g = (g / g.sum()).to(x.device)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), g.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), g.view(1, 1, -1, 1))


def _gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences of (B, 1, H, W), replicate borders."""
    k = torch.tensor([-0.5, 0.0, 0.5], dtype=x.dtype, device=x.device)
    ix = F.conv2d(F.pad(x, (1, 1, 0, 0), mode="replicate"), k.view(1, 1, 1, 3))
    iy = F.conv2d(F.pad(x, (0, 0, 1, 1), mode="replicate"), k.view(1, 1, 3, 1))
    return ix, iy


def warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Sample x (B, C, H, W) at p + flow(p) (flow (B, 2, H, W) in pixels, x then y), borders replicated."""
    b, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
    px, py = xs.to(x.device) + flow[:, 0], ys.to(x.device) + flow[:, 1]
    grid = torch.stack([2 * px / max(w - 1, 1) - 1, 2 * py / max(h - 1, 1) - 1], -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def lucas_kanade(prev: torch.Tensor, nxt: torch.Tensor, window: int = 7, iterations: int = 4) -> torch.Tensor:
    """Dense iterative Lucas-Kanade flow (B, 2, H, W) from grey frames (B, 1, H, W): nxt(p + flow) ~ prev(p)."""
    prev, nxt = _gaussian_blur(prev.double()), _gaussian_blur(nxt.double())
    box = lambda t: F.avg_pool2d(F.pad(t, (window // 2,) * 4, mode="replicate"), window, stride=1)  # noqa: E731
    flow = torch.zeros(prev.shape[0], 2, *prev.shape[-2:], dtype=prev.dtype, device=prev.device)
    for _ in range(iterations):
        moved = warp(nxt, flow)
        ix, iy = _gradients((prev + moved) / 2)  # symmetric gradients: better conditioned for larger steps
        it = moved - prev
        a, b, c, d, e = box(ix * ix), box(ix * iy), box(iy * iy), box(ix * it), box(iy * it)
        det = a * c - b * b
        ok = det > 1e-10  # flat or 1-D texture: flow is unobservable there (aperture problem): no update
        du = torch.where(ok, (-c * d + b * e) / det.clamp(min=1e-10), torch.zeros_like(det))
        dv = torch.where(ok, (b * d - a * e) / det.clamp(min=1e-10), torch.zeros_like(det))
        flow = flow + torch.cat([du, dv], 1).clamp(-2, 2)  # damped: one step never jumps past the window
    return flow


def _grey(v: torch.Tensor) -> torch.Tensor:
    return v.mean(2, keepdim=True)  # (N, F, 1, H, W)


def temporal_flickering(videos: torch.Tensor) -> torch.Tensor:
    """Pixel change in static regions between consecutive frames; [0, 1], 1 = no flicker, higher is better.

    Static = never moves more than STATIC_CHANGE from frame 0 over the clip, or flat (smoothed gradient
    below FLAT_GRADIENT in both frames, where motion cannot change a pixel). A video without any static
    pixel is scored on all pixels, as VBench does.
    """
    v = _check(videos)
    n, f = v.shape[:2]
    still = ((v - v[:, :1]).abs().amax(dim=(1, 2)) <= STATIC_CHANGE)[:, None]  # (N, 1, H, W)
    ix, iy = _gradients(_gaussian_blur(_grey(v).flatten(0, 1)))
    textured = (ix.hypot(iy) >= FLAT_GRADIENT).reshape(n, f, *v.shape[-2:])
    textured = F.max_pool2d(textured.double(), 3, stride=1, padding=1) > 0  # motion spills one pixel over edges
    static = still | ~(textured[:, 1:] | textured[:, :-1])  # (N, F-1, H, W)
    static = torch.where(static.flatten(1).any(1).view(n, 1, 1, 1), static, torch.ones_like(static))
    diff = (v[:, 1:] - v[:, :-1]).abs().mean(2)
    return (1 - (diff * static).flatten(1).sum(1) / static.flatten(1).sum(1)).float()


def motion_smoothness(videos: torch.Tensor) -> torch.Tensor:
    """Error of predicting frame t from t-1 and t+1 by flow interpolation; [0, 1], higher is better."""
    v = _check(videos, 3)
    n, f = v.shape[:2]
    before, after = v[:, :-2].flatten(0, 1), v[:, 2:].flatten(0, 1)
    grey = _grey(v)
    flow = lucas_kanade(grey[:, :-2].flatten(0, 1), grey[:, 2:].flatten(0, 1))  # t-1 -> t+1
    # Halfway along the flow, assuming it is locally constant: p - flow/2 in t-1 and p + flow/2 in t+1.
    predicted = (warp(before, -flow / 2) + warp(after, flow / 2)) / 2
    err = (predicted - v[:, 1:-1].flatten(0, 1)).abs().flatten(1).mean(1)
    return (1 - err.reshape(n, f - 2).mean(1)).float()


def dynamic_degree(videos: torch.Tensor) -> torch.Tensor:
    """Mean flow magnitude (pixels/frame) over pixels that change; [0, inf), compare with FP."""
    v = _check(videos)
    grey = _grey(v)
    n, f = grey.shape[:2]
    flow = lucas_kanade(grey[:, :-1].flatten(0, 1), grey[:, 1:].flatten(0, 1))
    moving = ((grey[:, 1:] - grey[:, :-1]).abs().flatten(0, 1) > MOVING_CHANGE).double()
    per = (flow.norm(dim=1, keepdim=True) * moving).flatten(1).sum(1) / moving.flatten(1).sum(1).clamp(min=1)
    return per.reshape(n, f - 1).mean(1).float()


def frame_quality(videos: torch.Tensor, reference: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-frame PSNR (dB) and SSIM against the FP video on the same seed, each (N, F); higher is better."""
    v, ref = _check(videos, 1), _check(reference, 1)
    if v.shape != ref.shape:
        raise ValueError(f"video shapes differ: {tuple(v.shape)} vs FP {tuple(ref.shape)}")
    n, f = v.shape[:2]
    flat, flat_ref = v.flatten(0, 1), ref.flatten(0, 1)
    return {"frame_psnr": psnr(flat, flat_ref).reshape(n, f), "frame_ssim": ssim(flat, flat_ref).reshape(n, f)}


def video_scores(videos: torch.Tensor, extractor: Any = None, reference: torch.Tensor | None = None,
                 background_extractor: Any = None) -> dict[str, torch.Tensor]:
    """Every VBench-style metric per video (for intervals over prompts). `extractor` (e.g. the judge)
    serves subject consistency, `background_extractor` background consistency (default: scene layout,
    so the two differ); with `reference` (FP videos on the same seeds) also per-frame PSNR/SSIM vs FP."""
    out = {
        "subject_consistency": subject_consistency(videos, extractor),
        "background_consistency": background_consistency(videos, background_extractor),
        "temporal_flickering": temporal_flickering(videos),
        "motion_smoothness": motion_smoothness(videos),
        "dynamic_degree": dynamic_degree(videos),
    }
    if reference is not None:
        out.update({k: t.mean(1) for k, t in frame_quality(videos, reference).items()})
    return out


def video_metrics(videos: torch.Tensor, extractor: Any = None, reference: torch.Tensor | None = None,
                  background_extractor: Any = None) -> dict[str, float]:
    """`video_scores` averaged over the videos."""
    return {k: float(t.mean()) for k, t in video_scores(videos, extractor, reference, background_extractor).items()}
