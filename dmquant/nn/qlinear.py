"""QuantLinear: nn.Linear with quantized weight and input."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .qmodule import QuantModule


class QuantLinear(QuantModule, nn.Linear):
    """Linear with quantized weight and input."""
    INPUT_AXIS = -1

    @classmethod
    def empty_like(cls, module: nn.Linear) -> "QuantLinear":
        return cls(module.in_features, module.out_features, bias=module.bias is not None, device="meta")

    def float_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.bias)

