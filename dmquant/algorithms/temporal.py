"""Temporal layers (TFMQ-DM): the time-embedding path depends on the timestep alone, so its inputs
form a finite set, one per timestep the sampler visits. Finite set calibration observes those
layers on exactly that set (every visited step, not the subset of steps kept for the other layers),
one scale per visited noise level when the spec has timestep groups. Block reconstruction leaves them
out (adaround's `skip`) or rounds them first on that same set (its `temporal`: TIAR, `tiar.py`).
"""
from __future__ import annotations

import logging
import re
from typing import Any

from torch import nn

from ..families import temporal_for
from ..nn.qmodule import QuantModule
from ..observe import observing_quantizers

log = logging.getLogger(__name__)



def temporal_layers(module: nn.Module, pattern: str | None = None) -> dict[str, QuantModule]:
    """{name: layer} of the quantized layers matching `pattern` (default: the family's temporal layers,
    `dmquant.families.temporal_for`)."""
    rx = re.compile(pattern or temporal_for(module))
    return {n: m for n, m in module.named_modules() if isinstance(m, QuantModule) and rx.search(n)}


def calibrate_temporal(modules: list[nn.Module], run: Any, pattern: str | None = None) -> dict[str, int]:
    """Recipe step `temporal`: static input scales of the temporal layers of the denoiser (the first
    component) from one call per visited timestep. Needs the recorded trajectory (a CalibrationSet)."""
    trajectory = getattr(run, "trajectory", None)
    if trajectory is None or not trajectory.calls:
        raise ValueError("the temporal step needs the recorded denoiser trajectory: quantize a pipeline "
                         "(calibration=None, a dict or a CalibrationSet), not a plain callable")
    denoiser = modules[0]
    quantizers = [m.input_quantizer for m in temporal_layers(denoiser, pattern).values()
                  if m.input_quantizer is not None and not m.input_quantizer.spec.dynamic]
    if not quantizers:
        log.warning("temporal step: no temporal layer with a static input quantizer matches %r",
                    pattern or temporal_for(denoiser))
        return {"layers": 0, "timesteps": 0}
    calls = list(trajectory.timestep_calls())
    with observing_quantizers(quantizers):
        trajectory.replay(denoiser, calls)
    return {"layers": len(quantizers), "timesteps": len(calls)}
