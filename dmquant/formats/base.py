"""The number-format abstraction: a format is a finite value grid with a rounding rule.

A format knows its values and how to round onto them; scales, granularity and storage live elsewhere
(`dmquant.primitives`, `dmquant.packing`). Every format holds at most 8 bits per element, so each
element value has a bit pattern (its *code*) and the whole format is described by its codebook.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class Format(ABC):
    """An element format: `bits` wide, values given by `codebook()`, rounding by `round()`."""

    name: str
    bits: int

    @abstractmethod
    def decode_table(self) -> torch.Tensor:
        """float64 tensor of length 2**bits: the value of every bit pattern (NaN where none)."""

    @abstractmethod
    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest representable value (ties to even), saturating at +-max; NaN stays NaN."""

    @cached_property
    def max_value(self) -> float:
        return float(self.grid().max())

    @cached_property
    def min_value(self) -> float:
        return float(self.grid().min())

    def grid(self) -> torch.Tensor:
        """Sorted distinct finite values (float64); the reference tests enumerate this."""
        t = self.decode_table()
        return torch.unique(t[torch.isfinite(t)])

    @property
    def is_signed(self) -> bool:
        return self.min_value < 0

    @abstractmethod
    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """Bit patterns (uint8) of values that lie exactly on the grid (output of `round`)."""

    def decode(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Values of bit patterns: a table lookup (`index_select` on int32 indices: 3x faster than
        indexing with int64 on a large weight, which packed layers decode on every call)."""
        flat = self.decode_table().to(dtype).index_select(0, codes.reshape(-1).to(torch.int32))
        return flat.reshape(codes.shape)
