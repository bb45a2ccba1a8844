"""Block-scaled formats: small elements sharing one scale per block of consecutive inputs.

- MX (OCP Microscaling v1.0): blocks of 32, shared scale a power of two stored as E8M0.
- NVFP4: blocks of 16 e2m1 elements, block scale stored as fp8 e4m3, plus one fp32 scale per tensor
  that keeps the e4m3 block scales in range.
The element grid is the element format's; `dmquant.primitives` computes the scales.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Format

SCALE_KINDS = ("e8m0", "fp8_e4m3")


@dataclass(frozen=True)
class BlockFormat(Format):
    element: Format | None = None
    block_size: int = 32
    scale_kind: str = "e8m0"
    tensor_scale: bool = False

    def __post_init__(self) -> None:
        if self.element is None or self.element.bits != self.bits:
            raise ValueError(f"{self.name}: element format must be given and {self.bits} bits wide")
        if self.scale_kind not in SCALE_KINDS:
            raise ValueError(f"{self.name}: scale_kind must be one of {SCALE_KINDS}")

    def decode_table(self) -> torch.Tensor:
        return self.element.decode_table()

    def round(self, x: torch.Tensor) -> torch.Tensor:
        return self.element.round(x)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        return self.element.encode(values)


# E8M0 as used by MX: an 8-bit biased exponent, value 2**(code - 127); code 255 is NaN.
E8M0_BIAS = 127


def e8m0_encode(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two scales -> uint8 exponent codes (exact for the scales MX produces)."""
    _, k = torch.frexp(scale.float())
    return (k - 1 + E8M0_BIAS).clamp(0, 254).to(torch.uint8)


def e8m0_decode(codes: torch.Tensor) -> torch.Tensor:
    return torch.pow(2.0, codes.to(torch.float32) - E8M0_BIAS)
