"""Applying a resolved recipe: plan the layers, swap them, run the recipe's steps, pack.

A recipe resolves into a *plan* `{layer name: LayerPlan}` per component. Applying a plan swaps float
layers for quantized ones and wraps attention processors; plans are plain data, so a saved model
re-applies its plan onto a fresh skeleton (`dmquant.serialization`). `dmquant.quantize` (api.py) adds
what needs the layers above: recipes searched per model and calibration data recorded from a pipeline.
"""
from __future__ import annotations

import functools
import logging
import re
import time
from typing import Any, Callable

from torch import nn
from tqdm.auto import tqdm

from .components import BARE, DENOISER_ATTRS, find_components, set_path
from .config import Recipe
from .families import family_for_module, skip_patterns, timestep_scale_for
from .filters import LayerFilter
from .memory import release_freed_memory
from .nn import QuantModule, is_attention, quant_class_for, quantize_attention
from .nn.switch import weight_cache_disabled
from .observe import observing, uncalibrated_passthrough
from .plans import LayerPlan
from .provenance import provenance
from .state import QuantState, quant_layers, quantized_components, sync_state, track_timesteps
from .steps import StepRun, run_steps
from .transforms import attach_transforms
from .transforms.peft import register_peft

log = logging.getLogger(__name__)


def plan_for(module: nn.Module, recipe: Recipe) -> dict[str, LayerPlan]:
    """Which layers of `module` the recipe quantizes, and how (mixed precision via overrides)."""
    exclude = recipe.exclude if recipe.exclude is not None else \
        skip_patterns(family_for_module(module), without=recipe.include_roles)
    selected = LayerFilter(recipe.include, exclude)
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
    register_peft()  # LoRA adapters loaded later merge into the low-rank branch, not into a decoded copy
    for name, step in tqdm(plan.items(), desc="quantize", unit="layer", leave=False, disable=None):
        child = module.get_submodule(name)
        if step.kind == "attention":
            quantize_attention(child, recipe.attention, name, recipe.backend)
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
            release_freed_memory()  # the layer's float temporaries, so they do not add up to the peak
    for name, child in module.named_modules():  # diffusers' fuse_qkv_projections would build float layers
        if hasattr(child, "fuse_projections") and isinstance(getattr(child, "to_q", None), QuantModule):
            child.fuse_projections = functools.partial(_refuse_fusing, name)


def _refuse_fusing(name: str, *_: Any, **__: Any) -> None:
    raise ValueError(f"attention {name or 'module'} has quantized Q/K/V projections: fusing them "
                     "(fuse_qkv_projections) would build float layers from their decoded weights; fuse before "
                     "quantizing instead")


def pack_weights(obj: Any) -> Any:
    """Drop the float master weights of every quantized layer of `obj`, keeping packed codes and scales
    (what `quantize` does by default once its steps are done; irreversible)."""
    for module in quantized_components(obj).values():
        for layer in quant_layers(module).values():
            layer.pack_weight()
            release_freed_memory()
    return obj


def hold_codes(obj: Any) -> Any:
    """Make every quantized layer of `obj` keep its own packed codes beside a CPU kernel's copy (by
    default the kernel's copy is the only one after the first call): needed before `torch.compile`
    of a model that already ran on the CPU int8 kernels, whose opaque layout does not trace."""
    for module in quantized_components(obj).values():
        for layer in quant_layers(module).values():
            layer.hold_codes(keep=True)
    return obj


def components_to_quantize(obj: Any, recipe: Recipe) -> dict[str, nn.Module]:
    """{path: module} the recipe quantizes in `obj`; refuses components already quantized."""
    components = find_components(obj, recipe.components)
    for path, module in components.items():
        if getattr(module, "dmquant_state", None) is not None:
            raise ValueError(f"{path} is already quantized (recipe {module.dmquant_state.recipe.name})")
        adapted = [n for n, m in module.named_modules() if hasattr(m, "lora_A")]
        if adapted:  # quantizing would wrap peft's layers and factors; a later fuse would lose the LoRA
            raise ValueError(f"{path} carries unfused LoRA adapters ({adapted[0]}, ...): fuse_lora() or "
                             "unload_lora_weights() before quantizing, or load the LoRA after quantizing")
    return components


def apply_recipe(obj: Any, recipe: Recipe, runner: Callable[[Any], Any] | None = None, *,
                 timestep_scale: float | None = None, pack: bool = True) -> Any:
    """Quantize `obj` in place with a resolved recipe; `runner(obj)` feeds calibration data (needed
    when the recipe calibrates). See `dmquant.quantize` for the arguments."""
    if recipe.needs_calibration and runner is None:
        raise ValueError(f"recipe {recipe.name} calibrates: give calibration data (dmquant.quantize(obj, recipe, "
                         "calibration=...))")
    components = components_to_quantize(obj, recipe)
    if timestep_scale is None:
        timestep_scale = timestep_scale_for(obj)
    t0 = time.perf_counter()
    for path, module in components.items():
        plan = plan_for(module, recipe)
        if not plan:
            log.warning("recipe %s selects no layers in %s", recipe.name, path)
        apply_plan(module, plan, recipe, pack=pack and not recipe.needs_calibration)
        scale = timestep_scale if path in (*DENOISER_ATTRS, BARE) else None
        module.dmquant_state = QuantState(recipe, plan, timestep_scale=scale)
        track_timesteps(module, scale)
    calib_info = None
    if recipe.needs_calibration:
        calib_info = _calibrate(obj, recipe, runner, list(components.values()))
        calib_info["seconds"] = round(time.perf_counter() - t0, 3)
    for module in components.values():
        module.dmquant_state.provenance = provenance(recipe, calibration=calib_info)
        sync_state(module)
        track_timesteps(module, module.dmquant_state.timestep_scale, inference=True)
    return pack_weights(obj) if pack else obj


def _calibrate(obj: Any, recipe: Recipe, runner: Any, modules: list[nn.Module]) -> dict[str, Any]:
    """Run the recipe's steps in order, then freeze the static activation scales still missing."""
    run = StepRun(runner, obj)
    with weight_cache_disabled(*modules), uncalibrated_passthrough(*modules):
        outcomes = run_steps(recipe.steps, modules, run)
    for module in modules:
        module.dmquant_state.steps = outcomes
    with weight_cache_disabled(*modules), observing(*modules, uncalibrated_only=True):  # final weights' ranges
        run()
    data = getattr(runner, "description", getattr(runner, "__name__", "callable"))
    seconds = {o.name: o.seconds for o in outcomes}
    return {**(data if isinstance(data, dict) else {"data": data}), "step_seconds": seconds}
