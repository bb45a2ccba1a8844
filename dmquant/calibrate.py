"""Static activation scales: observe activations on calibration data, then freeze them.

The protocol is prepare (observers on) -> run data -> convert (freeze min-max ranges into scales);
`observing(model)` is the context-manager form. Timestep-aware calibrators build on it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from .nn.quantizer import TensorQuantizer


def static_quantizers(model: nn.Module) -> list[TensorQuantizer]:
    """Activation quantizers whose scales must come from data."""
    return [m for m in model.modules()
            if isinstance(m, TensorQuantizer) and m.channel_axis is not None and not m.spec.dynamic]


@contextlib.contextmanager
def observing(*models: nn.Module) -> Iterator[list[TensorQuantizer]]:
    """Inside: static activation quantizers record min/max and pass data through unquantized.
    On exit (without error): ranges freeze into scales."""
    quantizers = [q for m in models for q in static_quantizers(m)]
    for q in quantizers:
        q.start_observing()
    try:
        yield quantizers
    except BaseException:
        for q in quantizers:
            q.observing = False
        raise
    for q in quantizers:
        q.finish_observing()
