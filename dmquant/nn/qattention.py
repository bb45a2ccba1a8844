"""Attention quantization for diffusers `Attention`: Q, K, V and the softmax probabilities.

The model's own processor keeps doing everything model-specific (RoPE, norms, joint attention, masks);
`QuantAttnProcessor` wraps it and, for the duration of the call, routes
`torch.nn.functional.scaled_dot_product_attention` (which every diffusers 2.0 processor and the native
attention dispatcher call) through a version that quantizes its inputs and, when asked, computes the
softmax explicitly so its output can be quantized too. Not thread-safe across concurrent forwards.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AttentionSpec
from .quantizer import TensorQuantizer

_SDPA = F.scaled_dot_product_attention


class AttentionQuantizers(nn.Module):
    """The quantizers of one attention layer (a submodule, so buffers move and save with the model)."""

    def __init__(self, spec: AttentionSpec, name: str = "") -> None:
        super().__init__()
        self.spec = spec
        make = lambda s, role: TensorQuantizer(s, -1, f"{name}.{role}") if s is not None else None  # noqa: E731
        self.q, self.k, self.v = (make(spec.qkv, r) for r in ("q", "k", "v"))
        self.probs = make(spec.probs, "probs")

    def sdpa(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
             dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
             enable_gqa: bool = False) -> torch.Tensor:
        """Drop-in for F.scaled_dot_product_attention on (..., L, D) tensors."""
        if self.q is not None:
            query, key, value = self.q(query), self.k(key), self.v(value)
        if self.probs is None:
            return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa)
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            rep = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
        scores = query @ key.transpose(-2, -1) * (scale if scale is not None else 1 / math.sqrt(query.shape[-1]))
        if is_causal:
            L, S = scores.shape[-2:]
            causal = torch.ones(L, S, dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
        probs = self.probs(torch.softmax(scores.float(), dim=-1).to(value.dtype))
        if dropout_p and self.training:
            probs = F.dropout(probs, dropout_p)
        return probs @ value


@contextlib.contextmanager
def _routed_sdpa(fn: Any) -> Iterator[None]:
    previous = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = fn
    try:
        yield
    finally:
        F.scaled_dot_product_attention = previous


class QuantAttnProcessor:
    """Wraps a diffusers attention processor so its attention core runs quantized."""

    def __init__(self, inner: Any, quantizers: AttentionQuantizers) -> None:
        self.inner = inner
        self.quantizers = quantizers
        # diffusers drops kwargs not in `inspect.signature(processor.__call__)`: show the inner one's.
        self.__call__ = inner.__call__

    def __call__(self, attn: nn.Module, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        with _routed_sdpa(self.quantizers.sdpa):
            return self.inner(attn, *args, **kwargs)


def is_attention(module: nn.Module) -> bool:
    return hasattr(module, "set_processor") and hasattr(module, "processor")


def quantize_attention(module: nn.Module, spec: AttentionSpec, name: str = "") -> AttentionQuantizers:
    """Attach quantizers to a diffusers attention module and wrap its processor (idempotent)."""
    proc = module.processor
    if isinstance(proc, QuantAttnProcessor):
        proc = proc.inner
    quantizers = AttentionQuantizers(spec, name)
    module.dmquant_attention = quantizers
    module.set_processor(QuantAttnProcessor(proc, quantizers))
    return quantizers
