"""The mixin every quantized layer shares: weight/input quantizers, a low-rank slot, a backend.

A quantized layer subclasses its float type (so `isinstance(m, nn.Linear)` still holds for diffusers
and peft) and keeps the float weight as a Parameter; its forward uses the fake-quantized weight, which
is cached in inference so repeated denoising steps do not re-quantize it.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import QuantSpec
from .quantizer import TensorQuantizer

log = logging.getLogger(__name__)


class QuantModule:
    """Mixin for quantized layers; subclasses define `INPUT_AXIS` and `float_forward(x, weight)`."""

    INPUT_AXIS: int = -1
    weight_quantizer: TensorQuantizer | None
    input_quantizer: TensorQuantizer | None
    lowrank: nn.Module | None

    def setup_quant(self, weight: QuantSpec | None, input: QuantSpec | None, backend: str = "fake",
                    name: str = "", init_scales: bool = True) -> None:
        self.weight_quantizer = TensorQuantizer(weight, None, f"{name}.weight") if weight else None
        self.input_quantizer = TensorQuantizer(input, self.INPUT_AXIS, f"{name}.input") if input else None
        self.lowrank = None  # high-precision low-rank branch (SVDQuant / LoRA), filled by algorithms
        self.backend = backend
        self.qname = name
        self._wcache: tuple[tuple, torch.Tensor] | None = None
        if init_scales and self.weight_quantizer is not None:
            self.weight_quantizer.init_from(self.weight.detach())

    @classmethod
    def from_float(cls, module: nn.Module, weight: QuantSpec | None, input: QuantSpec | None,
                   backend: str = "fake", name: str = "", init_scales: bool = True) -> "QuantModule":
        """Wrap a float layer, sharing its parameters (no copy)."""
        q = cls.empty_like(module)
        q.weight, q.bias = module.weight, module.bias
        q.train(module.training)
        q.setup_quant(weight, input, backend, name, init_scales)
        return q

    def quantized_weight(self) -> torch.Tensor:
        wq = self.weight_quantizer
        if wq is None:
            return self.weight
        if torch.is_grad_enabled() and (self.weight.requires_grad or wq.scale.requires_grad):
            return wq(self.weight)  # training: no cache, gradients flow through the STE
        key = (self.weight.data_ptr(), self.weight._version, wq.scale.data_ptr(), wq.scale._version)
        if self._wcache is None or self._wcache[0] != key:
            self._wcache = (key, wq(self.weight))
        return self._wcache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = self.input_quantizer(x) if self.input_quantizer is not None else x
        out = self.kernel_forward(xq) if self.backend != "fake" else None
        if out is None:
            out = self.float_forward(xq, self.quantized_weight())
        if self.lowrank is not None:
            out = out + self.lowrank(x)
        return out

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Run on a real low-bit kernel; None means this layer falls back to fake quantization."""
        return None

    def float_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def empty_like(cls, module: nn.Module) -> "QuantModule":
        raise NotImplementedError
