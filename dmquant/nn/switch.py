"""Turning quantization off and on without undoing it: the float reference of a quantized model.

Algorithms that match a quantized block to its float self (block reconstruction, distillation) run
the same modules twice; with quantizers disabled a quantized layer computes `float_forward` on its
float weight (plus any low-rank branch), exactly what the unquantized layer did.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from .qmodule import QuantModule
from .quantizer import TensorQuantizer


def set_quantization_enabled(module: nn.Module, enabled: bool) -> None:
    """Enable or disable every quantizer under `module` (weights, inputs, attention)."""
    for q in module.modules():
        if isinstance(q, TensorQuantizer):
            q.enabled = enabled


@contextlib.contextmanager
def quantization_disabled(*modules: nn.Module) -> Iterator[None]:
    """Inside, quantized layers compute in float; on exit each quantizer's previous state returns."""
    quantizers = [q for m in modules for q in m.modules() if isinstance(q, TensorQuantizer)]
    previous = [q.enabled for q in quantizers]
    for q in quantizers:
        q.enabled = False
    try:
        yield
    finally:
        for q, was in zip(quantizers, previous):
            q.enabled = was


@contextlib.contextmanager
def weight_cache_disabled(*modules: nn.Module) -> Iterator[None]:
    """Inside, float-master layers fake-quantize their weight on every call instead of caching it, so
    calibrating a large model holds one float copy of it, not two (one layer's copy at a time)."""
    layers = [m for mod in modules for m in mod.modules() if isinstance(m, QuantModule)]
    for layer in layers:
        layer.set_weight_cache(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_weight_cache(True)


@contextlib.contextmanager
def serving(layers: list[QuantModule]) -> Iterator[None]:
    """Layers may be given trial weights (`QuantModule.serve`) inside; all stop serving on exit."""
    try:
        yield
    finally:
        for layer in layers:
            layer.serve(None)
