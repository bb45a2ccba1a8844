"""Algorithms: pure functions returning named results, plus thin shells that collect statistics."""
from .gptq import GPTQResult, gptq
from .hessian import HessianCollector, apply_gptq

__all__ = ["gptq", "GPTQResult", "apply_gptq", "HessianCollector"]
