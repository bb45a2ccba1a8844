"""Real low-bit kernels and the one table that picks them per layer.

A quantized layer's `backend` names a set of kernels (`BACKENDS`); `select_kernel` tries them in order
and the first that accepts the layer's (weight format, activation format, device, input dtype) runs
it. Layers no kernel accepts run simulated (fake quantization of packed codes decoded per call), and
`report()` / `dmquant info` say so per layer, with the reason.

| backend  | kernels, best first                                                                         |
|----------|---------------------------------------------------------------------------------------------|
| fake     | none: the simulated reference                                                               |
| fbgemm   | cpu-int: int2-8 weights x int2-8 activations on the CPU int8 GEMM (oneDNN, else fbgemm);     |
|          | group-wise weights: linears on dmquant's VNNI kernel (else one oneDNN GEMM per group),      |
|          | convolutions re-quantized to int8 per channel                                               |
| cpu      | cpu-int, then cpu-weight-only: int4 / int8 weights with bf16/fp16 activations (+ conv);  |
|          | 4-bit linears and 2-D convs on dmquant's AVX512-FP16 kernel where the CPU has it            |
| cuda     | cuda-int8 (`torch._int_mm`), cuda-fp8 (`torch._scaled_mm`)                                   |
| auto     | the kernels of the device the weights are on                                                |

Each kernel has tensor-level functions (tested against float64 references) and the module protocol
`unsupported_reason(layer, dtype)`, `prepare(layer, x)` (x: the first call's input, whose token count
may pick a layout), `run(layer, packed, x)`, `describe(layer, packed=None)`,
`gives_codes(layer, packed)`, `codes(layer, packed)`. Packed kernel weights are not serializable:
layers rebuild them lazily from their stored codes. A kernel whose layout gives the codes back exactly
(the CPU int8 GEMM, int4 / int8 weight-only) lets the layer drop its own copy: the weight is held once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..granularity import PerChannel, PerGroup, PerTensor, PerToken
from . import cpu, cuda, f16_gemm, weight_only
from .common import requantize_int8


def _is_linear(layer: Any) -> bool:
    return hasattr(layer, "in_features")


def _requantized(layer: Any) -> bool:
    """A group-wise convolution: its kernel multiplies the weight re-quantized per output channel
    (`common.requantize_int8`), which is within half an int8 step of the recipe's, not bit-exact."""
    return not _is_linear(layer) and isinstance(layer.weight_quantizer.spec.gran, PerGroup)


def _kernel_bits(layer: Any) -> int:
    """Width of the weight codes the kernel multiplies."""
    return 8 if _requantized(layer) else layer.weight_quantizer.spec.bits


@dataclass(frozen=True)
class Kernel:
    """Weight x activation GEMM kernels of one device, with the adapter from quantized layers to them."""

    name: str
    device: str  # where the layer's weights must live
    formats: tuple[str, ...]  # formats both operands may have
    available: Callable[[], bool]
    supports_linear: Callable[[int, int, str], str | None]  # (in, out, format)
    prepack_linear: Callable[..., Any]
    linear: Callable[..., torch.Tensor]  # (x, packed, input_scale=None, granularity="token", ...)
    supports_conv: Callable[..., str | None] | None = None
    prepack_conv: Callable[..., Any] | None = None
    conv: Callable[..., torch.Tensor] | None = None  # (x, packed, input_scale=None, granularity="tensor", ...)
    label: str = ""
    unpack_linear: Callable[[Any], torch.Tensor] | None = None  # packed -> int8 codes, exactly
    unpack_conv: Callable[[Any], torch.Tensor] | None = None
    group_wise: bool = False  # weight scales per group of inputs: linears exactly, convolutions re-quantized

    def unsupported_reason(self, layer: Any, dtype: torch.dtype | None = None) -> str | None:
        """Why `layer` cannot run on this kernel (None when it can)."""
        wq, iq = layer.weight_quantizer, layer.input_quantizer
        if wq is None or iq is None:
            return "needs both weight and input quantization"
        w, a = wq.spec, iq.spec
        same_family = w.format == a.format or (w.format.startswith("int") and a.format.startswith("int"))
        if not (w.symmetric and a.symmetric and same_family and w.format in self.formats and a.format in self.formats):
            return f"needs symmetric {'/'.join(self.formats)} weights and activations"
        group = w.gran.size if isinstance(w.gran, PerGroup) else None
        if group is not None and not self.group_wise:
            return f"the {self.name} kernels take no group-wise weights"
        if group is None and not isinstance(w.gran, (PerChannel, PerTensor)):
            return f"weights must be quantized per channel, per tensor or per group, not {w.granularity}"
        if not isinstance(a.gran, (PerToken, PerTensor)):
            return f"activations must be quantized per token or per tensor, not {a.granularity}"
        if iq.split_at is not None:
            return "a split-shortcut input has two activation scales"
        if not self.available():
            return f"the {self.name} kernels are not available here"
        if layer.weight_device.type != self.device:
            return f"the layer's weights are on {layer.weight_device.type}, the kernel runs on {self.device}"
        if group is not None and _is_linear(layer):
            return self.supports_linear(layer.in_features, layer.out_features, w.format, group)
        if _is_linear(layer):
            return self.supports_linear(layer.in_features, layer.out_features, w.format)
        if self.supports_conv is None:
            return f"the {self.name} backend has no convolution kernel"
        return self.supports_conv(layer.in_channels, layer.out_channels, layer.kernel_size, layer.groups,
                                  layer.padding_mode, isinstance(a.gran, PerToken))

    def prepare(self, layer: Any, x: torch.Tensor | None = None) -> Any:
        """Pack the layer's weight codes and scales (exactly what fake quantization uses)."""
        wq = layer.weight_quantizer
        if _requantized(layer):
            codes, scale = requantize_int8(layer.decoded_weight(torch.float64))
        else:
            codes = (layer.int_weight_codes() if wq.spec.format.startswith("int") else layer.weight_codes())
            codes, scale = codes.reshape(layer.weight_shape), wq.scale.detach().float().reshape(-1)
        if isinstance(wq.spec.gran, PerGroup) and _is_linear(layer):
            return self.prepack_linear(codes, scale, layer.bias, group=wq.spec.gran.size)
        if _is_linear(layer):
            return self.prepack_linear(codes, scale, layer.bias)
        assert self.prepack_conv is not None
        per_token = isinstance(layer.input_quantizer.spec.gran, PerToken)
        return self.prepack_conv(codes, scale, layer.bias, layer.stride, layer.padding, layer.dilation,
                                 layer.groups, layer.padding_mode, per_token)

    def _unpack(self, layer: Any) -> Callable[[Any], torch.Tensor] | None:
        return self.unpack_linear if _is_linear(layer) else self.unpack_conv

    def gives_codes(self, layer: Any, packed: Any) -> bool:
        """Whether `codes` can read the layer's integer codes back from `packed`, bit for bit (not
        where the kernel holds a re-quantized weight)."""
        spec = layer.weight_quantizer.spec
        return self._unpack(layer) is not None and spec.format.startswith("int") and not _requantized(layer)

    def codes(self, layer: Any, packed: Any) -> torch.Tensor:
        """The layer's integer weight codes (out, in * kernel) as int8, read back from `packed`."""
        if not self.gives_codes(layer, packed):
            raise ValueError(f"the {self.name} kernel cannot give {layer.qname}'s weight codes back")
        return self._unpack(layer)(packed).reshape(layer.weight_shape[0], -1)

    def _int_options(self, layer: Any) -> dict[str, Any]:
        a = layer.input_quantizer.spec
        if self.device != "cpu":
            return {}
        return {"act_bits": a.bits, "reduce_range": cpu.needs_reduce_range(_kernel_bits(layer), a.bits)}

    def run(self, layer: Any, packed: Any, x: torch.Tensor) -> torch.Tensor:
        iq = layer.input_quantizer
        scale = None if iq.spec.dynamic else iq.qparams.scale
        gran = "token" if isinstance(iq.spec.gran, PerToken) else "tensor"
        if _is_linear(layer):
            return self.linear(x, packed, scale, gran, **self._int_options(layer))
        assert self.conv is not None
        return self.conv(x, packed, scale, gran, **self._int_options(layer))

    def describe(self, layer: Any, packed: Any = None) -> str:
        w, a = layer.weight_quantizer.spec, layer.input_quantizer.spec
        text = f"W{w.bits}A{a.bits} {self.label}"
        if _requantized(layer):
            text += " on its weight re-quantized to int8 per channel (group-wise scales do not factor out of a window)"
        elif isinstance(w.gran, PerGroup):
            impl = packed.impl if packed is not None else cpu.group_impl(w.gran.size)
            text = (f"W{w.bits}A{a.bits} group-wise int8 GEMM (dmquant's AVX512-VNNI kernel, groups of {w.gran.size})"
                    if impl == "vnni" else f"{text} one GEMM per {w.gran.size} inputs (group-wise scales)")
        if not _is_linear(layer) and isinstance(a.gran, PerToken):
            text += " per kernel tap (per-pixel scales)"
        if self.device == "cpu" and cpu.needs_reduce_range(_kernel_bits(layer), a.bits):
            text += " (7-bit activations: no VNNI)"
        return text


@dataclass(frozen=True)
class WeightOnlyKernel:
    """Weight-only low-bit matmuls: codes stay packed, activations stay 16-bit."""

    name: str = "cpu-weight-only"
    device: str = "cpu"

    def available(self) -> bool:
        return True  # the decode-GEMM needs nothing beyond torch; its packed ops are optional

    def unsupported_reason(self, layer: Any, dtype: torch.dtype | None = None) -> str | None:
        if layer.weight_device.type != self.device:
            return f"the layer's weights are on {layer.weight_device.type}, the kernel runs on {self.device}"
        return weight_only.unsupported_reason(layer, dtype or layer.weight_dtype)

    def prepare(self, layer: Any, x: torch.Tensor | None = None) -> Any:
        dtype = x.dtype if x is not None else layer.weight_dtype
        tokens = None if x is None else x.numel() // max(x.shape[layer.INPUT_AXIS], 1)
        return weight_only.prepare(layer, dtype, tokens)

    def gives_codes(self, layer: Any, packed: Any) -> bool:
        return weight_only.gives_codes(packed)

    def codes(self, layer: Any, packed: Any) -> torch.Tensor:
        return weight_only.packed_codes(layer, packed)

    def run(self, layer: Any, packed: Any, x: torch.Tensor) -> torch.Tensor:
        x16 = x if isinstance(packed, f16_gemm.PackedF16Gemm) else x.to(packed.scales.dtype)
        y = weight_only.linear(x16, packed) if _is_linear(layer) else weight_only.conv(layer, x16, packed)
        return y.to(x.dtype)

    def describe(self, layer: Any, packed: Any = None) -> str:
        bits = layer.weight_quantizer.spec.bits
        if isinstance(packed, f16_gemm.PackedF16Gemm) or (packed is None and weight_only.f16_fits(layer)):
            aten = f"; aten int{bits}pack below {weight_only.DECODE_MIN_TOKENS} bf16/fp16 tokens" \
                if packed is None and weight_only._aten_fits(layer) else ""
            rows = "token" if _is_linear(layer) else "pixel's window"
            return (f"W{bits}A16 weight-only (dmquant's AVX512-FP16 kernel: activations in fp16 per {rows}, "
                    f"int{bits} codes decoded per panel{aten})")
        width = "fp32" if packed is not None and packed.scales.dtype == torch.float32 else "16-bit"
        decode = f"{width} {'GEMM' if _is_linear(layer) else 'convolution'} on codes decoded per call"
        if packed is None:  # not called yet: the first call's token count decides
            aten = f", aten int{bits}pack below {weight_only.DECODE_MIN_TOKENS} tokens" \
                if weight_only._aten_fits(layer) else ""
            return f"W{bits}A16 weight-only ({decode}{aten})"
        act = "A32" if width == "fp32" else "A16"
        return f"W{bits}{act} weight-only ({decode if packed.decode else f'aten int{bits}pack'})"


_CPU_LABEL = "int8 GEMM (oneDNN)" if cpu.onednn_available() else "int8 GEMM (fbgemm)"
KERNELS: dict[str, Any] = {
    "fbgemm": Kernel("fbgemm", "cpu", cpu.INT_FORMATS, lambda: cpu.onednn_available() or cpu.fbgemm_available(),
                     cpu.supports_linear, cpu.prepack_linear, cpu.int8_linear,
                     cpu.supports_conv, cpu.prepack_conv, cpu.int8_conv, label=_CPU_LABEL,
                     unpack_linear=cpu.unpack_linear, unpack_conv=cpu.unpack_conv, group_wise=True),
    "cpu-weight-only": WeightOnlyKernel(),
    cuda.NAME: Kernel(cuda.NAME, "cuda", ("int8", "fp8_e4m3"), cuda.cuda_available,
                      cuda.supports_linear, cuda.prepack_linear, cuda.linear, label="GPU int8/fp8 GEMM"),
}
# Backend name (a recipe's or quantize()'s `backend`) -> kernels to try, best first.
BACKENDS: dict[str, tuple[str, ...]] = {
    "fake": (),
    "fbgemm": ("fbgemm",),
    "cpu": ("fbgemm", "cpu-weight-only"),
    "cuda": (cuda.NAME,),
    "auto": ("fbgemm", "cpu-weight-only", cuda.NAME),
}


def select_kernel(layer: Any, dtype: torch.dtype) -> tuple[Any | None, str]:
    """(kernel, "") for the first kernel of the layer's backend that accepts it, else (None, why not)."""
    names = BACKENDS.get(layer.backend)
    if names is None:
        raise ValueError(f"unknown kernel backend {layer.backend!r}; use one of {list(BACKENDS)}")
    if layer.backend == "auto":  # only the kernels of the device the weights are on
        names = tuple(n for n in names if KERNELS[n].device == layer.weight_device.type)
    reasons = []
    for name in names:
        reason = KERNELS[name].unsupported_reason(layer, dtype)
        if reason is None:
            return KERNELS[name], ""
        reasons.append(reason)
    return None, "; ".join(dict.fromkeys(reasons)) or "no kernel for this device"


def get_kernel(name: str) -> Any:
    """A kernel by name ("fake" has none: it is the module's own forward)."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel backend {name!r}; use one of {['fake', *KERNELS]}")
    return KERNELS[name]


def available_backends() -> list[str]:
    """Backends that can run here; "fake" (simulated quantization) always can."""
    return ["fake", *(b for b, names in BACKENDS.items() if any(KERNELS[n].available() for n in names))]


__all__ = ["Kernel", "WeightOnlyKernel", "KERNELS", "BACKENDS", "select_kernel", "get_kernel",
           "available_backends", "cpu", "cuda", "weight_only"]
