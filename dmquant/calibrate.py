"""Static activation scales: observe activations on calibration data, then freeze them.

The protocol is prepare (observers on) -> run data -> convert (freeze ranges into scales, per the
spec's observer and timestep groups); `observing(model)` is the context-manager form. While recipe
steps run, quantizers that have no scale yet pass data through (`uncalibrated_passthrough`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

from torch import nn

from .nn.quantizer import TensorQuantizer


def static_quantizers(model: nn.Module, uncalibrated_only: bool = False) -> list[TensorQuantizer]:
    """Activation quantizers whose scales must come from data (optionally only those without one)."""
    return [m for m in model.modules()
            if isinstance(m, TensorQuantizer) and m.channel_axis is not None and not m.spec.dynamic
            and not (uncalibrated_only and m.calibrated)]


@contextlib.contextmanager
def observing(*models: nn.Module, uncalibrated_only: bool = False) -> Iterator[list[TensorQuantizer]]:
    """Inside: static activation quantizers record statistics and pass data through unquantized.
    On exit (without error): ranges freeze into scales."""
    with observing_quantizers([q for m in models for q in static_quantizers(m, uncalibrated_only)]) as qs:
        yield qs


@contextlib.contextmanager
def observing_quantizers(quantizers: list[TensorQuantizer]) -> Iterator[list[TensorQuantizer]]:
    """`observing` for an explicit list. Every quantizer leaves observation on exit, also on error;
    if some saw no data, the others still freeze and the first error is raised."""
    for q in quantizers:
        q.start_observing()
    try:
        yield quantizers
    except BaseException:
        for q in quantizers:
            q._observers = None
        raise
    errors = []
    for q in quantizers:
        try:
            q.finish_observing()
        except RuntimeError as err:
            errors.append(err)
    if errors:
        raise errors[0]


@contextlib.contextmanager
def uncalibrated_passthrough(*models: nn.Module) -> Iterator[None]:
    """Static activation quantizers without scales yet pass data through (e.g. while GPTQ runs)."""
    quantizers = [q for m in models for q in static_quantizers(m)]
    for q in quantizers:
        q.allow_uncalibrated = True
    try:
        yield
    finally:
        for q in quantizers:
            q.allow_uncalibrated = False


def calibrate_ranges(modules: list[nn.Module], run: Callable[[], Any]) -> dict[str, int]:
    """Recipe step `ranges`: freeze the static activation scales still missing now (e.g. before a
    step that trains them); scales an earlier step set (temporal layers) are kept."""
    with observing(*modules, uncalibrated_only=True) as quantizers:
        run()
    return {"calibrated": len(quantizers)}


class StepRun:
    """What a recipe step calls to feed calibration data: `run()`; `run.trajectory` is the recorded
    denoiser inputs when the data came from `dmquant.calibration` (None for a plain callable)."""

    def __init__(self, runner: Callable[[Any], Any], obj: Any) -> None:
        self.runner, self.obj = runner, obj

    def __call__(self) -> None:
        self.runner(self.obj)

    @property
    def trajectory(self) -> Any:
        return getattr(self.runner, "trajectory", None)


def prepare_calibration(obj: Any, recipe_calibration: dict[str, Any], calibration: Any,
                        timestep_scale: float = 1000.0) -> Callable[[Any], Any]:
    """The data runner for `quantize`, resolved while `obj` is still in float.

    A callable runs as given. For a pipeline, None / a list of prompts / a dict of settings becomes a
    `dmquant.calibration.CalibrationSet` (recipe defaults, then the caller's overrides) that records
    the float model's denoiser trajectory now; anything with `prepare(obj)` is prepared the same way."""
    if callable(calibration) and not hasattr(calibration, "prepare"):
        return calibration
    if isinstance(obj, nn.Module) and not hasattr(calibration, "prepare"):
        raise ValueError("a bare model cannot generate its own calibration data: pass calibration=<callable that "
                         "runs the model on representative inputs> (or quantize the whole pipeline)")
    if not hasattr(calibration, "prepare"):
        # The calibration layer sits above the core; it is imported only when a pipeline needs it.
        from importlib import import_module

        settings = {"timestep_scale": timestep_scale, **recipe_calibration}  # the hook's and the trajectory's
        if isinstance(calibration, dict):
            settings.update(calibration)
        elif isinstance(calibration, (list, tuple)):
            settings["prompts"] = list(calibration)
        elif calibration is not None:
            raise TypeError(f"calibration must be a callable, a list of prompts, a dict of settings or a "
                            f"CalibrationSet, got {type(calibration).__name__}")
        calibration = import_module("dmquant.calibration").CalibrationSet(**settings)
    return calibration.prepare(obj)
