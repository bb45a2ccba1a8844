"""Other quantization libraries through the same harness, so users choose with numbers.

A backend spec is "tool:config": quanto:int8 (W8A8), quanto:w8, quanto:w4, torchao:int8dq (dynamic
int8 activations + int8 weights), torchao:int8wo (weight-only), modelopt:int8 / modelopt:fp8 (fake
quant, where nvidia-modelopt is installed). The denoiser is quantized in place; text encoders and the
VAE stay FP, as with dmquant's default recipes.
"""
from __future__ import annotations

from typing import Any, Callable

from dmquant.components import denoiser_path, get_path


def _quanto(config: str) -> Callable[[Any, Callable | None], None]:
    from optimum import quanto

    weights = {"int8": quanto.qint8, "w8": quanto.qint8, "w4": quanto.qint4}[config]
    activations = quanto.qint8 if config == "int8" else None

    def apply(model: Any, calibrate: Callable | None) -> None:
        quanto.quantize(model, weights=weights, activations=activations)
        if activations is not None and calibrate is not None:
            with quanto.Calibration():  # quanto's static activation scales need a pass over data
                calibrate()
        quanto.freeze(model)

    return apply


def _torchao(config: str) -> Callable[[Any], None]:
    from torchao import quantization as q

    cfg = {"int8dq": q.Int8DynamicActivationInt8WeightConfig, "int8wo": q.Int8WeightOnlyConfig}[config]()
    return lambda model, calibrate: q.quantize_(model, cfg)


def _modelopt(config: str) -> Callable[[Any], None]:
    import modelopt.torch.quantization as mtq

    cfg = {"int8": mtq.INT8_DEFAULT_CFG, "fp8": mtq.FP8_DEFAULT_CFG}[config]
    return lambda model, calibrate: mtq.quantize(model, cfg, forward_loop=calibrate and (lambda _: calibrate()))


TOOLS = {"quanto": (_quanto, ("int8", "w8", "w4")), "torchao": (_torchao, ("int8dq", "int8wo")),
         "modelopt": (_modelopt, ("int8", "fp8"))}


def apply_backend(pipe: Any, spec: str, calibrate: Callable[[], Any] | None = None) -> Any:
    """Quantize `pipe`'s denoiser with another library, e.g. apply_backend(pipe, "quanto:int8");
    `calibrate()` runs representative data for tools with static activation scales."""
    tool, _, config = spec.partition(":")
    if tool not in TOOLS or config not in TOOLS[tool][1]:
        valid = [f"{t}:{c}" for t, (_, cs) in TOOLS.items() for c in cs]
        raise ValueError(f"unknown backend {spec!r}; valid: {', '.join(valid)}")
    try:
        apply = TOOLS[tool][0](config)
    except ImportError as err:
        raise ImportError(f"backend {spec} needs the {tool} package installed: {err}") from err
    apply(get_path(pipe, denoiser_path(pipe)), calibrate)
    return pipe
