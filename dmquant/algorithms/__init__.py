"""Algorithms: pure functions returning named results, plus thin shells that collect statistics.

Every recipe step is registered in `STEPS` as `name -> fn(modules, run, **args)`: `modules` are the
quantized components, `run()` feeds the calibration data through them (hooks observe it), and the
function returns a small dict of per-layer figures for the log. Steps run in recipe order.
"""
from __future__ import annotations

from typing import Any, Callable

from .gptq import GPTQResult, gptq
from .hessian import HessianCollector, apply_gptq

StepFunction = Callable[..., Any]
STEPS: dict[str, StepFunction] = {"gptq": apply_gptq}

__all__ = ["gptq", "GPTQResult", "apply_gptq", "HessianCollector", "STEPS", "StepFunction"]
