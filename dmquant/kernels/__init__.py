"""Real low-bit kernels behind the `backend` option: "fbgemm" (CPU int8), "cuda" (int8 / fp8).

A kernel module provides `unsupported_reason(layer) -> str | None`, `prepare(layer) -> packed` and
`run(layer, packed, x) -> y`. Layers a kernel cannot run stay on fake quantization, the reference.
"""
from __future__ import annotations

from types import ModuleType

from . import fbgemm, gpu

KERNELS: dict[str, ModuleType] = {fbgemm.NAME: fbgemm, gpu.NAME: gpu}


def get_kernel(backend: str) -> ModuleType:
    if backend not in KERNELS:
        raise ValueError(f"unknown kernel backend {backend!r}; use one of {['fake', *KERNELS]}")
    return KERNELS[backend]


def available_backends() -> list[str]:
    return ["fake", *(name for name, k in KERNELS.items() if k.available())]
