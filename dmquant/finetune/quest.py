"""QuEST (Wang et al. 2024) as the recipe step `quest`: fine-tune only the layers that matter.

Two kinds of layers are trained, everything else stays frozen at its PTQ state: the layers carrying
temporal information (the time-embedding path, `dmquant.families.temporal_for`), whose error
shifts every block at every step, and the most bit-sensitive layers, ranked by a measured sensitivity:
the denoiser's output MSE against the float model when only that one layer is quantized (weights and
inputs), on evenly spaced calls of the calibration trajectory. The selected layers train a QALoRA
(merged into their low-bit weights afterwards) and, with `lsq`, their activation step sizes per
timestep group. QuEST updates the selected weights themselves; a LoRA keeps the float weights intact
(they are the teacher) and the step parameter-efficient.
"""
from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

from ..algorithms.hooks import output_tensors
from ..families import temporal_for
from ..nn.qmodule import QuantModule
from ..nn.quantizer import TensorQuantizer
from ..nn.switch import quantization_disabled
from .distill import DistillResult, on_device
from .qalora import finetune_layers, weight_quantized_layers

log = logging.getLogger(__name__)


@torch.no_grad()
def layer_sensitivity(denoiser: nn.Module, calls: list, layers: dict[str, QuantModule],
                      samples: int = 4) -> dict[str, float]:
    """{layer: output MSE vs float with only that layer quantized}, on `samples` evenly spaced calls."""
    picks = torch.linspace(0, len(calls) - 1, min(samples, len(calls))).round().long().unique().tolist()
    device = next(denoiser.parameters()).device
    inputs = [on_device(calls[i].kwargs, device) for i in picks]
    out = lambda kw: output_tensors(denoiser(**kw))[0].float()  # noqa: E731
    found = {}
    with quantization_disabled(denoiser):
        targets = [out(kw) for kw in inputs]
        for name, layer in layers.items():
            quantizers = [q for q in layer.modules() if isinstance(q, TensorQuantizer)]
            for q in quantizers:
                q.enabled = True
            try:
                found[name] = sum(float((out(kw) - t).pow(2).mean()) for kw, t in zip(inputs, targets)) / len(inputs)
            finally:
                for q in quantizers:
                    q.enabled = False
    return found


def select_layers(denoiser: nn.Module, calls: list, top: float, temporal: str | None, samples: int,
                  report: dict[str, Any]) -> dict[str, QuantModule]:
    """The temporal layers plus the `top` fraction (at least one) of the others by sensitivity."""
    layers = weight_quantized_layers(denoiser)
    chosen = {n: m for n, m in layers.items() if re.search(temporal or temporal_for(denoiser), n)}
    others = {n: m for n, m in layers.items() if n not in chosen}
    sens = layer_sensitivity(denoiser, calls, others, samples)
    ranked = sorted(sens, key=sens.get, reverse=True)[: max(1, round(top * len(others)))] if others else []
    chosen.update({n: others[n] for n in ranked})
    report.update(temporal=sorted(set(chosen) - set(ranked)), sensitive={n: sens[n] for n in ranked})
    log.info("quest: training %d temporal and %d sensitive layers of %d", len(chosen) - len(ranked), len(ranked),
             len(layers))
    return chosen


def apply_quest(modules: list[nn.Module], run: Any, rank: int = 8, top: float = 0.25, temporal: str | None = None,
                samples: int = 4, lsq: bool = True, scale_aware: bool = True, **loop: Any) -> DistillResult:
    """Recipe step `quest`: selective QALoRA fine-tuning of the temporal layers (regex `temporal`) and
    the `top` fraction of the other weight-quantized layers by sensitivity (measured on `samples`
    trajectory calls); with `lsq`, only those layers' activation step sizes learn. Loop arguments:
    `dmquant.finetune.DistillConfig`.

    >>> dmquant.quantize(pipe, "quest-w4a4")
    """
    if not 0 < top <= 1:
        raise ValueError(f"quest: top is a fraction of the layers in (0, 1], got {top}")
    report: dict[str, Any] = {}
    select = lambda d, calls: select_layers(d, calls, top, temporal, samples, report)  # noqa: E731
    result = finetune_layers(modules, run, "quest", select, rank, lsq, scale_aware, **loop)
    result.notes.update(report)
    return result
