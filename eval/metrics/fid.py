"""Fréchet distance and FID with a pluggable feature extractor.

`frechet_distance` is ||mu_a - mu_b||^2 + Tr(Sa + Sb - 2 (Sa^1/2 Sb Sa^1/2)^1/2) in float64, computed
with symmetric eigendecompositions (stable where scipy's sqrtm of the non-symmetric Sa Sb can return
complex noise). Extractors: the miniature judge (any object with `.features`, offline), any callable
`images -> (N, D)`, torchmetrics' Inception ("inception", needs torch-fidelity) or clean-fid's TorchScript
Inception ("clean-fid"), both from local weight files only: dmquant never downloads weights.
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
# The file names each library downloads to its cache; we only look there, never fetch.
TORCH_FIDELITY_FILE = "pt_inception-2015-12-05-6726825d.pth"
CLEANFID_FILE = "inception-2015-12-05.pt"
MIN_SAMPLES = 50  # below this (or below 2 x feature dim) the covariance estimate dominates the value


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
        raise ValueError(f"feature sets must be (N, D) with equal D, got {tuple(feats_a.shape)}, "
                         f"{tuple(feats_b.shape)}")
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
    """FID value with the sample counts it came from: report them together."""
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
        return extractor, getattr(extractor, "__name__", type(extractor).__name__.lower())
    if extractor == "inception":
        return _torchmetrics_inception(weights), "inception"
    if extractor == "clean-fid":
        return _cleanfid_inception(weights), "clean-fid"
    raise ValueError(f"unknown extractor {extractor!r}: pass a judge, a callable, 'inception' or 'clean-fid'")


def _weights_file(given: str | os.PathLike | None, env: str, cached: Path, what: str) -> Path:
    """The first of: the argument, $env, the library's own cache file; else a FileNotFoundError."""
    for path in (given, os.environ.get(env), cached):
        if path and Path(path).is_file():
            return Path(path)
    tried = ", ".join(str(p) for p in (given, os.environ.get(env), cached) if p)
    raise FileNotFoundError(f"{what} weights not found (looked at {tried}): pass weights=<file> (CLI: "
                            f"--inception-weights) or set ${env}; dmquant never downloads them")


def _torch_home() -> Path:
    return Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))


def _torchmetrics_inception(weights: str | os.PathLike | None) -> Callable:
    path = _weights_file(weights, INCEPTION_ENV, _torch_home() / "hub" / "checkpoints" / TORCH_FIDELITY_FILE,
                         f"torch-fidelity Inception ({TORCH_FIDELITY_FILE})")
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise ImportError("extractor='inception' uses torchmetrics' FID Inception, which needs torch-fidelity "
                          "(pip install torch-fidelity, with torchvision already installed); or use "
                          f"extractor='clean-fid' with ${CLEANFID_ENV}")
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:  # torch-fidelity unpickles the file without restriction: accept only a plain tensor state dict
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a plain PyTorch state dict of torch-fidelity's Inception: {err}") from err
    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                             feature_extractor_weights_path=str(path))
    # torchmetrics feeds uint8 images and resizes to 299 inside, as torch-fidelity does.
    return lambda images: net((images.clamp(0, 1) * 255).round().to(torch.uint8)).reshape(images.shape[0], -1)


def _cleanfid_inception(weights: str | os.PathLike | None) -> Callable:
    """clean-fid's 'clean' mode: uint8 images, PIL bicubic resize to 299 in float, TorchScript Inception."""
    import tempfile

    from cleanfid.fid import get_batch_features
    from cleanfid.resize import build_resizer

    path = _weights_file(weights, CLEANFID_ENV, Path(tempfile.gettempdir()) / CLEANFID_FILE,
                         f"clean-fid Inception TorchScript ({CLEANFID_FILE})")
    layers = torch.jit.load(str(path), map_location="cpu").eval().layers
    resize = build_resizer("clean")

    def model(x: torch.Tensor) -> torch.Tensor:  # clean-fid InceptionV3W.forward without its download step
        return layers.forward((x - 128) / 128).reshape(x.shape[0], -1)

    def features(images: torch.Tensor) -> torch.Tensor:
        arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        batch = torch.stack([torch.from_numpy(resize(a)).permute(2, 0, 1) for a in arrays])
        return torch.from_numpy(get_batch_features(batch, model, torch.device("cpu")))

    return features


@torch.no_grad()
def fid(images_a: torch.Tensor, images_b: torch.Tensor, extractor: Any, batch_size: int = 256,
        weights: str | os.PathLike | None = None) -> FIDResult:
    """FID between two image sets in [0, 1] (lower is better, 0 = same feature statistics).

    `extractor`: a judge (`.features`), any callable `images -> (N, D)`, "inception" or "clean-fid".
    Videos (N, F, 3, H, W) go to a callable as they are (a video judge); the named Inceptions see every
    frame as an image. Warns when the sample count is too small for a stable covariance.

    >>> fid(quantized, fp, extractor=judge("miniature-sd")).value
    """
    fn, name = resolve_extractor(extractor, weights)
    if isinstance(extractor, str) and images_a.dim() == 5:
        images_a, images_b = images_a.flatten(0, 1), images_b.flatten(0, 1)
    feats = [torch.cat([fn(c) for c in x.split(batch_size)]) for x in (images_a, images_b)]
    n_a, n_b = feats[0].shape[0], feats[1].shape[0]
    dim = feats[0].shape[1]
    if min(n_a, n_b) < max(2 * dim, MIN_SAMPLES):
        log.warning("FID from %d/%d samples of %d-D features is noisy (want >= %d): compare only at equal n",
                    n_a, n_b, dim, max(2 * dim, MIN_SAMPLES))
    return FIDResult(frechet_distance(*feats), n_a, n_b, name)
