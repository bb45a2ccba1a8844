"""Orthogonal matrices for rotations: block-diagonal Hadamard (deterministic, never stored),
Haar-random orthogonal, and the full Kronecker rotation R (x) H for widths that are not a power of two
(n = m * b, b the largest power of two dividing n: every channel mixes with every other, as a full
Hadamard does for n = 2^k, at the storage of an m x m matrix). Pure tensor functions."""
from __future__ import annotations

import functools

import torch

KINDS = ("hadamard", "random", "kron")


def hadamard_block(n: int) -> int:
    """The largest power of two dividing n: the Hadamard block size for an n-dimensional space."""
    return n & -n


@functools.lru_cache(maxsize=32)
def _sylvester(b: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard(b: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalised b x b Sylvester Hadamard matrix (b a power of two): symmetric and orthogonal."""
    if b < 1 or b & (b - 1):
        raise ValueError(f"Hadamard blocks must be a power of two, got {b}")
    return (_sylvester(b) / b ** 0.5).to(dtype)


def random_orthogonal(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A Haar-random n x n orthogonal matrix (QR of a Gaussian with the signs of R's diagonal fixed)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype).contiguous()  # LAPACK returns column-major


def rotate(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x @ blockdiag(q, q, ...) along the last axis: a (b, b) block rotates each b-sized group."""
    n, b = x.shape[-1], q.shape[0]
    if b == n:
        return x @ q
    return (x.reshape(*x.shape[:-1], n // b, b) @ q).reshape(x.shape)


def kron_rotate(x: torch.Tensor, r: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x @ kron(r, h) along the last axis without forming it: with x viewed as (m, b) rows X,
    x @ kron(R, H) = vec(R^T X H)."""
    m, b = r.shape[0], h.shape[0]
    x2 = x.reshape(*x.shape[:-1], m, b)
    return (r.transpose(0, 1) @ (x2 @ h)).reshape(x.shape)


def kron_factor(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The small Haar-random factor R (m x m, m = n / hadamard_block(n)) of the full rotation kron(R, H)."""
    return random_orthogonal(n // hadamard_block(n), seed, dtype)


def parse(spec: str) -> tuple[str, int | None]:
    """'hadamard' -> ('hadamard', None); 'hadamard:32' -> ('hadamard', 32); 'random' -> ('random', None)."""
    kind, _, block = spec.removeprefix("folded:").partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown rotation {spec!r}; use one of {KINDS}")
    return kind, int(block) if block else None
