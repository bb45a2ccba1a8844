"""Algorithms: pure functions returning named results, plus thin shells that collect statistics.

Each shell is a recipe step `fn(modules, run, **args)`: `modules` are the quantized components, `run()`
feeds the calibration data through them (hooks observe it), and the function returns a small dict of
per-layer figures for the log. The registry of steps is `dmquant.steps`.
"""
from .adaround import SoftRounding, annealed_beta, grid_neighbours, layer_rounding, soft_rounding
from .gptq import GPTQResult, gptq
from .hessian import HessianCollector, apply_gptq
from .ranges import calibrate_ranges
from .reconstruction import UnitResult, apply_block_reconstruction
from .shortcut import split_shortcuts
from .temporal import calibrate_temporal
from .units import Unit, find_units
from .vq import VQResult, apply_vq, kmeans, vector_quantize

__all__ = ["gptq", "GPTQResult", "apply_gptq", "HessianCollector", "calibrate_ranges",
           "SoftRounding", "soft_rounding", "layer_rounding", "grid_neighbours", "annealed_beta",
           "apply_block_reconstruction", "find_units", "Unit", "UnitResult",
           "split_shortcuts", "calibrate_temporal", "vector_quantize", "VQResult", "apply_vq", "kmeans"]
