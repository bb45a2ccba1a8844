"""Minifloat formats FP(e, m): sign, e exponent bits, m mantissa bits, with subnormals.

Three conventions for the top exponent code, as the standards define them:
- ``ieee`` (fp8_e5m2): the top exponent is reserved for inf/NaN.
- ``fn`` (fp8_e4m3fn): no infinities; only the all-ones pattern is NaN, so max = 448 for e4m3.
- ``finite`` (OCP MX fp6/fp4): every pattern is a finite number.
Rounding is round-to-nearest-even with saturation to +-max (what quantizers want, not IEEE overflow).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .base import Format

CONVENTIONS = ("ieee", "fn", "finite")


@dataclass(frozen=True)
class FloatFormat(Format):
    exp_bits: int = 4
    man_bits: int = 3
    convention: str = "fn"

    def __post_init__(self) -> None:
        if self.convention not in CONVENTIONS:
            raise ValueError(f"unknown minifloat convention {self.convention!r}; use one of {CONVENTIONS}")
        if self.exp_bits < 1 or self.man_bits < 0 or 1 + self.exp_bits + self.man_bits != self.bits:
            raise ValueError(f"{self.name}: 1 + exp_bits + man_bits must equal bits ({self.bits})")

    @property
    def bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1

    @cached_property
    def _table(self) -> torch.Tensor:
        e, m = self.exp_bits, self.man_bits
        p = torch.arange(2**self.bits, dtype=torch.int64)
        sign = torch.where((p >> (e + m)) & 1 == 1, -1.0, 1.0).double()
        exp = (p >> m) & (2**e - 1)
        man = (p & (2**m - 1)).double()
        normal = (1 + man / 2**m) * torch.pow(2.0, (exp - self.bias).double())
        subnormal = man / 2**m * 2.0 ** (1 - self.bias)
        val = sign * torch.where(exp == 0, subnormal, normal)
        top = exp == 2**e - 1
        if self.convention == "ieee":
            val = torch.where(top & (man == 0), sign * float("inf"), val)
            val = torch.where(top & (man != 0), float("nan"), val)
        elif self.convention == "fn":
            val = torch.where(top & (man == 2**m - 1), float("nan"), val)
        return val

    def decode_table(self) -> torch.Tensor:
        return self._table.clone()

    @cached_property
    def _magnitudes(self) -> torch.Tensor:
        # Non-negative finite values in bit-pattern order: monotonic for sign-magnitude layouts.
        t = self._table[: 2 ** (self.bits - 1)]
        return t[torch.isfinite(t)]

    def round(self, x: torch.Tensor) -> torch.Tensor:
        a = x.abs()
        # frexp gives a = f * 2**k with f in [0.5, 1): floor(log2 a) = k - 1, exactly.
        _, k = torch.frexp(a)
        exp = torch.clamp(k - 1, min=1 - self.bias)  # subnormals share the smallest normal's step
        step = torch.pow(2.0, (exp - self.man_bits).to(x.dtype))
        q = torch.round(a / step) * step  # power-of-two step: exact, ties to even
        q = torch.minimum(q, torch.tensor(self.max_value, dtype=x.dtype, device=x.device))
        return torch.copysign(q, x).where(~torch.isnan(x), x)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        mags = self._magnitudes.to(values.device, torch.float64)
        idx = torch.searchsorted(mags, values.abs().double().contiguous())
        sign = torch.signbit(values).to(torch.int64) << (self.bits - 1)
        return (idx | sign).to(torch.uint8)
