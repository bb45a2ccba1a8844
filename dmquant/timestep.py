"""The current noise level, read once per denoiser call by one removable hook.

Timestep-aware quantizers (a scale per timestep group) need to know where in the trajectory the
model is. A forward pre-hook on the denoiser reads its timestep argument, normalises it to a noise
level in [0, 1] (t / `timestep_scale`, e.g. t / 1000 for DDPM-trained models, sigma for flow models),
and sets one context value for the duration of the call; quantizers read `current_noise_level()`.
Keying on the noise level, not the step index, keeps a model calibrated with one scheduler and step
count valid under another.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
from typing import Any, Iterator

import torch
from torch import nn

_NOISE: contextvars.ContextVar[float | None] = contextvars.ContextVar("dmquant_noise_level", default=None)


def current_noise_level() -> float | None:
    """Normalised noise level of the denoiser call in progress (None outside a hooked call, NaN for
    a batch that mixes timesteps)."""
    return _NOISE.get()


@contextlib.contextmanager
def noise_level(value: float) -> Iterator[None]:
    """Set the noise level by hand, e.g. to run one block of a denoiser outside its forward."""
    token = _NOISE.set(float(value))
    try:
        yield
    finally:
        _NOISE.reset(token)


def level_of(t: Any, timestep_scale: float) -> float:
    """The noise level of a denoiser call's timestep argument: t / timestep_scale. The one reader every
    consumer uses (the inference hook, the trajectory recorder); a batch of mixed timesteps has no
    single noise level (NaN)."""
    return _timestep_value(t) / timestep_scale


def _timestep_value(t: Any) -> float:
    if isinstance(t, torch.Tensor):
        if t.numel() == 0:
            raise ValueError("empty timestep tensor")
        flat = t.detach().reshape(-1).float()
        # Samplers use one t per call; a batch of mixed timesteps has no single noise level (NaN).
        return float(flat[0]) if torch.all(flat == flat[0]) else float("nan")
    return float(t)


class TimestepHook:
    """Installs on a denoiser: sets the context noise level from its `kwarg` argument each call."""

    def __init__(self, module: nn.Module, timestep_scale: float = 1000.0, kwarg: str = "timestep") -> None:
        if timestep_scale <= 0:
            raise ValueError(f"timestep_scale must be positive, got {timestep_scale}")
        self.timestep_scale, self.kwarg = float(timestep_scale), kwarg
        params = list(inspect.signature(module.forward).parameters)
        self._position = params.index(kwarg) if kwarg in params else None
        self._tokens: list[contextvars.Token] = []
        self._handles = [module.register_forward_pre_hook(self._enter, with_kwargs=True),
                         module.register_forward_hook(self._exit, always_call=True)]

    def _enter(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.kwarg in kwargs:
            t = kwargs[self.kwarg]
        elif self._position is not None and self._position < len(args):
            t = args[self._position]
        else:
            t = None  # no timestep: per-timestep quantizers raise their own error if reached
        level = None if t is None else level_of(t, self.timestep_scale)
        self._tokens.append(_NOISE.set(level))

    def _exit(self, *_: Any) -> None:
        if self._tokens:
            _NOISE.reset(self._tokens.pop())

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def attach_timestep_hook(module: nn.Module, timestep_scale: float = 1000.0, kwarg: str = "timestep") -> TimestepHook:
    """Attach (once) the hook that tracks the noise level of `module`'s calls; returns it."""
    hook = getattr(module, "dmquant_timestep_hook", None)
    if hook is None:
        hook = TimestepHook(module, timestep_scale, kwarg)
        module.dmquant_timestep_hook = hook
    return hook
