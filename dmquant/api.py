"""`quantize(obj, recipe)`: the one verb that changes a pipeline or model in place.

A recipe resolves into a *plan* `{layer name: LayerPlan}` per component. Applying a plan swaps float
layers for quantized ones and wraps attention processors; plans are plain data, so a saved model
re-applies its plan onto a fresh skeleton (`dmquant.serialization`).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn
from tqdm.auto import tqdm

from .calibrate import observing
from .components import DENOISER_ATTRS, TEXT_ENCODER_ATTRS, find_components, get_path, set_path
from .algorithms import STEPS
from .config import QuantSpec, Recipe
from .filters import LayerFilter
from .nn import QuantModule, is_attention, quant_class_for, quantize_attention
from .provenance import provenance
from .recipes import get_recipe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one layer: a quantized class with weight/input specs, or attention specs."""

    kind: str  # "layer" | "attention"
    weight: QuantSpec | None = None
    input: QuantSpec | None = None


@dataclass
class QuantState:
    """Attached to every quantized component as `module.dmquant_state`."""

    recipe: Recipe
    plan: dict[str, LayerPlan]
    provenance: dict[str, Any] = field(default_factory=dict)


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


def apply_plan(module: nn.Module, plan: dict[str, LayerPlan], recipe: Recipe, init_scales: bool = True) -> None:
    """Swap layers per the plan (weights quantized from their current values when init_scales)."""
    for name, step in tqdm(plan.items(), desc="quantize", unit="layer", leave=False, disable=None):
        child = module.get_submodule(name)
        if step.kind == "attention":
            quantize_attention(child, recipe.attention, name)
            continue
        cls = quant_class_for(child)
        if cls is None:
            raise TypeError(f"layer {name} ({type(child).__name__}) cannot be quantized")
        set_path(module, name, cls.from_float(child, step.weight, step.input, recipe.backend, name, init_scales))


def quantize(obj: Any, recipe: str | Path | Recipe, *, calibration: Callable[[Any], Any] | None = None,
             backend: str | None = None) -> Any:
    """Quantize a diffusers pipeline (its denoiser, and any other components the recipe names) or a
    bare model in place, and return it.

    >>> pipe = dmquant.quantize(pipe, "w8a8")          # built-in recipe
    >>> model = dmquant.quantize(model, "my_recipe.yaml", calibration=lambda m: m(**example))

    `calibration` is called once with `obj` to run representative data when the recipe has static
    activation scales. `backend` overrides the recipe's ("fake", "fbgemm", "cuda").
    """
    recipe = get_recipe(recipe)
    if backend is not None:
        recipe = recipe.replace(backend=backend)
    components = find_components(obj, recipe.components)
    for path, module in components.items():
        if getattr(module, "dmquant_state", None) is not None:
            raise ValueError(f"{path} is already quantized (recipe {module.dmquant_state.recipe.name})")
    for path, module in components.items():
        plan = plan_for(module, recipe)
        if not plan:
            log.warning("recipe %s selects no layers in %s", recipe.name, path)
        apply_plan(module, plan, recipe)
        module.dmquant_state = QuantState(recipe, plan)
    calib_info = None
    if recipe.needs_calibration:
        if calibration is None:
            raise ValueError(f"recipe {recipe.name!r} needs calibration data (static activation scales or "
                             f"algorithm steps): pass calibration=<callable that runs the model on representative inputs>")
        modules = list(components.values())
        for step in recipe.steps:  # static activation quantizers pass data through while steps observe
            with observing(*modules):
                STEPS[step.name](modules, lambda: calibration(obj), **step.args)
        with observing(*modules):  # activation ranges of the final weights
            calibration(obj)
        calib_info = getattr(calibration, "description", getattr(calibration, "__name__", "callable"))
    for module in components.values():
        module.dmquant_state.provenance = provenance(recipe, calibration=calib_info)
    return obj


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
