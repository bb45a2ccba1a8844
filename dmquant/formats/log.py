"""Logarithmic formats: values that are powers of two (log2) or of sqrt(2) (twin-log), plus zero.

Post-softmax probabilities and post-GELU activations are dense near zero and sparse near their
maximum; a uniform grid spends most codes on the sparse top (PTQ4DM, RepQ-ViT, AdaLog, LRQ-DiT).
Relative to the scale (max value 1):

- ``log2_b``: magnitudes 2^0, 2^-1, ..., each code a power of two (dequantization is a shift).
- ``twinlog_b``: two interleaved log2 grids, one shifted by half an octave (2^-k and 2^-k / sqrt 2),
  so twice the levels per octave over half the octaves: still two shifts and one of two constants to
  dequantize (the log-sqrt2 quantizer of RepQ-ViT; LRQ-DiT's twin-log spends its codes the same way
  on the intermediate, dense region rather than on the extreme tail).

Signed formats (``log2_4``) keep a sign bit above the magnitude code, with a negative zero as the
minifloats have; unsigned ones (``ulog2_4``, for softmax outputs) spend every code on magnitudes.
Magnitude code 0 is zero, codes rise with the magnitude. Rounding picks the nearest value (ties to the
even code), like every other format, so a brute-force search over the grid is the exact reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from .base import Format

LOG_BITS = (3, 4, 5, 6)  # 8 unsigned log2 bits would reach 2^-254, below float32's smallest value


@dataclass(frozen=True)
class CodebookFormat(Format):
    """A sign-magnitude format given by its sorted non-negative magnitudes (magnitudes[0] == 0)."""

    magnitudes: tuple[float, ...] = ()
    signed: bool = True

    def __post_init__(self) -> None:
        n = 2 ** (self.bits - 1) if self.signed else 2**self.bits
        m = self.magnitudes
        if len(m) != n or m[0] != 0 or any(b <= a for a, b in zip(m, m[1:])):
            raise ValueError(f"{self.name}: need {n} increasing magnitudes starting at 0, got {len(m)}")

    @cached_property
    def _mags(self) -> torch.Tensor:
        return torch.tensor(self.magnitudes, dtype=torch.float64)

    def decode_table(self) -> torch.Tensor:
        return torch.cat([self._mags, -self._mags]) if self.signed else self._mags.clone()

    def _nearest(self, a: torch.Tensor) -> torch.Tensor:
        """Index of the magnitude nearest to `a` >= 0 (float64); an exact tie goes to the even code
        (the magnitude index is the code's low bits)."""
        mags = self._mags.to(a.device)
        hi = torch.searchsorted(mags, a.contiguous()).clamp(1, mags.numel() - 1)
        lo = hi - 1
        d_lo, d_hi = a - mags[lo], mags[hi] - a
        return torch.where((d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0)), hi, lo)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        q = self._mags.to(x.device)[self._nearest(x.double().abs())].to(x.dtype)
        if not self.signed:  # negative inputs round to (signed) zero, the nearest value
            q = torch.where(x < 0, torch.zeros_like(q), q)
        return torch.copysign(q, x).where(~torch.isnan(x), x)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        # Nearest rather than exact lookup: grid values arrive rounded to float32 or half.
        idx = self._nearest(values.double().abs())
        if self.signed:
            idx = idx | (torch.signbit(values).to(torch.int64) << (self.bits - 1))
        return idx.to(torch.uint8)


def log_format(kind: str, bits: int, signed: bool) -> CodebookFormat:
    """`kind` 'log2' (ratio 2 between levels) or 'twinlog' (ratio sqrt 2) with `bits` bits."""
    if bits not in LOG_BITS:
        raise ValueError(f"{kind} formats support {LOG_BITS[0]}-{LOG_BITS[-1]} bits, got {bits}")
    if kind not in ("log2", "twinlog"):
        raise ValueError(f"unknown logarithmic format kind {kind!r}; use 'log2' or 'twinlog'")
    n = 2 ** (bits - 1) if signed else 2**bits
    if kind == "log2":
        levels = [2.0**-i for i in range(n - 1)]
    else:  # even levels 2^-k, odd levels 2^-k / sqrt(2): one float64 rounding each
        levels = [2.0 ** -(i // 2) * (math.sqrt(0.5) if i % 2 else 1.0) for i in range(n - 1)]
    name = f"{'' if signed else 'u'}{kind}_{bits}"
    return CodebookFormat(name=name, bits=bits, magnitudes=(0.0, *sorted(levels)), signed=signed)
