"""What a quantized component carries (`module.dmquant_state`) and how to find quantized parts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .components import DENOISER_ATTRS, TEXT_ENCODER_ATTRS, get_path
from .config import Recipe
from .nn import QuantModule, TensorQuantizer
from .plans import FORMAT_VERSION, QUANT_METHOD, LayerPlan, plan_to_json
from .timestep import attach_timestep_hook


@dataclass
class QuantState:
    """Attached to every quantized component as `module.dmquant_state`."""

    recipe: Recipe
    plan: dict[str, LayerPlan]
    provenance: dict[str, Any] = field(default_factory=dict)
    timestep_scale: float | None = None  # denoisers: t / timestep_scale is the noise level quantizers key on
    steps: list[Any] = field(default_factory=list)  # what the recipe's steps returned (dmquant.steps.StepOutcome)


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


def layer_plan(layer: QuantModule) -> LayerPlan:
    """What a quantized layer holds, as its plan: its quantizers' specs and what the transform steps
    left on it (smoothing, rotation, low-rank branch, merged LoRA)."""
    wq, iq, t, b = layer.weight_quantizer, layer.input_quantizer, layer.transform, layer.lowrank
    fields = t.plan_fields() if t is not None else {}
    return LayerPlan("layer", wq.spec if wq is not None else None, iq.spec if iq is not None else None, **fields,
                     lowrank_rank=b.svd_rank if b is not None else 0, lora=tuple(b.adapters) if b is not None else (),
                     vq=(layer.vq_bits, layer.vq_dim) if layer.is_vq else None)


def plan_of(module: nn.Module) -> dict[str, LayerPlan]:
    """{name: LayerPlan} of every quantized layer and attention module of `module`, in module order (a
    layer peft wraps for an unfused LoRA under its own name, as it is once the adapter is unloaded)."""
    plan = {}
    for name, child in module.named_modules():
        if getattr(child, "dmquant_attention", None) is not None:
            plan[name] = LayerPlan("attention")
        if isinstance(child, QuantModule):
            plan[name.removesuffix(".base_layer")] = layer_plan(child)
    return plan


def sync_state(module: nn.Module) -> None:
    """Re-read the component's plan from its modules and write it into its host library's config, so
    the host's own `save_pretrained` saves it (diffusers models), or its `from_pretrained` refuses the
    packed weights loudly (transformers models: they know no "dmquant" method) instead of loading
    random float weights. Called whenever a step or a user verb changed the quantized layers."""
    state = getattr(module, "dmquant_state", None)
    if state is None:
        return
    state.plan = plan_of(module)
    entry = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "recipe": state.recipe.to_dict(),
             "plan": plan_to_json(state.plan), "timestep_scale": state.timestep_scale}
    if hasattr(module, "register_to_config"):  # diffusers ConfigMixin
        module.register_to_config(quantization_config=entry)
    elif hasattr(getattr(module, "config", None), "to_dict"):  # transformers PretrainedConfig
        module.config.quantization_config = entry
