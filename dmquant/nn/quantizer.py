"""`TensorQuantizer`: the module that fake-quantizes one tensor role (weight, input, Q/K/V, probs).

Static scales live in buffers (saved with the model); dynamic scales are recomputed from every input.
Calibration is a protocol: `start_observing()` -> run data -> `finish_observing()` freezes the range.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import QuantSpec
from ..formats import BlockFormat
from ..granularity import PerTensor
from ..primitives import QParams, choose_qparams, fake_quantize, qparams_from_range, quantize


def as_rows(x: torch.Tensor, channel_axis: int | None) -> torch.Tensor:
    """2-D view for the primitives: weights (channel_axis None) -> (out, rest); activations ->
    (positions, channels) with channels taken from `channel_axis`."""
    if channel_axis is None:
        return x.reshape(x.shape[0], -1)
    if channel_axis not in (-1, x.dim() - 1):
        x = x.movedim(channel_axis, -1)
    return x.reshape(-1, x.shape[-1])


def from_rows(y: torch.Tensor, like: torch.Tensor, channel_axis: int | None) -> torch.Tensor:
    if channel_axis is None or channel_axis in (-1, like.dim() - 1):
        return y.reshape(like.shape)
    moved = like.movedim(channel_axis, -1).shape
    return y.reshape(moved).movedim(-1, channel_axis)


class TensorQuantizer(nn.Module):
    """Fake-quantizes tensors per a `QuantSpec`; `channel_axis=None` marks a weight quantizer."""

    def __init__(self, spec: QuantSpec, channel_axis: int | None = -1, name: str = "") -> None:
        super().__init__()
        if channel_axis is not None and not spec.dynamic and not isinstance(spec.gran, PerTensor):
            raise ValueError(f"static activation scales must be per tensor, got {spec.granularity} "
                             "(use dynamic: true for per-token or per-group activations)")
        self.spec = spec
        self.channel_axis = channel_axis
        self.name = name
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)
        self.register_buffer("tensor_scale", None)
        self._range: tuple[torch.Tensor, torch.Tensor] | None = None
        self.observing = False
        self.enabled = True  # False passes tensors through: the float reference (see nn.switch)

    # -- scales -------------------------------------------------------------------------------
    @property
    def qparams(self) -> QParams:
        if self.scale is None:
            raise RuntimeError(f"quantizer {self.name or ''} has no scale yet: calibrate the model first "
                               "(recipes with static activation scales need calibration data)")
        return QParams(self.scale, self.zero_point, self.tensor_scale)

    def set_qparams(self, qp: QParams) -> None:
        self.scale, self.zero_point, self.tensor_scale = qp.scale, qp.zero_point, qp.tensor_scale

    def init_from(self, x: torch.Tensor) -> None:
        """Set static scales from a tensor (min-max), e.g. a weight at quantization time.

        Scales of a half-precision tensor are rounded to its dtype (as GPTQ/AWQ checkpoints store
        them), so they are stored in 2 bytes and the codes are computed with the stored value."""
        qp = choose_qparams(as_rows(x, self.channel_axis), self.spec.fmt, self.spec.gran, self.spec.symmetric)
        if x.dtype in (torch.float16, torch.bfloat16) and not isinstance(self.spec.fmt, BlockFormat):
            tiny = torch.finfo(x.dtype).tiny
            qp.scale = qp.scale.clamp_min(tiny).to(x.dtype).float()
        self.set_qparams(qp)

    def start_observing(self) -> None:
        self.observing, self._range = True, None

    def finish_observing(self) -> None:
        """Freeze the observed min-max range into static scales."""
        self.observing = False
        if self._range is None:
            raise RuntimeError(f"quantizer {self.name} saw no data during calibration: "
                               "the calibration run never reached this layer")
        lo, hi = self._range
        self.set_qparams(qparams_from_range(lo.reshape(1, 1), hi.reshape(1, 1), self.spec.fmt, self.spec.symmetric))
        self._range = None

    def _observe(self, x: torch.Tensor) -> None:
        xd = x.detach().float()
        lo, hi = xd.amin(), xd.amax()
        _check_finite(torch.stack([lo, hi]), self.name)
        if self._range is not None:
            lo, hi = torch.minimum(lo, self._range[0]), torch.maximum(hi, self._range[1])
        self._range = (lo, hi)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.observing:
            self._observe(x)
            return x
        rows = as_rows(x, self.channel_axis)
        if self.spec.dynamic:
            qp = choose_qparams(rows, self.spec.fmt, self.spec.gran, self.spec.symmetric)
            _check_finite(qp.scale, self.name)
        else:
            qp = self.qparams
        return from_rows(fake_quantize(rows, self.spec.fmt, self.spec.gran, qp), x, self.channel_axis)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Grid values of `x` under the static scales (what serialization packs)."""
        return quantize(as_rows(x, self.channel_axis), self.spec.fmt, self.spec.gran, self.qparams)

    def extra_repr(self) -> str:
        return self.spec.short()


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not torch.isfinite(t).all():
        raise FloatingPointError(f"non-finite (NaN/inf) values reached quantizer {name or '?'}: "
                                 "check the model's inputs or run it in higher precision")
