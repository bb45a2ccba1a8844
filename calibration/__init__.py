"""Calibrators for timestep-aware post-training quantization.

The activation-observation protocol they build on is `dmquant.calibrate.observing`; algorithm
steps such as GPTQ live in `dmquant.algorithms`.
"""
