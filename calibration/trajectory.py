"""Recording a denoiser's inputs along the real sampling trajectory, and replaying them.

A forward pre-hook on the denoiser keeps, for the chosen steps only, every call's arguments bound by
name (latents, timestep, text embeddings, extra conditioning), moved to CPU. Replaying them through a
quantized denoiser is how calibration and algorithm steps see the data: no pipeline, no VAE, no text
encoder, exactly the inputs the float model met. Per-layer statistics are streamed by the
quantizers' observers during replay; raw tensors are kept only for the inputs here.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from dmquant.families import DEFAULT_TIMESTEP_SCALE, family_for_module
from dmquant.timestep import level_of


def _to(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device, copy=True)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


@dataclass
class DenoiserCall:
    """One recorded denoiser call: keyword arguments (bound by name), its step and noise level."""

    kwargs: dict[str, Any]
    step: int
    noise_level: float


@dataclass
class Trajectory:
    """Recorded denoiser inputs at the selected steps, plus every noise level the sampler visited."""

    calls: list[DenoiserCall] = field(default_factory=list)
    visited: list[float] = field(default_factory=list)  # noise levels of all steps, in sampling order
    timestep_kwarg: str = "timestep"
    timestep_scale: float = DEFAULT_TIMESTEP_SCALE  # timestep = noise level * timestep_scale (the recorder's)

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(c.kwargs) for c in self.calls)

    def noise_levels(self) -> list[float]:
        return sorted({c.noise_level for c in self.calls})

    def replay(self, model: nn.Module, calls: list[DenoiserCall] | None = None, progress: bool = False) -> None:
        """Run `model` on the recorded inputs (on the model's device), outputs discarded."""
        device = next(model.parameters()).device
        with torch.no_grad():
            for call in tqdm(calls if calls is not None else self.calls, desc="replay", unit="call",
                             disable=not progress, leave=False):
                model(**_to(call.kwargs, device))

    def timestep_calls(self) -> Iterator[DenoiserCall]:
        """One call per visited noise level: the first recorded inputs with the timestep replaced.
        For layers whose input depends only on the timestep (TFMQ-DM's finite set calibration)."""
        if not self.calls:
            return
        base = self.calls[0]
        t = torch.as_tensor(base.kwargs[self.timestep_kwarg])
        for level in dict.fromkeys(self.visited):
            kwargs = dict(base.kwargs)
            value = level * self.timestep_scale
            kwargs[self.timestep_kwarg] = torch.full_like(t, value if t.is_floating_point() else round(value))
            yield DenoiserCall(kwargs, -1, level)


class TrajectoryRecorder:
    """Context manager on a denoiser: records calls whose step index `keep(step)` accepts.

    Steps are counted per sampling run: `new_run()` restarts the count (one pipeline call = one run).
    Consecutive calls at the same timestep are one step: pipelines that run the conditional and the
    unconditional branch as separate calls (Wan, FLUX with true CFG) call the denoiser twice a step."""

    def __init__(self, model: nn.Module, keep: Callable[[int], bool], timestep_scale: float | None = None,
                 timestep_kwarg: str | None = None, max_calls: int | None = None,
                 summary: Callable[[dict[str, Any], Any], torch.Tensor] | None = None) -> None:
        family = family_for_module(model)  # None outside the table: scale 1000, kwarg "timestep"
        if timestep_scale is None:
            timestep_scale = family.timestep_scale if family is not None else DEFAULT_TIMESTEP_SCALE
        if timestep_kwarg is None:
            timestep_kwarg = family.timestep_kwarg if family is not None else "timestep"
        self.model, self.keep, self.max_calls, self.summary = model, keep, max_calls, summary
        self.timestep_scale, self.kwarg = timestep_scale, timestep_kwarg
        self.trajectory = Trajectory(timestep_kwarg=timestep_kwarg, timestep_scale=timestep_scale)
        self.summaries: dict[int, list[torch.Tensor]] = {}
        self._signature = inspect.signature(model.forward)
        self._step, self._last = -1, None
        self._first_run = True
        self._pending: dict[str, Any] | None = None
        self._handles: list[Any] = []

    def new_run(self) -> None:
        self._step, self._last = -1, None

    def _pre(self, _m: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        bound = {**{k: v for k, v in bound.items() if k != "kwargs"}, **bound.get("kwargs", {})}
        if self.kwarg not in bound:
            raise ValueError(f"denoiser call without a {self.kwarg!r} argument: a trajectory records calls by timestep")
        level = level_of(bound[self.kwarg], self.timestep_scale)  # the same reader as the inference hook
        if level != self._last:  # a new step (NaN, a batch of mixed timesteps, never equals: one step a call)
            self._step, self._last = self._step + 1, level
            if self._first_run:
                self.trajectory.visited.append(level)
        self._pending = None
        full = self.max_calls is not None and len(self.trajectory.calls) >= self.max_calls
        if self.keep(self._step) and not full:
            self.trajectory.calls.append(DenoiserCall(_to(bound, "cpu"), self._step, level))
        if self.summary is not None:
            self._pending = bound

    def _post(self, _m: nn.Module, _args: tuple, output: Any) -> None:
        if self._pending is not None:
            self.summaries.setdefault(self._step, []).append(self.summary(self._pending, output))

    def run(self, fn: Callable[[], Any], first: bool) -> None:
        """Call `fn` (one sampling run) with the step count reset."""
        self._first_run = first
        self.new_run()
        fn()

    def __enter__(self) -> "TrajectoryRecorder":
        self._handles = [self.model.register_forward_pre_hook(self._pre, with_kwargs=True),
                         self.model.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()


def step_summary(kwargs: dict[str, Any], output: Any) -> torch.Tensor:
    """A per-call feature for EDA-DM's step selection: statistics of the denoiser's input latents
    and output (per-channel means and standard deviations, overall abs-max)."""
    out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
    x = next(v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.dim() >= 4)
    feats = []
    for t in (x.detach().float(), out.detach().float()):
        per_channel = t.transpose(0, 1).reshape(t.shape[1], -1)
        feats += [per_channel.mean(1), per_channel.std(1), t.abs().amax().reshape(1)]
    return torch.cat(feats)
