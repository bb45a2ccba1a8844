"""Static activation scales: observe activations on calibration data, then freeze them (or train them).

The protocol is prepare (observers on) -> run data -> convert (freeze ranges into scales, per the
spec's observer and timestep groups); `observing(model)` is the context-manager form. While recipe
steps run, quantizers that have no scale yet pass data through (`uncalibrated_passthrough`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .nn.quantizer import TensorQuantizer


def activation_quantizers(model: nn.Module) -> list[TensorQuantizer]:
    """Every activation quantizer of `model` (layer inputs, attention Q/K/V and probabilities): not weights."""
    return [m for m in model.modules() if isinstance(m, TensorQuantizer) and m.channel_axis is not None]


def static_quantizers(model: nn.Module, uncalibrated_only: bool = False) -> list[TensorQuantizer]:
    """Activation quantizers whose scales must come from data (optionally only those without one)."""
    return [m for m in activation_quantizers(model) if not m.spec.dynamic and not (uncalibrated_only and m.calibrated)]


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
            q.abort_observing()
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


def trainable_static_scales(module: nn.Module, step: str) -> list[torch.Tensor]:
    """The calibrated static activation scales of `module`, marked trainable (LSQ); refuses when
    some have no scale yet, naming the `ranges` step that gives them one before `step`."""
    quantizers = static_quantizers(module)
    pending = [q.name for q in quantizers if q.observing or q.scale is None]
    if pending:
        raise ValueError(f"{step} lsq=True learns calibrated static activation scales, but {pending[:3]} have "
                         f"none yet: put a `ranges` step before `{step}` in the recipe")
    return [q.scale.requires_grad_(True) for q in quantizers]
