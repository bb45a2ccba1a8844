"""Attention's Q K^T on the int8 GEMM (`torch._int_mm`, CPU and CUDA): SageAttention's first product.

Q and K quantized to int8 per token or per block of tokens carry one scale per row of the product, so
S = (Q_codes K_codes^T) * s_q s_k^T: the integer product is exact in int32 and only the rescale
rounds, where the simulated path sums dequantized float products. Masks, softmax, P and P V stay as
the simulated path computes them.
"""
from __future__ import annotations

import torch

from .cpu import vnni_available

BACKENDS = {"cpu": ("auto", "cpu", "fbgemm"), "cuda": ("auto", "cuda")}  # recipe backends that take it


def backend_reason(backend: str, device: str) -> str | None:
    """Why no Q K^T runs on the int8 GEMM with this recipe backend on this device type (None: shapes decide)."""
    if backend not in BACKENDS.get(device, ()):
        return f"backend {backend!r} on {device} computes attention simulated"
    if not hasattr(torch, "_int_mm"):
        return "this torch has no torch._int_mm"
    if device == "cpu" and not vnni_available():
        return "torch._int_mm here has no VNNI (CPU or ONEDNN_MAX_CPU_ISA): it saturates int16 sums of int8 pairs"
    return None


def unsupported_reason(backend: str, query: torch.Tensor, key: torch.Tensor) -> str | None:
    """Why Q K^T of these (..., L, D) / (..., S, D) tensors cannot run on the int8 GEMM (None: it can)."""
    device = query.device.type
    reason = backend_reason(backend, device)
    if reason is not None:
        return reason
    if query.shape[:-2] != key.shape[:-2]:
        return "Q and K have different head counts (grouped-query attention)"
    if query.requires_grad or key.requires_grad:
        return "gradients need the simulated path's straight-through estimator"
    if torch.compiler.is_compiling():
        return "compiled graphs trace the simulated path"
    length, dim, other = query.shape[-2], query.shape[-1], key.shape[-2]
    if device == "cuda" and not (length > 16 and dim % 8 == 0 and other % 8 == 0):
        return "torch._int_mm on CUDA needs more than 16 queries and head dim / keys in multiples of 8"
    return None


def int8_scores(q_codes: torch.Tensor, q_scale: torch.Tensor, k_codes: torch.Tensor,
                k_scale: torch.Tensor) -> torch.Tensor:
    """(..., L, D) and (..., S, D) int8 codes with (..., L) and (..., S) scales -> (..., L, S) float32
    scores Q K^T (before attention's 1/sqrt(D))."""
    lead, length, other = q_codes.shape[:-2], q_codes.shape[-2], k_codes.shape[-2]
    q = q_codes.reshape(-1, length, q_codes.shape[-1])
    k_t = k_codes.reshape(-1, other, k_codes.shape[-1]).transpose(1, 2).contiguous()  # 2x faster as (D, S)
    q_s, k_s = q_scale.reshape(-1, length, 1).float(), k_scale.reshape(-1, 1, other).float()
    scores = torch.empty(q.shape[0], length, other, dtype=torch.float32, device=q.device)
    for i in range(q.shape[0]):  # one head at a time: its int32 product is rescaled while in cache
        torch.mul(torch._int_mm(q[i], k_t[i]), q_s[i], out=scores[i])
        scores[i].mul_(k_s[i])
    return scores.reshape(*lead, length, other)
