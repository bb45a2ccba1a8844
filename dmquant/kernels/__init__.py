"""Real low-bit kernels behind the `backend` option: "fbgemm" (CPU int8), "cuda" (GPU int8 / fp8).

A `Kernel` has tensor-level functions (`prepack_linear`/`linear`, `prepack_conv`/`conv`, each with a
`supports_*` check) and the module protocol `QuantModule.kernel_forward` calls: `unsupported_reason`,
`prepare` (pack the layer's own codes and scales) and `run`. Layers a kernel cannot run stay on
fake quantization, the reference. Packed weights are not serializable: modules rebuild them lazily.

    >>> kernel = get_kernel("fbgemm")
    >>> packed = kernel.prepack_linear(codes, scale, bias)   # int8 (out, in), (out,) scales
    >>> y = kernel.linear(x, packed)                          # dynamic per-token int8 activations
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import cpu, cuda


@dataclass(frozen=True)
class Kernel:
    """One backend: tensor-level kernels plus the adapter from quantized layers to them."""

    name: str
    device: str  # where the layer's weights must live
    formats: tuple[str, ...]  # weight = activation formats the kernel multiplies
    available: Callable[[], bool]
    supports_linear: Callable[[int, int, str], str | None]  # (in, out, format)
    prepack_linear: Callable[..., Any]
    linear: Callable[..., torch.Tensor]  # (x, packed, input_scale=None, granularity="token")
    supports_conv: Callable[..., str | None] | None = None
    prepack_conv: Callable[..., Any] | None = None
    conv: Callable[..., torch.Tensor] | None = None  # (x, packed, input_scale=None)

    # -- module protocol (dmquant.nn.QuantModule.kernel_forward) ----------------------------------
    def unsupported_reason(self, layer: Any) -> str | None:
        """Why `layer` cannot run on this kernel (None when it can)."""
        from ..granularity import PerChannel, PerTensor, PerToken
        from ..nn.qconv import _QuantConvNd
        from ..nn.qlinear import QuantLinear

        wq, iq = layer.weight_quantizer, layer.input_quantizer
        if wq is None or iq is None:
            return "needs both weight and input quantization"
        w, a = wq.spec, iq.spec
        if not (w.symmetric and a.symmetric and w.format == a.format and w.format in self.formats):
            return f"needs symmetric {' or '.join(self.formats)} weights and activations of the same format"
        if not isinstance(w.gran, (PerChannel, PerTensor)):
            return f"weights must be quantized per channel or per tensor, not {w.granularity}"
        if not isinstance(a.gran, (PerToken, PerTensor)):
            return f"activations must be quantized per token or per tensor, not {a.granularity}"
        if iq.split_at is not None:
            return "a split-shortcut input has two activation scales"
        if not self.available():
            return f"the {self.name} kernels are not available here"
        if layer.weight.device.type != self.device:
            return f"the layer's weights are on {layer.weight.device.type}, the kernel runs on {self.device}"
        if isinstance(layer, QuantLinear):
            return self.supports_linear(layer.in_features, layer.out_features, w.format)
        if isinstance(layer, _QuantConvNd):
            if self.supports_conv is None:
                return f"the {self.name} backend has no convolution kernel"
            if isinstance(a.gran, PerToken):
                return "per-pixel activation scales do not factor out of a convolution (use granularity: tensor)"
            return self.supports_conv(layer.in_channels, layer.out_channels, layer.kernel_size, layer.groups,
                                      layer.padding_mode)
        return f"no {self.name} kernel for {type(layer).__name__}"

    def prepare(self, layer: Any) -> Any:
        """Pack the layer's weight codes and scales (exactly what fake quantization uses)."""
        wq = layer.weight_quantizer
        codes = wq.codes(layer.weight.detach()).reshape(layer.weight.shape)
        if wq.spec.format == "int8":
            codes = codes.to(torch.int8)
        scale = wq.scale.detach().reshape(-1)
        if hasattr(layer, "in_features"):
            return self.prepack_linear(codes, scale, layer.bias)
        assert self.prepack_conv is not None
        return self.prepack_conv(codes, scale, layer.bias, layer.stride, layer.padding, layer.dilation,
                                 layer.groups, layer.padding_mode)

    def run(self, layer: Any, packed: Any, x: torch.Tensor) -> torch.Tensor:
        from ..granularity import PerToken

        iq = layer.input_quantizer
        scale = None if iq.spec.dynamic else iq.qparams.scale
        if hasattr(layer, "in_features"):
            return self.linear(x, packed, scale, "token" if isinstance(iq.spec.gran, PerToken) else "tensor")
        assert self.conv is not None
        return self.conv(x, packed, scale)


KERNELS: dict[str, Kernel] = {
    cpu.NAME: Kernel(cpu.NAME, "cpu", ("int8",), lambda: cpu.onednn_available() or cpu.fbgemm_available(),
                     cpu.supports_linear, cpu.prepack_linear, cpu.int8_linear,
                     cpu.supports_conv, cpu.prepack_conv, cpu.int8_conv),
    cuda.NAME: Kernel(cuda.NAME, "cuda", ("int8", "fp8_e4m3"), cuda.cuda_available,
                      cuda.supports_linear, cuda.prepack_linear, cuda.linear),
}


def get_kernel(backend: str) -> Kernel:
    """The kernel for a backend name ("fake" has none: it is the module's own forward)."""
    if backend not in KERNELS:
        raise ValueError(f"unknown kernel backend {backend!r}; use one of {['fake', *KERNELS]}")
    return KERNELS[backend]


def available_backends() -> list[str]:
    """Backends that can run here; "fake" (simulated quantization) always can."""
    return ["fake", *(name for name, k in KERNELS.items() if k.available())]


__all__ = ["Kernel", "KERNELS", "get_kernel", "available_backends", "cpu", "cuda"]
