"""Fréchet distance and FID with a pluggable feature extractor.

`frechet_distance` is ||mu_a - mu_b||^2 + Tr(Sa + Sb - 2 (Sa^1/2 Sb Sa^1/2)^1/2) in float64, computed
with symmetric eigendecompositions (stable where scipy's sqrtm of the non-symmetric Sa Sb can return
complex noise). Extractors: the miniature judge (offline, default for miniatures), any callable
`images -> (N, D)`, torchmetrics' Inception ("inception") or clean-fid's ("clean-fid") from local
weight files only.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)
INCEPTION_ENV = "DMQUANT_INCEPTION_WEIGHTS"
CLEANFID_ENV = "DMQUANT_CLEANFID_INCEPTION"


def _stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = feats.double()
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / max(f.shape[0] - 1, 1)


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) (lower is better, >= 0)."""
    if feats_a.dim() != 2 or feats_b.dim() != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with equal D, got {tuple(feats_a.shape)}, {tuple(feats_b.shape)}")
    if min(feats_a.shape[0], feats_b.shape[0]) < 2:
        raise ValueError("need at least 2 samples per set for a covariance")
    mu_a, sa = _stats(feats_a)
    mu_b, sb = _stats(feats_b)
    root_a = _sqrtm_psd(sa)
    cross = _sqrtm_psd(root_a @ sb @ root_a)  # Tr((Sa Sb)^1/2) = Tr((Sa^1/2 Sb Sa^1/2)^1/2)
    value = (mu_a - mu_b).pow(2).sum() + torch.trace(sa) + torch.trace(sb) - 2 * torch.trace(cross)
    return float(value.clamp(min=0))


@dataclass
class FIDResult:
    value: float
    n_a: int
    n_b: int
    extractor: str

    def __str__(self) -> str:
        return f"{self.value:.3f} (n={self.n_a}/{self.n_b}, {self.extractor})"


def resolve_extractor(extractor: Any, weights: str | os.PathLike | None = None) -> tuple[Callable, str]:
    """(images -> features, name) for a judge-like object, a callable, or a named Inception."""
    if hasattr(extractor, "features"):
        return extractor.features, type(extractor).__name__.lower()
    if callable(extractor):
        return extractor, getattr(extractor, "__name__", "custom")
    if extractor == "inception":
        return _torchmetrics_inception(weights), "inception"
    if extractor == "clean-fid":
        return _cleanfid_inception(weights), "clean-fid"
    raise ValueError(f"unknown extractor {extractor!r}: pass a judge, a callable, 'inception' or 'clean-fid'")


def _weights_file(given: str | os.PathLike | None, env: str, what: str) -> Path:
    path = given or os.environ.get(env)
    if not path or not Path(path).is_file():
        raise FileNotFoundError(f"{what} weights not found{f' at {path}' if path else ''}: pass the file path "
                                f"(weights=...) or set ${env}; dmquant never downloads them")
    return Path(path)


def _torchmetrics_inception(weights) -> Callable:
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                             feature_extractor_weights_path=str(_weights_file(weights, INCEPTION_ENV, "Inception")))
    return lambda images: net((images.clamp(0, 1) * 255).to(torch.uint8)).reshape(images.shape[0], -1)


def _cleanfid_inception(weights) -> Callable:
    path = _weights_file(weights, CLEANFID_ENV, "clean-fid Inception (TorchScript)")
    model = torch.jit.load(str(path), map_location="cpu").eval()

    def features(images: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(images.clamp(0, 1) * 255, size=(299, 299), mode="bilinear")
        return model(x, return_features=True).reshape(images.shape[0], -1)

    return features


@torch.no_grad()
def fid(images_a: torch.Tensor, images_b: torch.Tensor, extractor: Any, batch_size: int = 256,
        weights: str | os.PathLike | None = None) -> FIDResult:
    """FID between two image sets in [0, 1] (videos are judged frame by frame unless the extractor
    is a video judge). Warns when the sample count is too small for a stable covariance."""
    fn, name = resolve_extractor(extractor, weights)
    feats = [torch.cat([fn(c) for c in x.split(batch_size)]) for x in (images_a, images_b)]
    n_a, n_b = feats[0].shape[0], feats[1].shape[0]
    dim = feats[0].shape[1]
    if min(n_a, n_b) < 2 * dim:
        log.warning("FID from %d/%d samples of %d-D features is noisy (want >= %d): compare only at equal n",
                    n_a, n_b, dim, 2 * dim)
    return FIDResult(frechet_distance(*feats), n_a, n_b, name)
