"""CLIP score (Hessel et al. 2021): 100 * max(cos(image, text), 0), in [0, 100], higher is better.

Two local backends, never a download: an open_clip checkpoint file (`checkpoint="ViT-B-32.pt"` or
`.safetensors`, with `model_name` its open_clip architecture) or a Hugging Face CLIP folder
(`checkpoint="clip-vit-base-patch32/"`, scored by torchmetrics' CLIPScore). Offline prompt adherence
without any CLIP is the miniature judge's own `judge.adherence(images, prompts)`.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

CLIP_ENV = "DMQUANT_CLIP_CHECKPOINT"


def score_from_features(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """Per-pair CLIP score, as torchmetrics defines it: 100 * max(cosine, 0)."""
    cos = (F.normalize(image_feats.double(), dim=-1) * F.normalize(text_feats.double(), dim=-1)).sum(-1)
    return (100 * cos.clamp(min=0)).float()


def _resize_center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """open_clip's eval transform on tensors: bicubic resize of the short side, then a centre crop."""
    scale = max(size[0] / x.shape[-2], size[1] / x.shape[-1])
    h, w = round(x.shape[-2] * scale), round(x.shape[-1] * scale)
    x = F.interpolate(x.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=scale < 1)
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    return x[..., top:top + size[0], left:left + size[1]].clamp(0, 1)


@lru_cache(maxsize=2)
def _open_clip(model_name: str, checkpoint: str) -> tuple[Any, Any, Any]:
    import open_clip  # a local checkpoint; a tokenizer that lives on the hub needs HF_HUB_OFFLINE=1 offline

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=checkpoint)
    return model.eval(), open_clip.get_tokenizer(model_name), preprocess


@torch.no_grad()
def _open_clip_features(images: torch.Tensor, prompts: list[str], model_name: str,
                        checkpoint: str) -> tuple[torch.Tensor, torch.Tensor]:
    model, tokenizer, preprocess = _open_clip(model_name, checkpoint)
    norm = next(t for t in preprocess.transforms if hasattr(t, "mean"))
    size = model.visual.image_size
    x = _resize_center_crop(images, tuple(size) if isinstance(size, (tuple, list)) else (size, size))
    x = (x - torch.tensor(norm.mean).view(1, 3, 1, 1)) / torch.tensor(norm.std).view(1, 3, 1, 1)
    return model.encode_image(x), model.encode_text(tokenizer(prompts))


class _PooledCLIP(torch.nn.Module):
    """transformers 5 returns output objects from get_*_features; torchmetrics 1.9 expects tensors
    (torchmetrics issue 3407): hand it the projected `.pooler_output`."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


@lru_cache(maxsize=2)
def _hf_clip(folder: str) -> tuple[_PooledCLIP, Any]:
    from transformers import CLIPModel, CLIPProcessor

    return (_PooledCLIP(CLIPModel.from_pretrained(folder, local_files_only=True).eval()),  # never waits on a hub
            CLIPProcessor.from_pretrained(folder, local_files_only=True))


@torch.no_grad()
def _hf_scores(images: torch.Tensor, prompts: list[str], folder: str) -> torch.Tensor:
    from torchmetrics.functional.multimodal import clip_score as tm_clip_score

    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)  # torchmetrics' processors expect 0..255
    loader = lambda: _hf_clip(folder)  # noqa: E731  (torchmetrics calls it on every call: cached)
    # torchmetrics averages over its batch before clamping at 0: one pair per call keeps scores per sample.
    return torch.stack([tm_clip_score(img, text, model_name_or_path=loader).float()
                        for img, text in zip(pixels, prompts)])


def clip_checkpoint(checkpoint: str | os.PathLike | None = None) -> Path:
    """The local CLIP checkpoint to use (argument, else $DMQUANT_CLIP_CHECKPOINT), or a
    FileNotFoundError: an evaluation checks this before it generates anything."""
    path = checkpoint or os.environ.get(CLIP_ENV)
    if not path or not Path(path).exists():
        raise FileNotFoundError(f"CLIP score needs a local checkpoint{f' (not found: {path})' if path else ''}: "
                                f"pass checkpoint=<open_clip file or Hugging Face CLIP folder> (CLI: "
                                f"--clip-checkpoint) or set ${CLIP_ENV}; offline alternative: the judge's adherence")
    return Path(path)


def clip_score(images: torch.Tensor, prompts: list[str], model_name: str = "ViT-B-32",
               checkpoint: str | os.PathLike | None = None) -> torch.Tensor:
    """Per-sample CLIP score of images (N, 3, H, W) in [0, 1] against their prompts; videos
    (N, F, 3, H, W) score the mean over frames. `checkpoint`: an open_clip file for `model_name`, or
    a Hugging Face CLIP folder; default $DMQUANT_CLIP_CHECKPOINT.

    >>> clip_score(images, prompts, checkpoint="ViT-B-32-laion2b.safetensors").mean()
    """
    path = clip_checkpoint(checkpoint)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"need one prompt per sample: {images.shape[0]} samples, {len(prompts)} prompts")
    frames = images.shape[1] if images.dim() == 5 else 1
    flat = images.flatten(0, 1) if images.dim() == 5 else images
    texts = [p for p in prompts for _ in range(frames)]
    if Path(path).is_dir():
        scores = _hf_scores(flat, texts, str(path))
    else:
        img, txt = _open_clip_features(flat, prompts, model_name, str(path))
        scores = score_from_features(img, txt.repeat_interleave(frames, 0))
    return scores.reshape(-1, frames).mean(1)
