"""VQ4DiT-style vector quantization of weights (Deng et al. 2024): every `dim` consecutive input weights
of a row form a sub-vector, replaced by one of 2**(bits*dim) codewords of a per-layer codebook.

1. k-means (Lloyd, k-means++ seeding) on the layer's sub-vectors gives the codebook and assignments.
2. Calibration relaxes each assignment to a softmax over its `candidates` nearest codewords (VQ4DiT's
   candidate set) and trains those ratios and the codebook on the layer-output error
   tr(E H E^T) (E = soft weight - W, H = 2 X X^T / n from the calibration inputs, as GPTQ uses). An
   entropy penalty that grows over the run pushes every ratio vector to one-hot; the argmax is kept.
3. The codebook is refitted to the hard assignments; the result with the lower output error of
   k-means-only and calibrated assignments is returned (calibration can only help).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..transforms.layer import replace_weight
from .hessian import HessianCollector, weight_layers

log = logging.getLogger(__name__)


@dataclass
class VQResult:
    weight: torch.Tensor  # (out, in) decoded weight
    codebook: torch.Tensor  # (2**(bits*dim), dim)
    codes: torch.Tensor  # (out, ceil(in / dim)) int64 codeword index per sub-vector
    loss: float  # tr(E H E^T) / tr(W H W^T): relative output error of the layer on the calibration data
    kmeans_loss: float  # the same for the k-means assignments alone


@dataclass
class VQCodes:
    """What a packed VQ layer stores: codebook and one index per sub-vector (bits * dim bits each)."""

    codebook: torch.Tensor
    codes: torch.Tensor
    bits: int
    dim: int

    def decode(self, n_in: int) -> torch.Tensor:
        return from_subvectors(self.codebook[self.codes], n_in)


def to_subvectors(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """(out, in) -> (out, ceil(in / dim), dim), zero-padding the last sub-vector of each row."""
    pad = -weight.shape[1] % dim
    return torch.nn.functional.pad(weight, (0, pad)).reshape(weight.shape[0], -1, dim)


def from_subvectors(sub: torch.Tensor, n_in: int) -> torch.Tensor:
    return sub.reshape(sub.shape[0], -1)[:, :n_in]


def kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on rows of x (n, d) with k-means++ seeding; returns (centroids (k, d), labels (n,)).
    With k >= n every row is its own centroid (the unused ones repeat rows)."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    if k >= n:
        idx = torch.arange(k) % n
        return x[idx].clone(), torch.arange(n)
    centroids = x[torch.randint(n, (1,), generator=g)]
    d2 = torch.cdist(x, centroids).squeeze(1) ** 2
    for _ in range(1, k):  # k-means++: next seed drawn proportional to squared distance
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / n)
        nxt = x[torch.multinomial(p, 1, generator=g)]
        centroids = torch.cat([centroids, nxt])
        d2 = torch.minimum(d2, ((x - nxt) ** 2).sum(1))
    labels = torch.cdist(x, centroids).argmin(1)
    for _ in range(iters):
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).unsqueeze(1).to(x.dtype)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)  # empty clusters stay
        new = torch.cdist(x, centroids).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return centroids, labels


def _output_error(w_hat: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    e = w_hat - w
    return ((e @ h) * e).sum()


def _refit_codebook(codes: torch.Tensor, codebook: torch.Tensor, h: torch.Tensor, n_in: int, w: torch.Tensor,
                    steps: int, lr: float) -> torch.Tensor:
    """Codewords that minimise the output error for fixed assignments (a few Adam steps)."""
    cb = codebook.clone().requires_grad_(True)
    opt = torch.optim.Adam([cb], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = _output_error(from_subvectors(cb[codes], n_in), w, h)
        loss.backward()
        opt.step()
    return cb.detach()


def vector_quantize(weight: torch.Tensor, hessian: torch.Tensor | None, bits: int = 2, dim: int = 4,
                    candidates: int = 8, iters: int = 300, lr: float = 1e-2, entropy_weight: float = 1e-2,
                    seed: int = 0) -> VQResult:
    """Vector-quantize a 2-D weight (out, in) at `bits` bits per weight with `dim`-long sub-vectors.
    Without a Hessian (no calibration data) the identity is used: plain weight error."""
    if weight.dim() != 2:
        raise ValueError(f"vector_quantize takes a 2-D weight view, got shape {tuple(weight.shape)}")
    if bits * dim > 16:
        raise ValueError(f"codebook of 2**{bits * dim} entries is too large: use bits * dim <= 16")
    w = weight.detach().float()
    n_in = w.shape[1]
    h = torch.eye(n_in) if hessian is None else hessian.detach().float()
    h = h + 1e-6 * torch.diag(h).mean().clamp_min(1e-12) * torch.eye(n_in)  # damp: dead inputs still cost a little
    norm = _output_error(torch.zeros_like(w), w, h).clamp_min(1e-30)
    sub = to_subvectors(w, dim)
    k = 2 ** (bits * dim)
    codebook, labels = kmeans(sub.reshape(-1, dim), k, seed=seed)
    km_codes = labels.reshape(sub.shape[:2])
    km_loss = float(_output_error(from_subvectors(codebook[km_codes], n_in), w, h) / norm)
    best = VQResult(from_subvectors(codebook[km_codes], n_in), codebook, km_codes, km_loss, km_loss)
    if iters <= 0 or k <= 1:
        return _cast(best, weight.dtype)

    # Candidate set: each sub-vector's `candidates` nearest codewords, ratios start near one-hot.
    c = min(candidates, k)
    dist = torch.cdist(sub.reshape(-1, dim), codebook)
    cand = dist.topk(c, largest=False).indices.reshape(*sub.shape[:2], c)
    flat_cand = cand.reshape(-1, c)
    logits = torch.zeros(cand.shape)
    logits[..., 0] = math.log(4 * c)  # the k-means choice starts with 80 % of the weight
    logits.requires_grad_(True)
    cb = codebook.clone().requires_grad_(True)
    opt = torch.optim.Adam([{"params": [logits], "lr": lr * 10}, {"params": [cb], "lr": lr * w.abs().mean().item()}])
    for it in range(iters):
        opt.zero_grad()
        ratios = torch.softmax(logits, -1)
        # Ratios scattered into a dense (sub-vectors, codewords) matrix: a matmul, whose backward is
        # far cheaper on CPU than the scatter-add an indexed gather cb[cand] needs.
        mix = torch.zeros(flat_cand.shape[0], k).scatter(1, flat_cand, ratios.reshape(-1, c))
        soft = (mix @ cb).reshape(sub.shape)
        loss = _output_error(from_subvectors(soft, n_in), w, h) / norm
        entropy = -(ratios * torch.log(ratios.clamp_min(1e-12))).sum(-1).mean()
        (loss + entropy_weight * (it / iters) * entropy).backward()
        opt.step()
    pick = torch.softmax(logits.detach(), -1).argmax(-1, keepdim=True)
    codes = cand.gather(-1, pick).squeeze(-1)
    cb = _refit_codebook(codes, cb.detach(), h / norm, n_in, w, steps=max(iters // 4, 1),
                         lr=lr * w.abs().mean().item())
    decoded = from_subvectors(cb[codes], n_in)
    loss = float(_output_error(decoded, w, h) / norm)
    if loss < best.loss:
        best = VQResult(decoded, cb, codes, loss, km_loss)
    return _cast(best, weight.dtype)


def _cast(r: VQResult, dtype: torch.dtype) -> VQResult:
    r.weight = r.weight.to(dtype)
    return r


def apply_vq(modules: list[nn.Module], run: Callable[[], Any], bits: int = 2, dim: int = 4, candidates: int = 8,
             iters: int = 300, lr: float = 1e-2) -> dict[str, float]:
    """Recipe step `vq`: vector-quantize every weight-quantized Linear/Conv2d of `modules`, calibrated
    on the Hessians of one run. The layer's scalar weight quantizer is dropped: its weight now lies on
    the codebook (`layer.vq` keeps codebook and indices; save_quantized cannot store them yet).
    Returns the relative output error per layer."""
    layers = weight_layers(modules)
    with HessianCollector(layers) as hc, torch.no_grad():
        run()
    losses = {}
    for name, layer in tqdm(layers.items(), desc="vq", unit="layer", disable=None):
        w = layer.weight
        result = vector_quantize(w.detach().reshape(w.shape[0], -1), hc.hessians.get(name), bits, dim, candidates,
                                 iters, lr)
        replace_weight(layer, result.weight)
        layer.weight_quantizer = None
        layer.vq = VQCodes(result.codebook, result.codes, bits, dim)  # for a packed format (not stored yet)
        losses[name] = result.loss
        log.debug("vq %s: output error %.4g (k-means alone %.4g)", name, result.loss, result.kmeans_loss)
    return losses
