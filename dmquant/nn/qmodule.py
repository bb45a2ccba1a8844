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
    transform: nn.Module | None

    def setup_quant(self, weight: QuantSpec | None, input: QuantSpec | None, backend: str = "fake",
                    name: str = "", init_scales: bool = True) -> None:
        self.weight_quantizer = TensorQuantizer(weight, None, f"{name}.weight") if weight else None
        self.input_quantizer = TensorQuantizer(input, self.INPUT_AXIS, f"{name}.input") if input else None
        self.lowrank = None  # high-precision low-rank branch (SVDQuant / LoRA), filled by algorithms
        self.transform = None  # input smoothing / rotation (dmquant.transforms), applied before the quantizer
        self.backend = backend
        self.qname = name
        self._wcache: tuple[tuple, torch.Tensor] | None = None
        self._kcache: tuple[tuple, object] | None = None  # (key, packed kernel weights or None)
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

    def _needs_grad(self) -> bool:
        wq = self.weight_quantizer
        return torch.is_grad_enabled() and (self.weight.requires_grad or (wq is not None and wq.scale.requires_grad))

    def _weight_key(self) -> tuple:
        wq = self.weight_quantizer
        w, s = self.weight, wq.scale
        return (w.data_ptr(), w._version, w.device, s.data_ptr(), s._version, wq.generation)

    def quantized_weight(self) -> torch.Tensor:
        wq = self.weight_quantizer
        if wq is None or not wq.enabled:
            return self.weight
        if self._needs_grad():
            return wq(self.weight)  # training: no cache, gradients flow through the STE
        key = self._weight_key()
        if self._wcache is None or self._wcache[0] != key:
            self._wcache = (key, wq(self.weight))
        return self._wcache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform is not None:  # kernel, fake quantization and low-rank branch all see (x / s) Q
            x = self.transform(x)
        out = self.kernel_forward(x)
        if out is None:
            xq = self.input_quantizer(x) if self.input_quantizer is not None else x
            out = self.float_forward(xq, self.quantized_weight())
        if self.lowrank is not None:
            out = out + self.lowrank(x)
        return out

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Run on the backend's real low-bit kernel; None falls back to fake quantization (the
        reference), e.g. for shapes or formats the kernel lacks, or when gradients are needed."""
        if self.backend == "fake" or self.weight_quantizer is None or self._needs_grad():
            return None
        iq = self.input_quantizer
        if not self.weight_quantizer.enabled or (iq is not None and (
                not iq.enabled or iq.observing or (iq.scale is None and iq.allow_uncalibrated))):
            return None  # the float reference, calibration and pass-through run on the fake path
        from ..kernels import get_kernel

        kernel = get_kernel(self.backend)
        key = self._weight_key()
        if self._kcache is None or self._kcache[0] != key:
            reason = kernel.unsupported_reason(self)
            if reason is not None and (self._kcache is None or self._kcache[1] is not None):
                log.info("%s stays on fake quantization (%s backend: %s)", self.qname, self.backend, reason)
            self._kcache = (key, None if reason else kernel.prepare(self))
        packed = self._kcache[1]
        return None if packed is None else kernel.run(self, packed, x)

    def float_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def empty_like(cls, module: nn.Module) -> "QuantModule":
        raise NotImplementedError
