"""`quantize(obj, recipe)`: the one verb that changes a pipeline or model in place.

A recipe resolves into a *plan* `{layer name: LayerPlan}` per component. Applying a plan swaps float
layers for quantized ones and wraps attention processors; plans are plain data, so a saved model
re-applies its plan onto a fresh skeleton (`dmquant.serialization`).
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from .calibrate import StepRun, observing, prepare_calibration, uncalibrated_passthrough
from .components import BARE, DENOISER_ATTRS, TEXT_ENCODER_ATTRS, find_components, get_path, set_path
from .algorithms import STEPS
from .config import Recipe
from .filters import LayerFilter
from .nn import QuantModule, TensorQuantizer, is_attention, quant_class_for, quantize_attention
from .nn.switch import weight_cache_disabled
from .plans import LayerPlan, record_in_host_config
from .provenance import provenance
from .recipes import get_recipe
from .timestep import attach_timestep_hook
from .transforms.layer import attach as attach_transforms

log = logging.getLogger(__name__)


@dataclass
class QuantState:
    """Attached to every quantized component as `module.dmquant_state`."""

    recipe: Recipe
    plan: dict[str, LayerPlan]
    provenance: dict[str, Any] = field(default_factory=dict)
    timestep_scale: float | None = None  # denoisers: t / timestep_scale is the noise level quantizers key on


def track_timesteps(module: nn.Module, timestep_scale: float | None, inference: bool = False) -> None:
    """Attach the noise-level hook to a denoiser whose forward takes a timestep. For `inference`
    (quantization done) only where some quantizer has per-timestep scales: a hook nothing reads
    would only stand in the way of `torch.compile(fullgraph=True)`."""
    needed = timestep_scale is not None and (not inference or any(
        q.spec.timestep_groups > 1 for q in module.modules() if isinstance(q, TensorQuantizer)))
    hook = getattr(module, "dmquant_timestep_hook", None)
    if needed:
        attach_timestep_hook(module, timestep_scale)
    elif hook is not None:
        hook.remove()
        del module.dmquant_timestep_hook


def plan_for(module: nn.Module, recipe: Recipe) -> dict[str, LayerPlan]:
    """Which layers of `module` the recipe quantizes, and how (mixed precision via overrides)."""
    selected = LayerFilter(recipe.include, recipe.exclude)
    plan: dict[str, LayerPlan] = {}
    for name, child in module.named_modules():
        if not name:
            continue
        if recipe.attention is not None and is_attention(child) and selected(name):
            plan[name] = LayerPlan("attention")
        if quant_class_for(child) is None or not selected(name):
            continue
        weight, inp = recipe.weight, recipe.input
        for rule in recipe.overrides:
            if rule.skip and _search(rule.pattern, name):
                weight = inp = None
            elif _search(rule.pattern, name):
                weight, inp = rule.weight or weight, rule.input or inp
        if weight is not None or inp is not None:
            plan[name] = LayerPlan("layer", weight, inp)
    return plan


def _search(pattern: str, name: str) -> bool:
    return re.search(pattern, name) is not None


def apply_plan(module: nn.Module, plan: dict[str, LayerPlan], recipe: Recipe, init_scales: bool = True,
               pack: bool = False) -> None:
    """Swap layers per the plan (weights quantized from their current values when init_scales). With
    `pack`, each layer drops its float weight right after its swap, so quantizing a large model never
    holds a second copy of it."""
    for name, step in tqdm(plan.items(), desc="quantize", unit="layer", leave=False, disable=None):
        child = module.get_submodule(name)
        if step.kind == "attention":
            quantize_attention(child, recipe.attention, name)
            continue
        cls = quant_class_for(child)
        if cls is None:
            raise TypeError(f"layer {name} ({type(child).__name__}) cannot be quantized")
        layer = cls.from_float(child, step.weight, step.input, recipe.backend, name, init_scales)
        attach_transforms(layer, step)
        set_path(module, name, layer)
        del child
        if pack:
            layer.pack_weight()


def pack_weights(obj: Any) -> Any:
    """Drop the float master weights of every quantized layer of `obj`, keeping packed codes and scales
    (what `quantize` does by default once its steps are done; irreversible)."""
    for module in quantized_components(obj).values():
        for layer in quant_layers(module).values():
            layer.pack_weight()
    return obj


def quantize(obj: Any, recipe: str | Path | Recipe, *, calibration: Any = None, backend: str | None = None,
             timestep_scale: float = 1000.0, pack: bool = True) -> Any:
    """Quantize a diffusers pipeline (its denoiser, and any other components the recipe names) or a
    bare model in place, and return it.

    >>> pipe = dmquant.quantize(pipe, "w8a8")                  # built-in recipe
    >>> pipe = dmquant.quantize(pipe, "q-diffusion-w4a8")      # calibrates on the recipe's default prompts
    >>> pipe = dmquant.quantize(pipe, "tfmq-w4a8", calibration={"prompts": prompts, "timesteps": "uniform:10"})
    >>> model = dmquant.quantize(model, "my_recipe.yaml", calibration=lambda m: m(**example))

    Recipes with static activation scales or algorithm steps need data. On a pipeline it is recorded
    from the float model (a `dmquant.calibration.CalibrationSet`: the recipe's defaults, overridden by
    `calibration` given as a dict of settings or a list of prompts); a callable is called with `obj`
    to run representative inputs (the only way for a bare model). `backend` overrides the recipe's
    ("fake": simulated; "auto": the best kernel per layer, see `dmquant.kernels`; "cpu", "fbgemm",
    "cuda"). `pack` (default) leaves only packed codes and scales in each layer once the recipe's steps
    are done; `pack=False` keeps the float masters for further training or float references (then
    `dmquant.pack_weights(obj)` packs later). `timestep_scale` normalises the denoiser's timestep into the noise
    level per-timestep scales key on (1000 for DDPM-trained and most flow models, 1 for FLUX, whose
    pipeline already passes t / 1000).
    """
    recipe = get_recipe(recipe, obj)  # auto-<budget> recipes are searched on obj (dmquant.mixed)
    if backend is not None:
        recipe = recipe.replace(backend=backend)
    components = find_components(obj, recipe.components)
    for path, module in components.items():
        if getattr(module, "dmquant_state", None) is not None:
            raise ValueError(f"{path} is already quantized (recipe {module.dmquant_state.recipe.name})")
    runner, t0 = None, time.perf_counter()
    if recipe.needs_calibration:
        runner = prepare_calibration(obj, recipe.calibration, calibration, timestep_scale)  # float data, before any swap
    for path, module in components.items():
        plan = plan_for(module, recipe)
        if not plan:
            log.warning("recipe %s selects no layers in %s", recipe.name, path)
        apply_plan(module, plan, recipe, pack=pack and runner is None)
        scale = timestep_scale if path in (*DENOISER_ATTRS, BARE) else None
        module.dmquant_state = QuantState(recipe, plan, timestep_scale=scale)
        track_timesteps(module, scale)
    calib_info = None
    if runner is not None:
        calib_info = _calibrate(obj, recipe, runner, list(components.values()))
        calib_info["seconds"] = round(time.perf_counter() - t0, 3)
    for module in components.values():
        module.dmquant_state.provenance = provenance(recipe, calibration=calib_info)
        record_in_host_config(module)
        track_timesteps(module, module.dmquant_state.timestep_scale, inference=True)
    return pack_weights(obj) if pack else obj


def _calibrate(obj: Any, recipe: Recipe, runner: Any, modules: list[nn.Module]) -> dict[str, Any]:
    """Run the recipe's steps in order, then freeze the static activation scales still missing."""
    run = StepRun(runner, obj)
    steps = {}
    with weight_cache_disabled(*modules), uncalibrated_passthrough(*modules):
        for step in recipe.steps:
            t0 = time.perf_counter()
            STEPS[step.name](modules, run, **step.args)
            steps[step.name] = round(time.perf_counter() - t0, 3)
            log.info("step %s took %.1f s", step.name, steps[step.name])
    with weight_cache_disabled(*modules), observing(*modules, uncalibrated_only=True):  # final weights' ranges
        run()
    data = getattr(runner, "description", getattr(runner, "__name__", "callable"))
    return {**(data if isinstance(data, dict) else {"data": data}), "step_seconds": steps}


def quantized_components(obj: Any) -> dict[str, nn.Module]:
    """{path: module} of the components of `obj` that carry a quantization state."""
    if isinstance(obj, nn.Module):
        return {"model": obj} if getattr(obj, "dmquant_state", None) is not None else {}
    found = {}
    for path in (*DENOISER_ATTRS, *TEXT_ENCODER_ATTRS, "vae.decoder"):
        try:
            module = get_path(obj, path)
        except AttributeError:
            continue
        if getattr(module, "dmquant_state", None) is not None:
            found[path] = module
    return found


def quant_layers(module: nn.Module) -> dict[str, QuantModule]:
    return {n: m for n, m in module.named_modules() if isinstance(m, QuantModule)}
