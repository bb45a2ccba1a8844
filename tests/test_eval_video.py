"""VBench-style metrics on synthetic videos with known answers."""
import torch

from dmquant.eval.metrics.video import (background_consistency, dynamic_degree, lucas_kanade, motion_smoothness,
                                        subject_consistency, temporal_flickering, video_metrics)
from dmquant.pipelines import make_videos


def square_video(step: float, frames: int = 6, size: int = 32) -> torch.Tensor:
    """A smooth (Gaussian) blob translating `step` px/frame to the right on a flat background."""
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    out = []
    for f in range(frames):
        blob = torch.exp(-((xs - 10 - step * f) ** 2 + (ys - 16) ** 2) / 18)
        out.append(torch.stack([blob, blob * 0.5, 0.2 + 0 * blob]))
    return torch.stack(out).unsqueeze(0).clamp(0, 1)


def test_static_video_is_perfectly_consistent_and_still():
    v = torch.rand(1, 1, 3, 16, 16).expand(2, 6, 3, 16, 16).contiguous()
    assert torch.allclose(subject_consistency(v), torch.ones(2))
    assert torch.allclose(temporal_flickering(v), torch.ones(2))
    assert torch.allclose(motion_smoothness(v), torch.ones(2))
    assert dynamic_degree(v).abs().max() == 0


def test_flicker_detected_and_linear_motion_is_smooth():
    v = torch.full((1, 6, 3, 16, 16), 0.5)
    v[:, 1::2] += 0.2  # whole-frame flicker: no static pixels except none -> scored on changing pixels
    noisy = torch.full((1, 6, 3, 16, 16), 0.5)
    noisy[:, 1::2, :, :8] += 0.01  # small flicker below the static threshold
    assert temporal_flickering(noisy) < 1 and temporal_flickering(noisy) > 0.99
    ramp = torch.linspace(0, 1, 6).view(1, 6, 1, 1, 1).expand(1, 6, 3, 8, 8)
    assert torch.allclose(motion_smoothness(ramp), torch.ones(1), atol=1e-6)  # linear change: exact interpolation
    assert motion_smoothness(v) < motion_smoothness(ramp)


def test_lucas_kanade_recovers_subpixel_translation():
    v = square_video(0.5).double()
    grey = v.mean(2, keepdim=True)[0]
    flow = lucas_kanade(grey[:1], grey[1:2])
    weight = (grey[1:2] - grey[:1]).abs()[:, 0] > 0.01
    u = (flow[:, 0][weight]).mean()
    assert abs(float(u) - 0.5) < 0.1 and abs(float(flow[:, 1][weight].mean())) < 0.05
    assert dynamic_degree(square_video(1.0)) > dynamic_degree(square_video(0.5)) > 0.2


def test_moving_shapes_scores():
    v = make_videos(4, seed=1).pixels
    m = video_metrics(v)
    assert 0.5 < m["subject_consistency"] <= 1 and m["background_consistency"] > 0.95
    assert m["temporal_flickering"] > 0.99 and m["dynamic_degree"] > 0.3
    shuffled = v[:, torch.randperm(v.shape[1])]
    assert motion_smoothness(shuffled).mean() < motion_smoothness(v).mean()
    assert background_consistency(v).shape == (4,)
