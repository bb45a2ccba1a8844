"""Which quantized module replaces which float module type."""
from __future__ import annotations

from torch import nn

from .qconv import QuantConv1d, QuantConv2d, QuantConv3d
from .qlinear import QuantLinear
from .qmodule import QuantModule

QUANT_MODULES: dict[type[nn.Module], type[QuantModule]] = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
}


def quant_class_for(module: nn.Module) -> type[QuantModule] | None:
    """The quantized class for a float module (subclasses such as LoRACompatibleLinear included)."""
    if isinstance(module, QuantModule):
        return None
    for base in type(module).__mro__:
        if base in QUANT_MODULES:
            return QUANT_MODULES[base]
    return None
