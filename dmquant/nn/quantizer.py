"""`TensorQuantizer`: the module that fake-quantizes one tensor role (weight, input, Q/K/V, probs).

Static scales live in buffers (saved with the model); dynamic scales are recomputed from every input.
Calibration is a protocol: `start_observing()` -> run data -> `finish_observing()` freezes the range.
"""
from __future__ import annotations

import bisect
import contextlib
import math
from typing import Iterator

import torch
from torch import nn

from ..config import QuantSpec
from ..formats import BlockFormat
from ..granularity import PerTensor
from ..observers import RangeObserver, estimate_qparams, parse_observer
from ..primitives import QParams, choose_qparams, fake_quantize, quantize
from ..timestep import current_noise_level


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
    """Fake-quantizes tensors per a `QuantSpec`; `channel_axis=None` marks a weight quantizer.

    Static activation scales have shape (groups, segments): one row per timestep group (looked up
    from the current noise level; `noise_edges` holds the group edges in millionths of the noise level,
    an integer buffer that casting the model to half precision cannot move) and one column per channel segment (two
    when `split_at` splits a skip concatenation, Q-Diffusion's shortcut splitting)."""

    def __init__(self, spec: QuantSpec, channel_axis: int | None = -1, name: str = "") -> None:
        super().__init__()
        if channel_axis is not None and not spec.dynamic and not isinstance(spec.gran, PerTensor):
            raise ValueError(f"static activation scales must be per tensor, got {spec.granularity} "
                             "(use dynamic: true for per-token or per-group activations)")
        if channel_axis is None and spec.timestep_groups > 1:
            raise ValueError("timestep_groups is for activations: weights do not change with the timestep")
        self.spec = spec
        self.channel_axis = channel_axis
        self.name = name
        for buf in ("scale", "zero_point", "tensor_scale", "noise_edges", "split_at"):
            self.register_buffer(buf, None)
        self._observers: dict[float, list[RangeObserver]] | None = None
        self.enabled = True  # False passes tensors through: the float reference (see nn.switch)
        self.allow_uncalibrated = False  # pass through while no scale exists (recipe steps before calibration)
        self.generation = 0  # bumped whenever scales are replaced
        self._edges: tuple[tuple, list[int]] | None = None

    @property
    def observing(self) -> bool:
        return self._observers is not None

    # -- scales -------------------------------------------------------------------------------
    @property
    def calibrated(self) -> bool:
        return self.scale is not None

    @property
    def qparams(self) -> QParams:
        """Scales in use now (the current timestep group's, first segment for split inputs)."""
        return self._qparams(self._group(), 0)

    def _qparams(self, group: int, segment: int) -> QParams:
        if self.scale is None:
            raise RuntimeError(f"quantizer {self.name or ''} has no scale yet: calibrate the model first "
                               "(recipes with static activation scales need calibration data)")
        if self.channel_axis is None or self.spec.dynamic:
            return QParams(self.scale, self.zero_point, self.tensor_scale)
        pick = lambda t: None if t is None else t[group, segment].reshape(1, 1)  # noqa: E731
        return QParams(pick(self.scale), pick(self.zero_point))

    def _group(self) -> int:
        if self.noise_edges is None:
            return 0
        key = (self.noise_edges.data_ptr(), self.noise_edges._version)
        if self._edges is None or self._edges[0] != key:  # read the buffer once, not on every forward
            self._edges = (key, self.noise_edges.tolist())
        return bisect.bisect_left(self._edges[1], round(_known_level(self.name) * EDGE_UNITS))

    def set_qparams(self, qp: QParams) -> None:
        self.scale, self.zero_point, self.tensor_scale = qp.scale, qp.zero_point, qp.tensor_scale
        self.generation += 1  # caches key on it: a new scale tensor may reuse a freed one's address

    def init_from(self, x: torch.Tensor) -> None:
        """Set static scales from a tensor (the spec's observer: min-max, percentile, MSE/L_p search),
        e.g. a weight at quantization time.

        Scales of a half-precision tensor are rounded to its dtype (as GPTQ/AWQ checkpoints store
        them), so they are stored in 2 bytes and the codes are computed with the stored value."""
        qp = estimate_qparams(as_rows(x, self.channel_axis), self.spec.fmt, self.spec.gran, self.spec.symmetric,
                              parse_observer(self.spec.observer))
        if x.dtype in (torch.float16, torch.bfloat16) and not isinstance(self.spec.fmt, BlockFormat):
            tiny = torch.finfo(x.dtype).tiny
            qp.scale = qp.scale.clamp_min(tiny).to(x.dtype).float()
        self.set_qparams(qp)

    def set_split(self, channels: int | None) -> None:
        """Quantize channels [:channels] and [channels:] with separate scales (skip concatenations)."""
        if self.channel_axis is None or self.spec.dynamic:
            raise ValueError(f"{self.name}: only static activation quantizers take split scales")
        if self.calibrated:
            raise ValueError(f"{self.name} is calibrated already: split shortcuts before calibrating ranges "
                             "(put split_shortcut before ranges / temporal in the recipe)")
        self.split_at = None if channels is None else torch.tensor(int(channels))
        if self.observing:
            self.start_observing()  # segments changed: restart the statistics

    def start_observing(self) -> None:
        self._observers = {}

    @contextlib.contextmanager
    def observation_paused(self) -> Iterator[None]:
        """Inside, an observing quantizer neither records nor quantizes (another component's data is
        flowing through it); its statistics so far are kept for when it resumes."""
        held, was = self._observers, self.enabled
        self._observers, self.enabled = None, False
        try:
            yield
        finally:
            self._observers, self.enabled = held, was

    def abort_observing(self) -> None:
        """Leave observation without freezing anything (the run that fed it failed)."""
        self._observers = None

    def finish_observing(self) -> None:
        """Freeze the observed ranges into static scales, one per timestep group and segment."""
        observed, self._observers = self._observers, None
        if not observed:
            raise RuntimeError(f"quantizer {self.name} saw no data during calibration: "
                               "the calibration run never reached this layer")
        levels = sorted(observed)
        n = min(self.spec.timestep_groups, len(levels))  # equal-count groups of the observed noise levels
        bounds = [round(i * len(levels) / n) for i in range(n + 1)]
        groups = [levels[a:b] for a, b in zip(bounds, bounds[1:])]
        fmt, sym = self.spec.fmt, self.spec.symmetric
        rows = []
        for g in groups:
            merged = observed[g[0]]
            for level in g[1:]:
                merged = [a.merge(b) for a, b in zip(merged, observed[level])]
            rows.append([m.qparams(fmt, sym) for m in merged])
        self.scale = torch.stack([torch.cat([qp.scale.reshape(1) for qp in r]) for r in rows])
        self.zero_point = None if rows[0][0].zero_point is None else \
            torch.stack([torch.cat([qp.zero_point.reshape(1) for qp in r]) for r in rows])
        self.noise_edges = None if len(groups) == 1 else torch.tensor(
            [round((a[-1] + b[0]) / 2 * EDGE_UNITS) for a, b in zip(groups, groups[1:])], dtype=torch.int64)

    def _observe(self, x: torch.Tensor) -> None:
        key = round(_known_level(self.name), 6) if self.spec.timestep_groups > 1 else 0.0
        if key not in self._observers:
            estimator = parse_observer(self.spec.observer)
            self._observers[key] = [RangeObserver(estimator) for _ in range(1 if self.split_at is None else 2)]
        try:
            for obs, part in zip(self._observers[key], self._segments(as_rows(x, self.channel_axis))):
                obs.update(part)
        except FloatingPointError:
            _check_finite(torch.tensor(float("nan")), self.name)

    def _segments(self, rows: torch.Tensor) -> list[torch.Tensor]:
        if self.split_at is None:
            return [rows]
        k = int(self.split_at)
        return [rows[:, :k], rows[:, k:]]

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self._observe(x)
            return x
        if not self.enabled or (self.allow_uncalibrated and self.scale is None):
            return x
        rows = as_rows(x, self.channel_axis)
        if self.spec.dynamic:
            qp = choose_qparams(rows, self.spec.fmt, self.spec.gran, self.spec.symmetric)
            _check_finite(qp.scale, self.name)
            out = fake_quantize(rows, self.spec.fmt, self.spec.gran, qp)
        else:
            g = self._group()
            out = torch.cat([fake_quantize(part.contiguous(), self.spec.fmt, self.spec.gran, self._qparams(g, i))
                             for i, part in enumerate(self._segments(rows))], dim=1)
        return from_rows(out, x, self.channel_axis)

    def dynamic_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, QParams]:
        """Grid values of a dynamic quantizer's rows of `x` and their scales, for an integer kernel:
        `dequantize` of them is exactly what `forward` gives."""
        rows = as_rows(x, self.channel_axis)
        qp = choose_qparams(rows, self.spec.fmt, self.spec.gran, self.spec.symmetric)
        _check_finite(qp.scale, self.name)
        return quantize(rows, self.spec.fmt, self.spec.gran, qp), qp

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Grid values of `x` under the static scales (what serialization packs)."""
        return quantize(as_rows(x, self.channel_axis), self.spec.fmt, self.spec.gran, self.qparams)

    def extra_repr(self) -> str:
        extra = "" if self.split_at is None else f", split at {int(self.split_at)}"
        return self.spec.short() + extra


EDGE_UNITS = 1_000_000  # noise-level edges are stored as integers in these units


def _known_level(name: str) -> float:
    level = current_noise_level()
    if level is None or math.isnan(level):
        why = "no timestep is known" if level is None else "the batch mixes timesteps"
        raise RuntimeError(f"quantizer {name} has per-timestep scales but {why}: call the denoiser through its "
                           "forward with one timestep per call (dmquant attaches a timestep hook) or set one with "
                           "dmquant.timestep.noise_level(...)")
    return float(level)


def _check_finite(t: torch.Tensor, name: str) -> None:
    if torch.compiler.is_compiling():  # no data-dependent branch in a compiled graph: a runtime assert
        torch._assert_async(torch.isfinite(t).all(), f"non-finite (NaN/inf) values reached quantizer {name or '?'}")
        return
    if not torch.isfinite(t).all():
        raise FloatingPointError(f"non-finite (NaN/inf) values reached quantizer {name or '?'}: "
                                 "check the model's inputs or run it in higher precision")
