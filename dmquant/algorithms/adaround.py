"""AdaRound (Nagel et al. 2020) on any value grid: learn, per weight, whether to round down or up.

For v = w / s (+ zero point) the two candidates are the neighbouring grid values lower <= v < upper.
On an integer grid they are one apart; on a minifloat grid (FP4DiT's extension) their spacing
doubles every binade, so the soft weight interpolates between the actual neighbours:
    w_soft = s * (lower + h(V) * (upper - lower) - zero),
with the rectified sigmoid h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1), which reaches 0
and 1 exactly (so V can settle on a hard decision). Values beyond the grid's ends are clipped there.
Block formats (MX, NVFP4) are the same thing with one effective scale per block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..config import QuantSpec
from ..nn.qmodule import QuantModule
from ..primitives import QParams, dequantize, element_format, from_blocks, to_blocks

ZETA, GAMMA = 1.1, -0.1  # stretch of the sigmoid beyond [0, 1], from the paper


def grid_neighbours(v: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper): consecutive values of the sorted `grid` with lower <= v < upper. Values past
    the ends get the outermost pair (lower = max grid value is never returned: v = max has rest 1)."""
    g = grid.to(v.device, v.dtype)
    idx = torch.searchsorted(g, v.contiguous(), right=True)  # number of grid values <= v
    lo = (idx - 1).clamp(0, g.numel() - 2)
    return g[lo], g[lo + 1]


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """V with rectified_sigmoid(V) = h for h in [0, 1] (finite: the stretch keeps the logit away
    from 0 and 1)."""
    p = (h - GAMMA) / (ZETA - GAMMA)
    return torch.log(p / (1 - p))


@dataclass
class SoftRounding:
    """The rounding variables of one weight in its 2-D view (rows, cols), all elementwise.

    `lower`/`upper` are grid values (codes), `scale` the effective scale of each element's block,
    `zero` the zero point (asymmetric integers) or None, `v` the learnable AdaRound parameter.
    """

    lower: torch.Tensor
    upper: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    v: torch.Tensor

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.v)

    def _dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        # The same float32 operations as primitives.dequantize, so hard() matches it bit for bit.
        return (codes if self.zero is None else codes - self.zero) * self.scale

    def soft(self) -> torch.Tensor:
        """Differentiable weight between the two candidates (float32)."""
        return self._dequantize(self.lower + self.h() * (self.upper - self.lower))

    def codes(self) -> torch.Tensor:
        """Final grid values: round up where h(V) >= 0.5."""
        return torch.where(self.h() >= 0.5, self.upper, self.lower).detach()

    def hard(self) -> torch.Tensor:
        """The weight with the final rounding, exactly on the quantization grid (float32)."""
        return self._dequantize(self.codes())

    def regularizer(self, beta: float) -> torch.Tensor:
        """sum(1 - |2h - 1|^beta): zero only when every h is 0 or 1; a large beta leaves h free
        except near 0.5, a small one pushes every h to a decision."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


def soft_rounding(weight: torch.Tensor, spec: QuantSpec, qp: QParams) -> SoftRounding:
    """Rounding variables for a 2-D weight under fixed scales `qp`, initialised so that h(V)
    reproduces each element's fractional position between its neighbours (soft() == weight)."""
    if not torch.isfinite(weight).all():
        raise FloatingPointError("AdaRound: the weight holds non-finite values")
    grid = element_format(spec.fmt, spec.symmetric)  # asymmetric: the unsigned grid + zero point
    xb = to_blocks(weight.detach().float(), spec.gran)
    if qp.scale.shape != xb.shape[:2]:
        raise ValueError(f"scale shape {tuple(qp.scale.shape)} does not match blocks {tuple(xb.shape[:2])}")
    full = lambda t: from_blocks(t.unsqueeze(-1).expand_as(xb), weight.shape).contiguous()  # noqa: E731
    scale = full(qp.effective_scale().float())
    zero = None if qp.zero_point is None else full(qp.zero_point.float())
    v = weight.detach().float() / scale
    if zero is not None:
        v = v + zero
    lower, upper = grid_neighbours(v, grid.grid())
    rest = ((v - lower) / (upper - lower)).clamp(0, 1)
    return SoftRounding(lower, upper, scale, zero, inverse_rectified_sigmoid(rest).requires_grad_(True))


def layer_rounding(layer: QuantModule) -> SoftRounding:
    """Rounding variables for a QuantModule's weight under its weight quantizer's current scales
    (per tensor, channel, group or block; asymmetric integers with their zero point)."""
    wq = layer.weight_quantizer
    if wq is None:
        raise ValueError(f"{layer.qname}: no weight quantizer to round for")
    w2d = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    return soft_rounding(w2d, wq.spec, wq.qparams)


def annealed_beta(step: int, iters: int, warmup: float = 0.2, beta: Sequence[float] = (20.0, 2.0)) -> float | None:
    """Regulariser exponent at `step`: None during the first `warmup` fraction (reconstruction
    only, as in AdaRound/BRECQ), then linear decay from beta[0] to beta[1]."""
    start = int(warmup * iters)
    if step < start:
        return None
    t = (step - start) / max(1, iters - 1 - start)
    return float(beta[1] + (beta[0] - beta[1]) * max(0.0, 1.0 - t))


def pack_codes(layer: QuantModule, values: torch.Tensor) -> torch.Tensor:
    """Grid values of a layer's weight -> uint8 bit patterns: a rounding decision in a byte per weight."""
    spec = layer.weight_quantizer.spec
    return element_format(spec.fmt, spec.symmetric).encode(values)


def rounded_weight(layer: QuantModule, codes: torch.Tensor) -> torch.Tensor:
    """The layer's weight for bit patterns `codes` under its scales: exactly what `load_quantized`
    rebuilds from them, so a written-back weight packs into the same codes."""
    spec, w = layer.weight_quantizer.spec, layer.weight
    table = element_format(spec.fmt, spec.symmetric).decode_table().to(codes.device, torch.float32)
    values = table[codes.long()].reshape(w.shape[0], -1)
    return dequantize(values, spec.gran, layer.weight_quantizer.qparams, w.dtype).reshape(w.shape)
