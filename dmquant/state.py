"""What a quantized component carries (`module.dmquant_state`) and how to find quantized parts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .components import DENOISER_ATTRS, TEXT_ENCODER_ATTRS, get_path
from .config import Recipe
from .nn import QuantModule, TensorQuantizer
from .plans import LayerPlan
from .timestep import attach_timestep_hook


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
