"""CLIP score with open_clip from a local checkpoint (never downloaded): 100 * max(cos(img, text), 0)."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

CLIP_ENV = "DMQUANT_CLIP_CHECKPOINT"


def score_from_features(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """Per-pair CLIP score (Hessel et al. 2021, as torchmetrics): 100 * max(cosine, 0)."""
    cos = (F.normalize(image_feats.double(), dim=-1) * F.normalize(text_feats.double(), dim=-1)).sum(-1)
    return (100 * cos.clamp(min=0)).float()


@lru_cache(maxsize=2)
def _load(model_name: str, checkpoint: str):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=checkpoint)
    return model.eval(), open_clip.get_tokenizer(model_name), preprocess


def clip_score(images: torch.Tensor, prompts: list[str], model_name: str = "ViT-B-32",
               checkpoint: str | os.PathLike | None = None) -> torch.Tensor:
    """Per-sample CLIP score of images (N, 3, H, W) in [0, 1] (videos: mean over frames) against prompts."""
    path = checkpoint or os.environ.get(CLIP_ENV)
    if not path or not Path(path).is_file():
        raise FileNotFoundError(f"CLIP score needs an open_clip checkpoint for {model_name}: pass checkpoint=<file> "
                                f"or set ${CLIP_ENV} (offline alternative: the judge's adherence)")
    model, tokenizer, preprocess = _load(model_name, str(path))
    frames = images.shape[1] if images.dim() == 5 else 1
    flat = images.flatten(0, 1) if images.dim() == 5 else images
    norm = next(t for t in preprocess.transforms if hasattr(t, "mean"))
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    x = F.interpolate(flat.float(), size=size, mode="bicubic", align_corners=False).clamp(0, 1)
    x = (x - torch.tensor(norm.mean).view(1, 3, 1, 1)) / torch.tensor(norm.std).view(1, 3, 1, 1)
    with torch.no_grad():
        img = model.encode_image(x)
        txt = model.encode_text(tokenizer(prompts)).repeat_interleave(frames, 0)
    return score_from_features(img, txt).reshape(-1, frames).mean(1)
