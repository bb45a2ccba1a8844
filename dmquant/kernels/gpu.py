"""GPU W8A8 (int8 `torch._int_mm`) and FP8 (`torch._scaled_mm`) linear kernels.

Both take the layer's own weight codes and scales; activations are quantized here per token (dynamic)
or with the layer's static per-tensor scale, exactly as the fake-quant reference does, and the integer
or fp8 product is rescaled in fp32. Shape rules of the CUDA ops (int_mm: M > 16, K and N multiples of
8; scaled_mm: K and N multiples of 16) are met by zero padding, which does not change the product.
The padding and scale math are plain torch, so CPU tests check them with an emulated matmul.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..formats import FloatFormat, IntFormat
from ..granularity import PerChannel, PerTensor, PerToken
from ..primitives import choose_qparams

NAME = "cuda"
E4M3_MAX = 448.0


@dataclass
class Prepared:
    weight_t: torch.Tensor  # (K_pad, N_pad) low-bit, column-major for the CUDA ops
    weight_scale: torch.Tensor  # (1, N) fp32
    bias: torch.Tensor | None
    kind: str  # "int8" | "fp8"
    n: int


def available() -> bool:
    return torch.cuda.is_available()


def _kind(layer: Any) -> str | None:
    wq, iq = layer.weight_quantizer, layer.input_quantizer
    if wq is None or iq is None or not wq.spec.symmetric or not iq.spec.symmetric:
        return None
    if not isinstance(wq.spec.gran, (PerChannel, PerTensor)) or not isinstance(iq.spec.gran, (PerToken, PerTensor)):
        return None
    w, a = wq.spec.fmt, iq.spec.fmt
    if isinstance(w, IntFormat) and isinstance(a, IntFormat) and w.bits == a.bits == 8:
        return "int8"
    if isinstance(w, FloatFormat) and isinstance(a, FloatFormat) and w.name == a.name == "fp8_e4m3":
        return "fp8"
    return None


def unsupported_reason(layer: Any) -> str | None:
    from ..nn.qlinear import QuantLinear

    if not isinstance(layer, QuantLinear):
        return "only Linear layers have GPU kernels"
    if _kind(layer) is None:
        return "needs symmetric int8 or fp8_e4m3 weights (per channel/tensor) and activations (per token/tensor)"
    if not available() or layer.weight.device.type != "cuda":
        return "no CUDA device (or the layer is not on it)"
    return None


def pad_to(t: torch.Tensor, dim: int, multiple: int, minimum: int = 0) -> torch.Tensor:
    size = t.shape[dim]
    target = max(-(-size // multiple) * multiple, minimum)
    if target == size:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [0, target - size]
    return torch.nn.functional.pad(t, pad)


def prepare(layer: Any) -> Prepared:
    wq = layer.weight_quantizer
    kind = _kind(layer)
    codes = wq.codes(layer.weight.detach())  # (N, K) grid values
    mult = 8 if kind == "int8" else 16
    dtype = torch.int8 if kind == "int8" else torch.float8_e4m3fn
    w = pad_to(pad_to(codes, 1, mult), 0, mult).to(dtype)
    return Prepared(w.t(), wq.scale.reshape(1, -1).float().expand(1, codes.shape[0]), layer.bias,
                    kind, codes.shape[0])


def quantize_input(x2: torch.Tensor, layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid values and (M, 1) scales of the activations, as the fake-quant input quantizer does."""
    iq = layer.input_quantizer
    qp = choose_qparams(x2, iq.spec.fmt, iq.spec.gran) if iq.spec.dynamic else iq.qparams
    scale = qp.scale.float().expand(x2.shape[0], 1) if qp.scale.numel() == 1 else qp.scale.float()
    return iq.spec.fmt.round(x2.float() / scale), scale


def linear(prep: Prepared, xq: torch.Tensor, x_scale: torch.Tensor,
           matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """y = (xq @ Wq^T) * x_scale * w_scale + bias, via the CUDA op or an injected `matmul`."""
    m = xq.shape[0]
    if prep.kind == "int8":
        a = pad_to(pad_to(xq, 1, 8), 0, 1, minimum=17).to(torch.int8)
        acc = (matmul or torch._int_mm)(a, prep.weight_t)[:m, : prep.n].float()
        y = acc * x_scale * prep.weight_scale
    else:
        a = pad_to(xq, 1, 16).to(torch.float8_e4m3fn)
        if matmul is not None:
            y = matmul(a, prep.weight_t)[:, : prep.n].float() * x_scale * prep.weight_scale
        else:
            y = torch._scaled_mm(a, prep.weight_t, scale_a=x_scale.contiguous(),
                                 scale_b=pad_to(prep.weight_scale, 1, 16, 0).contiguous(),
                                 out_dtype=torch.bfloat16)[:, : prep.n].float()
    return y if prep.bias is None else y + prep.bias.float()


def run(layer: Any, prep: Prepared, x: torch.Tensor) -> torch.Tensor:
    shape, dtype = x.shape, x.dtype
    xq, scale = quantize_input(x.reshape(-1, shape[-1]), layer)
    return linear(prep, xq, scale).reshape(*shape[:-1], prep.n).to(dtype)
