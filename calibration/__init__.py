"""Timestep-aware calibration: record the denoiser's inputs along the real sampling trajectory, at
chosen steps, and replay them through the quantized model for range estimation and algorithm steps.

    >>> from dmquant.calibration import CalibrationSet
    >>> dmquant.quantize(pipe, "q-diffusion-w4a8", calibration=CalibrationSet(num_prompts=32, timesteps="uniform:10"))

Range estimators live in `dmquant.observers`, per-timestep scales in `dmquant.nn.TensorQuantizer`,
and algorithm steps (GPTQ, AdaRound/BRECQ, shortcut splitting, temporal calibration) in
`dmquant.algorithms`: the core owns what a saved model needs; this package owns the data.
"""
from .dataset import CalibrationSet, TrajectoryRunner
from .timesteps import (
    TimestepSelection,
    apportion,
    eda_steps,
    parse_selection,
    select_steps,
    step_weights,
    uniform_steps,
)
from .trajectory import DenoiserCall, Trajectory, TrajectoryRecorder, step_summary

__all__ = ["CalibrationSet", "TrajectoryRunner", "Trajectory", "DenoiserCall", "TrajectoryRecorder",
           "TimestepSelection", "parse_selection", "select_steps", "uniform_steps", "eda_steps", "step_weights",
           "apportion", "step_summary"]
