"""Algorithms: pure functions returning named results, plus thin shells that collect statistics.

Every recipe step is registered in `STEPS` as `name -> fn(modules, run, **args)`: `modules` are the
quantized components, `run()` feeds the calibration data through them (hooks observe it), and the
function returns a small dict of per-layer figures for the log. Steps run in recipe order.
"""
from __future__ import annotations

from typing import Any, Callable

from ..calibrate import calibrate_ranges
from .adaround import SoftRounding, annealed_beta, grid_neighbours, layer_rounding, soft_rounding
from .gptq import GPTQResult, gptq
from .hessian import HessianCollector, apply_gptq
from .reconstruction import DEFAULT_BLOCKS, UnitResult, apply_block_reconstruction, find_units
from .shortcut import split_shortcuts
from .temporal import TEMPORAL, calibrate_temporal
from .vq import VQResult, apply_vq, kmeans, vector_quantize
from ..transforms import apply_rotation, apply_smoothquant, apply_svd
from ..finetune import apply_efficientdm, apply_quest, apply_qvgen  # after .reconstruction: it imports it

StepFunction = Callable[..., Any]
STEPS: dict[str, StepFunction] = {"gptq": apply_gptq, "ranges": calibrate_ranges,
                               "adaround": apply_block_reconstruction, "split_shortcut": split_shortcuts,
                               "efficientdm": apply_efficientdm, "quest": apply_quest, "qvgen": apply_qvgen,
                               "temporal": calibrate_temporal, "vq": apply_vq,
                               "smoothquant": apply_smoothquant, "rotate": apply_rotation, "svd": apply_svd}

__all__ = ["gptq", "GPTQResult", "apply_gptq", "HessianCollector", "STEPS", "StepFunction",
           "SoftRounding", "soft_rounding", "layer_rounding", "grid_neighbours", "annealed_beta",
           "apply_block_reconstruction", "find_units", "UnitResult", "DEFAULT_BLOCKS",
           "split_shortcuts", "calibrate_temporal", "TEMPORAL", "vector_quantize", "VQResult", "apply_vq", "kmeans"]
