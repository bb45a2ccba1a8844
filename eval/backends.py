"""Other quantization libraries through the same harness, so users choose with numbers.

A backend spec is "tool:config[@recipe]": quanto:int8 (W8A8), quanto:w8, quanto:w4, torchao:int8dq
(dynamic int8 activations + int8 weights), torchao:int8wo (weight-only), modelopt:int8 / modelopt:fp8
(fake quant, where nvidia-modelopt is installed), torch:bf16 (the whole denoiser cast to bf16), and
diffusers' own quantization backends the way a diffusers user reaches them, reloading the denoiser with
`from_pretrained(..., quantization_config=...)`: diffusers:torchao-int8wo, diffusers:torchao-int8dq,
diffusers:quanto-w8, diffusers:quanto-w4.

Like for like: a library quantizes exactly the layers the dmquant recipe after "@" quantizes
(default: w8a8 for 8-bit configs, w4a16 for quanto:w4), so first/last layers, embeddings and adaLN
stay FP on both sides. Left to themselves quanto and torchao take every Linear (quanto also every
LayerNorm), which is a different model. A tool that cannot take a layer (torchao has no Conv2d)
leaves it FP; modelopt keeps its own selection. The row says how many of the recipe's layers the
tool quantized, and how many others.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from dmquant.components import denoiser_path, get_path

LIKE_FOR_LIKE = {"int8": "w8a8", "w8": "w8a8", "w4": "w4a16", "int8dq": "w8a8", "int8wo": "w8a8", "fp8": "w8a8",
                 "torchao-int8wo": "w8a8", "torchao-int8dq": "w8a8", "quanto-w8": "w8a8", "quanto-w4": "w4a16"}
# Quantizes the denoiser in place, or returns the quantized model that replaces it.
Apply = Callable[[nn.Module, Callable | None, list[str]], nn.Module | None]


def _quanto(config: str) -> Apply:
    from optimum import quanto

    weights = {"int8": quanto.qint8, "w8": quanto.qint8, "w4": quanto.qint4}[config]
    activations = quanto.qint8 if config == "int8" else None

    def apply(model: nn.Module, calibrate: Callable | None, layers: list[str]) -> None:
        quanto.quantize(model, weights=weights, activations=activations, include=layers)
        if activations is not None and calibrate is not None:
            with quanto.Calibration():  # quanto's static activation scales need a pass over data
                calibrate()
        quanto.freeze(model)

    return apply


def _torchao(config: str) -> Apply:
    from torchao import quantization as q

    cfg = {"int8dq": q.Int8DynamicActivationInt8WeightConfig, "int8wo": q.Int8WeightOnlyConfig}[config]()

    def apply(model: nn.Module, calibrate: Callable | None, layers: list[str]) -> None:
        chosen = set(layers)
        q.quantize_(model, cfg, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in chosen)

    return apply


def _modelopt(config: str) -> Apply:
    import modelopt.torch.quantization as mtq

    cfg = {"int8": mtq.INT8_DEFAULT_CFG, "fp8": mtq.FP8_DEFAULT_CFG}[config]
    # modelopt's own layer selection (not restricted to the recipe's): the row's layer count says so.
    def apply(model: nn.Module, calibrate: Callable | None, layers: list[str]) -> None:
        mtq.quantize(model, cfg, forward_loop=calibrate and (lambda _: calibrate()))

    return apply


def _diffusers(config: str) -> Apply:
    """diffusers' `quantization_config` path: save the float denoiser, reload it quantized. Like for like
    through `modules_to_not_convert`: every Linear the dmquant recipe keeps in float."""
    import tempfile

    from diffusers import QuantoConfig, TorchAoConfig

    def make(skip: list[str]) -> Any:
        if config.startswith("torchao-"):
            from torchao import quantization as q

            kind = {"torchao-int8wo": q.Int8WeightOnlyConfig, "torchao-int8dq": q.Int8DynamicActivationInt8WeightConfig}
            return TorchAoConfig(kind[config](), modules_to_not_convert=skip)
        weights = {"quanto-w8": "int8", "quanto-w4": "int4"}[config]
        return QuantoConfig(weights_dtype=weights, modules_to_not_convert=skip)

    def apply(model: nn.Module, calibrate: Callable | None, layers: list[str]) -> nn.Module:
        chosen = set(layers)
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        skip = [n for n in linears if n not in chosen]
        if config.startswith("quanto-"):  # diffusers' quanto path matches a module's own name, not its path:
            keep = {n.rpartition(".")[2] for n in chosen}  # skip the names no chosen layer shares (the row
            skip = sorted({n.rpartition(".")[2] for n in skip} - keep)  # counts any layer this still takes)
        dtype = next(model.parameters()).dtype
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            return type(model).from_pretrained(folder, quantization_config=make(skip), torch_dtype=dtype).eval()

    return apply


def _cast(config: str) -> Apply:
    dtype = {"bf16": torch.bfloat16}[config]

    def apply(model: nn.Module, calibrate: Callable | None, layers: list[str]) -> None:
        model.to(dtype)
        # The pipeline keeps fp32 latents and text features: cast at the denoiser's boundary.
        model.register_forward_pre_hook(lambda m, a, k: (_to(a, dtype), _to(k, dtype)), with_kwargs=True)
        model.register_forward_hook(lambda m, a, out: _to(out, torch.float32))

    return apply


def _to(obj: Any, dtype: torch.dtype) -> Any:
    """Floating tensors inside tuples, lists and dicts converted to `dtype`; everything else as is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(x, dtype) for x in obj)
    if isinstance(obj, dict):
        return {k: _to(v, dtype) for k, v in obj.items()}
    return obj


TOOLS = {"quanto": (_quanto, ("int8", "w8", "w4")), "torchao": (_torchao, ("int8dq", "int8wo")),
         "modelopt": (_modelopt, ("int8", "fp8")), "torch": (_cast, ("bf16",)),
         "diffusers": (_diffusers, ("torchao-int8wo", "torchao-int8dq", "quanto-w8", "quanto-w4"))}


def recipe_layers(denoiser: nn.Module, recipe: str) -> list[str]:
    """The layers dmquant's `recipe` quantizes in this denoiser (names relative to it)."""
    from dmquant.apply import plan_for
    from dmquant.recipes import get_recipe

    return [name for name, step in plan_for(denoiser, get_recipe(recipe)).items() if step.kind == "layer"]


def tensor_bytes(t: torch.Tensor) -> int:
    """Stored bytes of a tensor, looking inside tensor subclasses (quanto, torchao) at their parts."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def module_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of `module` at their stored size."""
    seen: dict[int, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        seen.setdefault(id(t), tensor_bytes(t.data if isinstance(t, nn.Parameter) else t))
    return sum(seen.values())


def _signature(module: nn.Module) -> tuple[type, type | None]:
    weight = getattr(module, "weight", None)
    return type(module), type(weight.data) if isinstance(weight, nn.Parameter) else type(weight)


def apply_backend(pipe: Any, spec: str, calibrate: Callable[[], Any] | None = None) -> Any:
    """Quantize `pipe`'s denoiser with another library, e.g. apply_backend(pipe, "quanto:int8@w8a8");
    `calibrate()` runs representative data for tools with static activation scales. Sets
    `pipe.backend_info` = {"layers": quantized / of the recipe's, "recipe": ..., "bytes": denoiser bytes}."""
    tool_config, _, recipe = spec.partition("@")
    tool, _, config = tool_config.partition(":")
    if tool not in TOOLS or config not in TOOLS[tool][1]:
        valid = [f"{t}:{c}" for t, (_, cs) in TOOLS.items() for c in cs]
        raise ValueError(f"unknown backend {spec!r}; valid: {', '.join(valid)} (optionally @<dmquant recipe>)")
    try:
        apply = TOOLS[tool][0](config)
    except ImportError as err:
        raise ImportError(f"backend {spec} needs the {tool} package installed: {err}") from err
    path = denoiser_path(pipe)
    denoiser = get_path(pipe, path)
    layers = [] if tool == "torch" else recipe_layers(denoiser, recipe or LIKE_FOR_LIKE[config])
    before = {n: _signature(m) for n, m in denoiser.named_modules() if n}
    replaced = apply(denoiser, calibrate, layers)
    if replaced is not None:
        setattr(pipe, path, replaced)  # diffusers pipelines register components by attribute
        denoiser = replaced
    changed = {n for n, m in denoiser.named_modules() if n in before and _signature(m) != before[n]}
    wanted = set(layers)
    others = len({n for n in changed - wanted if not any(c.startswith(n + ".") for c in wanted)})
    pipe.backend_info = {"recipe": None if tool == "torch" else recipe or LIKE_FOR_LIKE[config],
                         "layers": f"{len(changed & wanted)}/{len(layers)}" + (f" +{others} other" if others else "")
                         if layers else "all (cast)", "bytes": module_bytes(denoiser)}
    return pipe
