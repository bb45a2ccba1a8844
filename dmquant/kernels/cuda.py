"""GPU W8A8 linear: int8 via `torch._int_mm` and FP8 e4m3 via `torch._scaled_mm`.

Activations are quantized here exactly as dmquant's fake quantization does (symmetric; dynamic per
token or per tensor, or a static per-tensor scale; `common` holds the math). The int8 product is
accumulated exactly in int32 and rescaled in fp32 (x_scale per row, w_scale per column); the fp8
product is rescaled inside `_scaled_mm` (rowwise scales) and returned in bf16, the only output dtype
rowwise scaling supports, so fp8 outputs carry bf16 rounding (relative ~4e-3).

Shape rules of the CUDA ops are met by zero padding, which leaves the valid block of a product
unchanged: `_int_mm` needs M > 16 and K, N multiples of 8; `_scaled_mm` needs K, N multiples of 16.
Every function takes an optional `matmul` so CPU tests can run the padding and scale math with an
exact float64 product instead of the CUDA op. Packed weights are plain tensors (no pickling issue),
but modules still rebuild them lazily like the CPU ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from .common import E4M3_MAX, ActGranularity, channel_scale, dynamic_scale, fp8_codes, int_codes, pad_to

NAME = "cuda"
Matmul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Kind = Literal["int8", "fp8"]
_MULTIPLE = {"int8": 8, "fp8": 16}
_INT_MM_MIN_M = 17


def cuda_available() -> bool:
    return torch.cuda.is_available()


def fp8_supported() -> bool:
    """`_scaled_mm` with e4m3 needs compute capability 8.9 (Ada) or newer."""
    return cuda_available() and torch.cuda.get_device_capability() >= (8, 9)


def supports_linear(in_features: int, out_features: int, fmt: str = "int8") -> str | None:
    """Why a linear of this size and format ("int8" or "fp8_e4m3") cannot run here (None when it can)."""
    if fmt not in ("int8", "fp8_e4m3"):
        return f"the GPU kernels multiply int8 or fp8_e4m3, not {fmt}"
    if not cuda_available():
        return "no CUDA device"
    if fmt == "fp8_e4m3" and not fp8_supported():
        return "fp8 matmuls need a GPU of compute capability 8.9 or newer"
    if in_features < 1 or out_features < 1:
        return f"empty linear ({in_features} -> {out_features})"
    return None


@dataclass(frozen=True)
class PackedLinearCuda:
    """Padded low-bit weight, transposed to the column-major (K_pad, N_pad) layout the ops want."""

    weight_t: torch.Tensor  # int8 or float8_e4m3fn
    scale: torch.Tensor  # (1, N) float32 weight scales
    bias: torch.Tensor | None
    in_features: int
    out_features: int
    kind: Kind


def _pack(codes: torch.Tensor, scale: torch.Tensor | float, bias: torch.Tensor | None, kind: Kind) -> PackedLinearCuda:
    if codes.dim() != 2:
        raise ValueError(f"weight codes must be 2-D (out, in), got {tuple(codes.shape)}")
    n, k = codes.shape
    m = _MULTIPLE[kind]
    w = pad_to(pad_to(codes.detach(), 1, m, minimum=16), 0, m)  # (N_pad, K_pad) row-major
    s = channel_scale(scale, n).to(codes.device).reshape(1, n)
    b = None if bias is None else bias.detach().float().reshape(n)
    return PackedLinearCuda(w.t(), s, b, k, n, kind)


def prepack_linear_int8(codes: torch.Tensor, scale: torch.Tensor | float,
                        bias: torch.Tensor | None = None) -> PackedLinearCuda:
    """Int8 weight codes (out, in) with per-channel (or one) scale."""
    if codes.dtype != torch.int8:
        raise ValueError(f"int8 weight codes must be torch.int8, got {codes.dtype}")
    return _pack(codes, scale, bias, "int8")


def prepack_linear_fp8(codes: torch.Tensor, scale: torch.Tensor | float,
                       bias: torch.Tensor | None = None) -> PackedLinearCuda:
    """E4M3 weight codes (out, in): float8_e4m3fn, or float grid values (rounded to e4m3 here)."""
    if codes.dtype != torch.float8_e4m3fn:
        if not codes.is_floating_point():
            raise ValueError(f"fp8 weight codes must be float8_e4m3fn or float grid values, got {codes.dtype}")
        codes = codes.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return _pack(codes, scale, bias, "fp8")


def prepack_linear(codes: torch.Tensor, scale: torch.Tensor | float,
                   bias: torch.Tensor | None = None) -> PackedLinearCuda:
    """Dispatch on the codes' dtype: torch.int8 -> int8 GEMM, anything else -> fp8 e4m3."""
    pack = prepack_linear_int8 if codes.dtype == torch.int8 else prepack_linear_fp8
    return pack(codes, scale, bias)


def quantize_activation(x2: torch.Tensor, kind: Kind, input_scale: torch.Tensor | float | None = None,
                        granularity: ActGranularity = "token") -> tuple[torch.Tensor, torch.Tensor]:
    """(low-bit codes (M, K), fp32 (M, 1) scales) of a 2-D activation, as the fake quantizer rounds."""
    qmax = 127.0 if kind == "int8" else E4M3_MAX
    if input_scale is None:
        scale = dynamic_scale(x2, granularity, qmax)
    else:
        scale = torch.as_tensor(input_scale, dtype=torch.float32, device=x2.device).reshape(1, 1)
        if not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError(f"static input scale must be finite and positive, got {scale.item()}")
    codes = int_codes(x2, scale, -128, 127).to(torch.int8) if kind == "int8" else fp8_codes(x2, scale)
    return codes, scale.expand(x2.shape[0], 1)


def _product(packed: PackedLinearCuda, xq: torch.Tensor, x_scale: torch.Tensor, matmul: Matmul | None) -> torch.Tensor:
    """fp32 or bf16 (xq @ Wq^T) * x_scale * w_scale for quantized 2-D activations."""
    m, n = xq.shape[0], packed.out_features
    k_pad = packed.weight_t.shape[0]
    if packed.kind == "int8":
        a = pad_to(pad_to(xq, 1, k_pad), 0, 1, minimum=_INT_MM_MIN_M)
        acc = (matmul or torch._int_mm)(a, packed.weight_t)[:m, :n]
        return acc.float() * x_scale * packed.scale
    a = pad_to(xq, 1, k_pad)
    if matmul is not None:
        return matmul(a, packed.weight_t)[:, :n].float() * x_scale * packed.scale
    w_scale = pad_to(packed.scale, 1, _MULTIPLE["fp8"], minimum=packed.weight_t.shape[1])
    return torch._scaled_mm(a, packed.weight_t, scale_a=x_scale.contiguous(), scale_b=w_scale.contiguous(),
                            out_dtype=torch.bfloat16)[:, :n]


def _linear(x: torch.Tensor, packed: PackedLinearCuda, input_scale: torch.Tensor | float | None,
            granularity: ActGranularity, matmul: Matmul | None) -> torch.Tensor:
    if x.shape[-1] != packed.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the packed linear expects {packed.in_features}")
    x2 = x.detach().reshape(-1, packed.in_features)
    xq, x_scale = quantize_activation(x2, packed.kind, input_scale, granularity)
    y = _product(packed, xq, x_scale, matmul).float()
    if packed.bias is not None:
        y = y + packed.bias
    return y.reshape(*x.shape[:-1], packed.out_features).to(x.dtype)


def int8_linear_cuda(x: torch.Tensor, packed: PackedLinearCuda, input_scale: torch.Tensor | float | None = None,
                     granularity: ActGranularity = "token", matmul: Matmul | None = None) -> torch.Tensor:
    """W8A8 linear of `x` (..., in) through `torch._int_mm` (or an injected exact `matmul`)."""
    if packed.kind != "int8":
        raise ValueError("int8_linear_cuda needs weights packed by prepack_linear_int8")
    return _linear(x, packed, input_scale, granularity, matmul)


def fp8_linear_cuda(x: torch.Tensor, packed: PackedLinearCuda, input_scale: torch.Tensor | float | None = None,
                    granularity: ActGranularity = "token", matmul: Matmul | None = None) -> torch.Tensor:
    """FP8 e4m3 linear of `x` (..., in) through `torch._scaled_mm` with rowwise scales."""
    if packed.kind != "fp8":
        raise ValueError("fp8_linear_cuda needs weights packed by prepack_linear_fp8")
    return _linear(x, packed, input_scale, granularity, matmul)


def linear(x: torch.Tensor, packed: PackedLinearCuda, input_scale: torch.Tensor | float | None = None,
           granularity: ActGranularity = "token") -> torch.Tensor:
    """Run whichever GEMM the weights were packed for."""
    return _linear(x, packed, input_scale, granularity, None)
