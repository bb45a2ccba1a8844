"""Range estimation: which [lo, hi] a static scale should cover.

Min-max keeps every value but lets one outlier waste the grid; a percentile clips the tail; MSE (or
L_p) search picks the clipping ratio whose quantization error is smallest, the choice Q-Diffusion
and PTQ4DM make for activations; EMA smooths min-max over a stream of batches. Weights are searched
block by block (per channel / group); activations are streamed with bounded memory: exact extremes,
per-call percentiles, and a capped random sample for the search.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .formats import BlockFormat, Format
from .granularity import Granularity, PerTensor
from .primitives import QParams, choose_qparams, dequantize, qparams_from_range, quantize, to_blocks

KINDS = ("minmax", "ema", "percentile", "mse", "lp")
SEARCH_POINTS = 50  # clipping ratios tried between 1/SEARCH_POINTS and 1


@dataclass(frozen=True)
class RangeEstimator:
    kind: str
    value: float | None = None  # ema momentum, percentile in (50, 100], or the L_p exponent

    def __str__(self) -> str:
        return self.kind if self.value is None or self.kind == "mse" else f"{self.kind}:{self.value:g}"

    @property
    def searches(self) -> bool:
        return self.kind in ("mse", "lp")

    @property
    def p(self) -> float:
        return 2.0 if self.kind == "mse" else float(self.value)


_DEFAULTS = {"ema": 0.9, "percentile": 99.99, "lp": 2.4}


def parse_observer(text: str | RangeEstimator) -> RangeEstimator:
    """'minmax' | 'ema[:m]' | 'percentile[:p]' | 'mse' | 'lp[:p]' -> RangeEstimator."""
    if isinstance(text, RangeEstimator):
        return text
    kind, _, arg = str(text).strip().lower().partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown observer {text!r}; use one of {', '.join(KINDS)} (e.g. percentile:99.9, lp:2.4)")
    if kind in ("minmax", "mse"):
        if arg:
            raise ValueError(f"observer {kind} takes no argument, got {text!r}")
        return RangeEstimator(kind)
    try:
        value = float(arg) if arg else _DEFAULTS[kind]
    except ValueError:
        raise ValueError(f"observer {text!r}: {arg!r} is not a number") from None
    ok = {"ema": 0 <= value < 1, "percentile": 50 < value <= 100, "lp": value > 0}[kind]
    if not ok:
        raise ValueError(f"observer {text!r} out of range (ema in [0, 1), percentile in (50, 100], lp > 0)")
    return RangeEstimator(kind, value)


# -- weights (and any 2-D view): per-block estimates ---------------------------------------------
def estimate_qparams(x: torch.Tensor, fmt: Format, gran: Granularity, symmetric: bool,
                     estimator: RangeEstimator) -> QParams:
    """Scales for a 2-D view at `gran` under `estimator` (weights; min-max for block formats)."""
    if estimator.kind == "minmax" or isinstance(fmt, BlockFormat):
        return choose_qparams(x, fmt, gran, symmetric)
    xb = to_blocks(x.detach().float(), gran)
    if estimator.kind == "percentile":
        ordered = xb.sort(-1).values  # nearest rank per block, as for activations (no size limit)
        rank = lambda q: min(max(1, math.ceil(q * xb.shape[-1] / 100 - 1e-9)), xb.shape[-1]) - 1  # noqa: E731
        lo, hi = ordered[..., rank(100 - estimator.value)], ordered[..., rank(estimator.value)]
        return qparams_from_range(lo, hi, fmt, symmetric)
    if estimator.kind == "ema":
        raise ValueError("the ema observer smooths a stream of activations; weights use minmax, percentile, mse or lp")
    lo, hi = xb.amin(-1), xb.amax(-1)
    return search_qparams(x.detach().float(), lo, hi, fmt, gran, symmetric, estimator.p)


def search_qparams(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, fmt: Format, gran: Granularity,
                   symmetric: bool, p: float, points: int = SEARCH_POINTS) -> QParams:
    """Per block, the clipped range r * [lo, hi] (r on a grid in (0, 1]) minimising sum |x - q(x)|^p."""
    best_err, best = None, None
    for i in range(1, points + 1):
        r = i / points
        qp = qparams_from_range(lo * r, hi * r, fmt, symmetric)
        err = (to_blocks(dequantize(quantize(x, fmt, gran, qp), gran, qp) - x, gran).abs() ** p).sum(-1)
        if best_err is None:
            best_err, best = err, qp
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best.scale = torch.where(better, qp.scale, best.scale)
        if qp.zero_point is not None:
            best.zero_point = torch.where(better, qp.zero_point, best.zero_point)
    return best


# -- activations: streamed statistics -----------------------------------------------------------
class RangeObserver:
    """Statistics of one activation stream, in bounded memory, for one `RangeEstimator`."""

    SAMPLE_PER_CALL = 4096
    SAMPLE_MAX = 1 << 15

    def __init__(self, estimator: RangeEstimator) -> None:
        self.estimator = estimator
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.weight = 0  # elements (percentile averages) or calls (ema)
        self.sample: torch.Tensor | None = None
        self._gen = torch.Generator().manual_seed(0)  # reproducible subsampling

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1)  # statistics stay on the input's device
        if flat.numel() == 0:
            return
        lo, hi = flat.min(), flat.max()
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise FloatingPointError("non-finite (NaN/inf) activations during calibration")
        kind = self.estimator.kind
        if kind == "percentile":
            lo, hi = _percentile(flat, 100 - self.estimator.value), _percentile(flat, self.estimator.value)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        elif kind == "ema":
            m = self.estimator.value
            self.lo, self.hi = m * self.lo + (1 - m) * lo, m * self.hi + (1 - m) * hi
        elif kind == "percentile":  # element-weighted mean of per-call percentiles
            w = self.weight / (self.weight + flat.numel())
            self.lo, self.hi = w * self.lo + (1 - w) * lo, w * self.hi + (1 - w) * hi
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        self.weight += flat.numel() if kind == "percentile" else 1
        if self.estimator.searches:
            self._add_sample(flat)

    def _add_sample(self, flat: torch.Tensor, per_call: bool = True) -> None:
        if per_call and flat.numel() > self.SAMPLE_PER_CALL:
            flat = flat[self._pick(flat.numel(), self.SAMPLE_PER_CALL, flat.device)]
        s = flat if self.sample is None else torch.cat([self.sample, flat.to(self.sample.device)])
        if s.numel() > self.SAMPLE_MAX:
            s = s[self._pick(s.numel(), self.SAMPLE_MAX, s.device)]
        self.sample = s

    def _pick(self, n: int, k: int, device: torch.device) -> torch.Tensor:
        return torch.randperm(n, generator=self._gen)[:k].to(device)

    def merge(self, other: "RangeObserver") -> "RangeObserver":
        """Pool two streams (e.g. the noise levels of one timestep group)."""
        out = RangeObserver(self.estimator)
        parts = [o for o in (self, other) if o.lo is not None]
        if not parts:
            return out
        if len(parts) == 1 or self.estimator.kind == "minmax" or self.estimator.searches:
            out.lo = torch.stack([o.lo for o in parts]).min()
            out.hi = torch.stack([o.hi for o in parts]).max()
        else:  # ema / percentile: weighted mean of the two estimates
            w = torch.tensor([float(o.weight) for o in parts])
            w = w / w.sum()
            out.lo = sum(wi * o.lo for wi, o in zip(w, parts))
            out.hi = sum(wi * o.hi for wi, o in zip(w, parts))
        out.weight = sum(o.weight for o in parts)
        samples = [o.sample for o in parts if o.sample is not None]
        if samples:  # pooled samples keep their size (up to SAMPLE_MAX), not one call's
            out._add_sample(torch.cat(samples), per_call=False)
        return out

    def qparams(self, fmt: Format, symmetric: bool) -> QParams:
        """Frozen per-tensor scale (shape (1, 1)) from what was observed."""
        if self.lo is None:
            raise RuntimeError("no data observed")
        lo, hi = self.lo.reshape(1, 1), self.hi.reshape(1, 1)
        if not self.estimator.searches:
            return qparams_from_range(lo, hi, fmt, symmetric)
        return search_qparams(self.sample.reshape(1, -1), lo, hi, fmt, PerTensor(), symmetric, self.estimator.p)


def _percentile(flat: torch.Tensor, q: float) -> torch.Tensor:
    """Nearest-rank percentile (numpy's 'inverted_cdf'): the k-th smallest, k = ceil(q/100 * n)."""
    n = flat.numel()
    k = min(max(1, math.ceil(q * n / 100 - 1e-9)), n)
    return flat.kthvalue(k).values


__all__ = ["RangeEstimator", "RangeObserver", "parse_observer", "estimate_qparams", "search_qparams"]
