"""Measured latency per layer and candidate, for a latency budget next to the bytes budget.

Each searched layer is timed on its own recorded input (one denoiser call of the trajectory) as the
deployed layer would run: the candidate's quantized module on the kernel the dispatch table picks for
it (`backend`, default "auto"; simulated where no kernel takes the format, which is then slower than
float, and the search sees that), FP as the float layer. Latencies are this machine's: they are not
cached with the sensitivities.
"""
from __future__ import annotations

import re
import statistics
import time
from typing import Any

import torch
from torch import nn

from ..components import set_path
from ..config import QuantSpec
from ..nn import quant_class_for
from .candidates import Candidate

_LATENCY = re.compile(r"([0-9]*\.?[0-9]+)(x|ms|us|s)")


@torch.no_grad()
def layer_inputs(model: nn.Module, names: list[str], call: Any) -> dict[str, torch.Tensor]:
    """The input each named layer receives in one denoiser call (its first, if called several times)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: seen.setdefault(n, args[0].detach().clone())) for n in names]
    try:
        model(**call.kwargs)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in seen]
    if missing:
        raise ValueError(f"layers never called by the denoiser: {missing[:5]}")
    return seen


@torch.no_grad()
def _seconds(layer: nn.Module, x: torch.Tensor, repeats: int) -> float:
    layer(x)  # warm-up: kernels prepare their packed weights on the first call
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        layer(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_latency(model: nn.Module, names: list[str], call: Any, candidates: list[Candidate],
                    input_spec: QuantSpec | None, backend: str = "auto", repeats: int = 20) -> torch.Tensor:
    """(layers, candidates) median seconds of one forward of each layer under each candidate."""
    inputs = layer_inputs(model, names, call)
    out = torch.zeros(len(names), len(candidates), dtype=torch.float64)
    for li, name in enumerate(names):
        layer = model.get_submodule(name)
        for ci, cand in enumerate(candidates):
            if cand.weight is None:
                out[li, ci] = _seconds(layer, inputs[name], repeats)
                continue
            quantized = quant_class_for(layer).from_float(layer, cand.weight, input_spec, backend, name)
            set_path(model, name, quantized)  # the swap shares the float weight: nothing is copied
            try:
                out[li, ci] = _seconds(quantized, inputs[name], repeats)
            finally:
                set_path(model, name, layer)
    return out


def latency_limit(limit: str, latency: torch.Tensor, candidates: list[str]) -> float:
    """Seconds the searched layers may take together: `0.8x` (of all of them in FP) or `12ms` / `900us`
    / `0.01s` absolute."""
    m = _LATENCY.fullmatch(str(limit).strip().lower().replace(" ", ""))
    if m is None:
        raise ValueError(f"latency budget {limit!r}: give a factor of the FP layers' time ('0.8x') or a time "
                         "('12ms', '900us', '0.01s')")
    value, unit = float(m.group(1)), m.group(2)
    if unit == "x":
        if "fp" not in candidates:
            raise ValueError("a latency factor ('0.8x') is relative to FP: include the fp candidate")
        return value * float(latency[:, candidates.index("fp")].sum())
    return value * {"ms": 1e-3, "us": 1e-6, "s": 1.0}[unit]
