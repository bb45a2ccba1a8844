"""Candidate weight formats of a mixed-precision search, the layers they apply to, and their bytes.

A candidate is a weight `QuantSpec` (activations follow the base recipe) or `FP` (the layer is left
unquantized). Bytes are counted as the stored payload counts them (`dmquant.payload`): bit-packed
codes, one scale per row or group (one byte for MX/NVFP4 block scales, float32 otherwise), a zero
point byte per scale when asymmetric, NVFP4's float32 tensor scale; an FP layer costs its weight in
the model's dtype. Only weights change size; everything else in the model is a constant.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..config import QuantSpec
from ..filters import LayerFilter
from ..formats import BlockFormat
from ..granularity import PerGroup, PerTensor
from ..nn import quant_class_for
from ..packing import packed_nbytes

FP = "fp"
DEFAULT_CANDIDATES = ("int3:group:64", "int4:group:64", "int8:channel", FP)


@dataclass(frozen=True)
class Candidate:
    """One option for a layer's weight: a spec, or None for full precision."""

    name: str
    weight: QuantSpec | None

    @classmethod
    def parse(cls, text: str) -> Candidate:
        """`fp`, `int4` (per channel), `int4:group:64`, `nvfp4`, `fp8_e4m3:channel`, `uint4:group:64` ..."""
        text = text.strip()
        if text == FP:
            return cls(FP, None)
        fmt, _, gran = text.partition(":")
        if not fmt:
            raise ValueError(f"empty candidate in {text!r}")
        asym = fmt.startswith("uint")
        spec = QuantSpec(format=fmt.replace("uint", "int", 1) if asym else fmt, granularity=gran or "channel",
                         symmetric=not asym)
        return cls(text, spec)


def parse_candidates(items: str | list[str] | tuple[str, ...]) -> list[Candidate]:
    """A comma-separated string or a list; names must be unique and at least two."""
    names = [s for s in (items.split(",") if isinstance(items, str) else items) if s.strip()]
    cands = [Candidate.parse(s) for s in names]
    if len(cands) < 2 or len({c.name for c in cands}) != len(cands):
        raise ValueError(f"need at least two distinct candidates, got {names}")
    return cands


def weight_nbytes(weight_shape: tuple[int, ...], spec: QuantSpec | None, element_size: int = 4) -> int:
    """Stored bytes of one weight (out, ...) under `spec` (None: kept in float at `element_size`)."""
    numel = math.prod(weight_shape)
    if spec is None:
        return numel * element_size
    rows, cols = weight_shape[0], numel // weight_shape[0]
    gran, fmt = spec.gran, spec.fmt
    if isinstance(gran, PerTensor):
        scales = 1
    elif isinstance(gran, PerGroup):
        scales = rows * math.ceil(cols / gran.size)
    else:
        scales = rows
    scale_bytes = 1 if isinstance(fmt, BlockFormat) else 4
    extra = 4 if isinstance(fmt, BlockFormat) and fmt.scale_kind != "e8m0" else 0  # NVFP4 tensor scale
    zero = 0 if spec.symmetric else scales
    return packed_nbytes(numel, spec.bits) + scales * scale_bytes + zero + extra


def quantizable_layers(module: nn.Module, include: tuple[str, ...] = (),
                       exclude: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """{name: layer} of every layer dmquant can quantize (Linear, Conv1/2/3d). Unlike a recipe's
    default skip list nothing is excluded unless asked: the measurement decides what stays FP."""
    keep = LayerFilter(include, exclude)
    return {n: m for n, m in module.named_modules() if n and quant_class_for(m) is not None and keep(n)}
