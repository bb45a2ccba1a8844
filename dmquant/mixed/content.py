"""Content features of a denoiser output, for MixDQ's decoupled sensitivity.

MixDQ found that some layers move *what* an image shows (layout, objects: prompt adherence) while
others move *how clean* it looks, and that one output-error metric blurs the two. On the recorded
trajectory the final image does not exist yet, so content is read from the model's current guess of
it: the x0 prediction `(x_t - sqrt(1 - a_t) eps) / sqrt(a_t)` (DDPM-family schedulers), decoded by
the VAE and embedded by the miniature's judge (the classifier that scores adherence), or, without a
judge, the x0 latent low-passed (2x2 means: layout and colour, not texture).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

ContentFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def x0_prediction(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Predicted clean latent from an epsilon prediction; alpha_bar broadcast per sample."""
    a = alpha_bar.to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def _alpha_bar(scheduler: Any) -> torch.Tensor:
    alphas = getattr(scheduler, "alphas_cumprod", None)
    prediction = getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
    if alphas is None or prediction != "epsilon":
        raise ValueError(f"content sensitivity needs an epsilon-prediction DDPM-family scheduler; "
                         f"{type(scheduler).__name__} ({prediction}) is not one: use content='none'")
    return torch.as_tensor(alphas, dtype=torch.float64)


def latent_content(scheduler: Any) -> ContentFn:
    """(x_t, eps, timestep) -> low-passed x0 latent, flattened per sample."""
    alphas = _alpha_bar(scheduler)

    def features(x_t: torch.Tensor, eps: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        x0 = x0_prediction(x_t.double(), eps.double(), _lookup(alphas, timestep, x_t.shape[0]))
        pooled = F.avg_pool2d(x0.flatten(1, -3) if x0.dim() > 4 else x0, 2)
        return pooled.reshape(x_t.shape[0], -1)

    return features


def judge_content(pipe: Any, judge: Any) -> ContentFn:
    """(x_t, eps, timestep) -> the judge's penultimate features of the decoded x0 prediction."""
    alphas = _alpha_bar(pipe.scheduler)
    vae = pipe.vae
    factor = float(getattr(vae.config, "scaling_factor", 1.0))

    @torch.no_grad()
    def features(x_t: torch.Tensor, eps: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        x0 = x0_prediction(x_t.float(), eps.float(), _lookup(alphas, timestep, x_t.shape[0]).float())
        if x0.dim() == 5:  # video latents (B, C, F, H, W): judge frames stacked
            frames = x0.shape[2]
            images = vae.decode(x0.transpose(1, 2).flatten(0, 1) / factor).sample
            images = images.unflatten(0, (x0.shape[0], frames))
        else:
            images = vae.decode(x0 / factor).sample
        return judge.features(((images + 1) / 2).clamp(0, 1)).double()

    return features


def _lookup(alphas: torch.Tensor, timestep: torch.Tensor, batch: int) -> torch.Tensor:
    t = torch.as_tensor(timestep).reshape(-1).round().long().clamp(0, alphas.numel() - 1)
    return alphas[t].expand(batch) if t.numel() == 1 else alphas[t]
