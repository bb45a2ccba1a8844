"""Pure tensor primitives: choose scales, quantize, dequantize, fake-quantize (with STE).

No modules, no state. Every function takes a 2-D view (rows, cols) of the tensor; internally the view
is reshaped into blocks (rows', groups, size) so that one scale covers the last axis of each block:
per-tensor -> (1, 1, rows*cols), per-row -> (rows, 1, cols), per-group g -> (rows, ceil(cols/g), g),
zero-padding the last group when g does not divide cols. Scales are stored with shape (rows', groups).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .formats import BlockFormat, Format, IntFormat, get_format
from .granularity import Granularity, PerGroup, PerTensor, is_per_row

E4M3 = get_format("fp8_e4m3")


@dataclass
class QParams:
    """Scale (and zero point, and NVFP4's per-tensor scale) for one quantized tensor."""

    scale: torch.Tensor
    zero_point: torch.Tensor | None = None
    tensor_scale: torch.Tensor | None = None

    def effective_scale(self) -> torch.Tensor:
        return self.scale if self.tensor_scale is None else self.scale * self.tensor_scale


def element_format(fmt: Format, symmetric: bool) -> Format:
    """The grid codes live on: asymmetric integer quantization uses the unsigned grid."""
    if symmetric:
        return fmt
    if not isinstance(fmt, IntFormat):
        raise ValueError(f"asymmetric (zero-point) quantization needs an integer format, not {fmt.name}")
    return fmt.unsigned() if fmt.signed else fmt


def to_blocks(x: torch.Tensor, gran: Granularity) -> torch.Tensor:
    """(rows, cols) -> (rows', groups, size), zero-padding a ragged last group."""
    if x.dim() != 2:
        raise ValueError(f"primitives take a 2-D view, got shape {tuple(x.shape)}")
    rows, cols = x.shape
    if isinstance(gran, PerTensor):
        return x.reshape(1, 1, rows * cols)
    if is_per_row(gran):
        return x.reshape(rows, 1, cols)
    if isinstance(gran, PerGroup):
        pad = -cols % gran.size
        if pad:
            x = torch.nn.functional.pad(x, (0, pad))
        return x.reshape(rows, -1, gran.size)
    raise TypeError(f"unknown granularity {gran!r}")


def from_blocks(xb: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    rows, cols = shape
    return xb.reshape(rows, -1)[:, :cols] if xb.shape[0] == rows else xb.reshape(rows, cols)


def _nonzero(s: torch.Tensor) -> torch.Tensor:
    # An all-zero block quantizes to zero with any scale; 1 avoids 0/0.
    return torch.where(s == 0, torch.ones_like(s), s)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, fmt: Format, symmetric: bool = True) -> QParams:
    """Scale (and zero point) mapping the range [lo, hi] onto the format's grid (non-block formats)."""
    if isinstance(fmt, BlockFormat):
        raise ValueError("block formats derive scales from each block's data, not from a range")
    lo, hi = lo.float(), hi.float()
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        qmax = fmt.qmax if isinstance(fmt, IntFormat) else fmt.max_value
        return QParams(_nonzero(amax / qmax))
    q = element_format(fmt, symmetric)
    lo, hi = torch.clamp(lo, max=0), torch.clamp(hi, min=0)  # zero must be exactly representable
    scale = _nonzero((hi - lo) / (q.qmax - q.qmin))
    zero = torch.clamp(torch.round(q.qmin - lo / scale), q.qmin, q.qmax)
    return QParams(scale, zero)


def choose_qparams(x: torch.Tensor, fmt: Format, gran: Granularity, symmetric: bool = True) -> QParams:
    """Min-max scales for a 2-D view `x` at the given granularity."""
    xb = to_blocks(x.detach().float(), gran)
    if isinstance(fmt, BlockFormat):
        return _block_qparams(xb, fmt)
    return qparams_from_range(xb.amin(-1), xb.amax(-1), fmt, symmetric)


def _block_qparams(xb: torch.Tensor, fmt: BlockFormat) -> QParams:
    amax = xb.abs().amax(-1)
    elem_max = fmt.element.max_value
    if fmt.scale_kind == "e8m0":
        # OCP MX: shared exponent = floor(log2(amax)) - emax(element); elements then saturate.
        _, k = torch.frexp(amax)
        emax = math.floor(math.log2(elem_max))
        scale = torch.pow(2.0, (k - 1 - emax).clamp(-127, 127).float())
        return QParams(torch.where(amax > 0, scale, torch.ones_like(scale)))
    # NVFP4: fp32 tensor scale puts the largest block scale at e4m3's max; block scales are e4m3 values.
    tensor_scale = _nonzero(amax.amax() / (elem_max * E4M3.max_value)).reshape(1, 1)
    block = E4M3.round(amax / elem_max / tensor_scale)
    block = torch.clamp(block, min=E4M3.grid()[E4M3.grid() > 0].min().item())
    return QParams(block, tensor_scale=tensor_scale)


def _scaled(xb: torch.Tensor, qp: QParams) -> torch.Tensor:
    v = xb / qp.effective_scale().unsqueeze(-1)
    return v if qp.zero_point is None else v.add_(qp.zero_point.unsqueeze(-1))


def _check_shapes(xb: torch.Tensor, qp: QParams) -> None:
    if qp.scale.shape != xb.shape[:2]:
        raise ValueError(f"scale shape {tuple(qp.scale.shape)} does not match blocks {tuple(xb.shape[:2])}")


def quantize(x: torch.Tensor, fmt: Format, gran: Granularity, qp: QParams) -> torch.Tensor:
    """Codes as exact grid values (float tensor, same shape as `x`)."""
    grid = element_format(fmt, qp.zero_point is None)
    xb = to_blocks(x, gran)
    _check_shapes(xb, qp)
    return from_blocks(grid.round(_scaled(xb.float(), qp)), x.shape)


def dequantize(codes: torch.Tensor, gran: Granularity, qp: QParams, dtype: torch.dtype = torch.float32,
               inplace: bool = False) -> torch.Tensor:
    """(codes - zero) * scale; `inplace`: in the float32 `codes` buffer itself (a weight-sized temporary
    fewer when the codes are a caller's scratch, as in `fake_quantize`)."""
    cb = to_blocks(codes.float(), gran)  # a view of the codes, or a padded copy: scratch either way
    if inplace:
        if qp.zero_point is not None:
            cb.sub_(qp.zero_point.unsqueeze(-1))
        return from_blocks(cb.mul_(qp.effective_scale().unsqueeze(-1)), codes.shape).to(dtype)
    if qp.zero_point is not None:
        cb = cb - qp.zero_point.unsqueeze(-1)
    return from_blocks(cb * qp.effective_scale().unsqueeze(-1), codes.shape).to(dtype)


def fake_quantize(x: torch.Tensor, fmt: Format, gran: Granularity, qp: QParams) -> torch.Tensor:
    """quantize -> dequantize; with autograd, a straight-through estimator for the rounding.

    Gradients pass unchanged inside the representable range and are zero where values clip, and the
    scale receives LSQ-style gradients because it is used differentiably around the rounding.
    """
    if not (torch.is_grad_enabled() and (x.requires_grad or qp.scale.requires_grad)):
        return dequantize(quantize(x, fmt, gran, qp), gran, qp, x.dtype, inplace=True)
    grid = element_format(fmt, qp.zero_point is None)
    xb = to_blocks(x, gran)
    _check_shapes(xb, qp)
    v = torch.clamp(_scaled(xb.float(), qp), grid.min_value, grid.max_value)
    r = v + (grid.round(v) - v).detach()
    if qp.zero_point is not None:
        r = r - qp.zero_point.unsqueeze(-1)
    return from_blocks(r * qp.effective_scale().unsqueeze(-1), x.shape).to(x.dtype)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better)."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise.clamp_min(1e-300)))
