"""Attention quantization for diffusers `Attention`: Q, K, V and the softmax probabilities.

The model's own processor keeps doing everything model-specific (RoPE, norms, joint attention, masks);
`QuantAttnProcessor` wraps it and, for the duration of the call, routes
`torch.nn.functional.scaled_dot_product_attention` (which every diffusers 2.0 processor and the native
attention dispatcher call) through a version that quantizes its inputs and, when asked, computes the
softmax explicitly so its output can be quantized too (a torch-function mode: no global patching).

SageAttention(2)-style options (`AttentionSpec`): Q and K quantized per block of tokens, K smoothed by
its per-channel mean (every query's scores shift by one constant, so softmax is unchanged, while the
channel outliers K shares across tokens leave the quantized range), Q smoothed by its mean with the
exact score correction mean(Q) K^T added in float (it enters SDPA as an additive mask), V smoothed the
same way (rows of P sum to one, so the mean is added back exactly after P V), V per channel and P in
their own formats.

PAROAttention-style reordering (`reorder`): which tokens share a Q/K block is a choice. On a square
grid of image tokens each head picks, once, from calibration (`dmquant.algorithms.paro`), the order
whose blocks quantize Q and K with the least relative error: row-major (blocks are row segments),
column-major (column segments) or square tiles (blocks of block_size = t*t tokens as t x t patches).
Tokens are gathered into that order, block-quantized and scattered back, so the attention itself
(masks, softmax, outputs) is untouched; a real kernel would store the permuted layout instead.

With a kernel backend (`auto`, `cpu`, `cuda`: the recipe's or `quantize(..., backend=)`), int8 Q and
K per token or block multiply on the int8 GEMM (`dmquant.kernels.attention`, `torch._int_mm`), P V
and the rest as simulated; `kernel_name()` says which path runs and why.
"""
from __future__ import annotations

import math
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..config import AttentionSpec, QuantSpec
from ..granularity import PerChannel, PerToken
from ..kernels import attention as int8_attention
from ..orthogonal import hadamard, hadamard_block, rotate
from .quantizer import TensorQuantizer

_SDPA = F.scaled_dot_product_attention
ORDERS = ("row-major", "column-major", "tiles")


def token_orders(tokens: int, block: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """(len(ORDERS), tokens) permutations of a square s x s token grid (None if `tokens` is no square);
    "tiles" needs block = t*t with t dividing s, else it repeats row-major."""
    s = math.isqrt(tokens)
    if s * s != tokens or s < 2:
        return None
    grid = torch.arange(tokens, device=device).reshape(s, s)
    t = math.isqrt(block)
    tiles = grid.reshape(s // t, t, s // t, t).permute(0, 2, 1, 3) if t * t == block and s % t == 0 else grid
    return torch.stack([grid.flatten(), grid.t().flatten(), tiles.flatten()])


class AttentionQuantizers(nn.Module):
    """The quantizers of one attention layer (a submodule, so buffers move and save with the model)."""

    def __init__(self, spec: AttentionSpec, name: str = "", heads: int = 0, backend: str = "fake") -> None:
        super().__init__()
        self.spec = spec
        self.name = name
        self.backend = backend  # a kernel backend runs int8 Q K^T on the int8 GEMM (module docstring)
        self.searching = False  # set by the paro step: accumulate each order's error, quantize row-major
        if spec.reorder:  # per head: index into token_orders(), -1 = not calibrated (row-major)
            self.register_buffer("order", torch.full((heads,), -1, dtype=torch.long))
            self.register_buffer("order_cost", torch.zeros(heads, len(ORDERS), dtype=torch.float64), persistent=False)

        def make(s: QuantSpec | None, role: str) -> TensorQuantizer | None:
            # (..., tokens, channels): "channel" = one scale per channel across tokens (rows over axis -2).
            axis = -2 if s is not None and isinstance(s.gran, PerChannel) else -1
            return None if s is None else TensorQuantizer(s, axis, f"{name}.{role}")

        self.q, self.k = make(spec.qkv, "q"), make(spec.qkv, "k")
        self.v = make(spec.v if spec.v is not None else spec.qkv, "v")
        self.probs = make(spec.probs, "probs")

    def _block_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
        """(..., L, D) as rows of `block_size` tokens, (..., blocks, block_size * D), zero-padded to
        whole blocks (zero padding changes no block's maximum); and the padded shape to undo it."""
        b = self.spec.block_size or 1
        pad = -x.shape[-2] % b
        xp = F.pad(x, (0, 0, 0, pad)) if pad else x
        return xp.reshape(*x.shape[:-2], xp.shape[-2] // b, b * x.shape[-1]), xp.shape

    def _blocked(self, quantizer: TensorQuantizer, x: torch.Tensor) -> torch.Tensor:
        """Quantize (..., L, D) with one scale per block of `block_size` tokens: each block becomes one
        row of the per-token quantizer."""
        if not self.spec.block_size:
            return quantizer(x)
        rows, padded = self._block_rows(x)
        return quantizer(rows).reshape(padded)[..., :x.shape[-2], :]

    def _codes(self, quantizer: TensorQuantizer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`_blocked` as int8 codes (..., L, D) and one scale per token (..., L): its block's."""
        rows, padded = self._block_rows(x)
        codes, qp = quantizer.dynamic_codes(rows)
        blocks = rows.shape[:-1]
        scale = qp.scale.reshape(*blocks, 1).expand(*blocks, self.spec.block_size or 1).reshape(padded[:-1])
        n = x.shape[-2]
        return codes.reshape(padded)[..., :n, :].to(torch.int8), scale[..., :n]

    def int8_reason(self, query: torch.Tensor | None = None, key: torch.Tensor | None = None) -> str | None:
        """Why Q K^T runs simulated (None: on the int8 GEMM); without tensors, what the spec allows."""
        s = self.spec.qkv
        if s is None or not (s.format == "int8" and s.symmetric and s.dynamic and isinstance(s.gran, PerToken)):
            return "the int8 GEMM needs symmetric dynamic int8 Q/K per token or block"
        if self.spec.reorder:
            return "reordered tokens are quantized in another layout"
        if self.searching or not (self.q.enabled and self.k.enabled):
            return "quantization is off or being searched"
        if query is None or key is None:  # a report: the backend's device (auto: the CPU)
            if self.backend == "fake":
                return "the fake backend computes attention simulated"
            return int8_attention.backend_reason(self.backend, "cuda" if self.backend == "cuda" else "cpu")
        return int8_attention.unsupported_reason(self.backend, query, key)

    def kernel_name(self) -> str:
        """Which path Q K^T takes, in words (for reports)."""
        reason = self.int8_reason()
        return "int8 Q K^T (torch._int_mm)" if reason is None else f"simulated ({reason})"

    def _reordered(self, quantizer: TensorQuantizer, x: torch.Tensor) -> torch.Tensor:
        """Block-quantize (..., heads, L, D) with each head's tokens in its chosen order (module docstring)."""
        orders = token_orders(x.shape[-2], self.spec.block_size, x.device)
        if orders is None or x.dim() < 3 or x.shape[-3] != self.order.numel():
            return self._blocked(quantizer, x)
        if self.searching:
            for i, perm in enumerate(orders):
                xp = x.index_select(-2, perm)
                err = (self._blocked(quantizer, xp) - xp).double().pow(2)
                dims = [d for d in range(x.dim()) if d != x.dim() - 3]
                self.order_cost[:, i] += err.sum(dims) / x.double().pow(2).sum(dims).clamp_min(1e-30)
            return self._blocked(quantizer, x)
        index = orders[self.order.clamp_min(0)]  # (heads, L)
        index = index[:, :, None].expand(*x.shape[-3:])
        y = self._blocked(quantizer, x.gather(-2, index.expand_as(x)))
        return torch.empty_like(y).scatter_(-2, index.expand_as(y), y)

    def sdpa(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
             dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
             enable_gqa: bool = False) -> torch.Tensor:
        """Drop-in for F.scaled_dot_product_attention on (..., L, D) tensors."""
        if self.spec.smooth_k:
            key = key - key.mean(dim=-2, keepdim=True)
        if self.spec.smooth_q:
            query, attn_mask, is_causal = self._smooth_query(query, key, attn_mask, is_causal, scale, enable_gqa)
        v_mean = None
        if self.spec.smooth_v:
            v_mean = value.mean(dim=-2, keepdim=True)
            value = value - v_mean
        h = hadamard(hadamard_block(query.shape[-1]), query.dtype).to(query.device) if self.spec.rotate else None
        if h is not None:  # orthogonal: scores and P V unchanged, channel outliers spread before rounding
            query, key, value = rotate(query, h), rotate(key, h), rotate(value, h)
        codes = None
        if self.q is not None and self.int8_reason(query, key) is None:
            codes = (*self._codes(self.q, query), *self._codes(self.k, key))
        elif self.q is not None:
            quantize = self._reordered if self.spec.reorder else self._blocked
            query, key = quantize(self.q, query), quantize(self.k, key)
        if self.v is not None:
            value = self.v(value)
        out = self._core(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, codes)
        if h is not None:
            out = rotate(out, h)  # the normalised Sylvester Hadamard is its own inverse
        if v_mean is None:
            return out
        if v_mean.dim() >= 3 and v_mean.shape[-3] != out.shape[-3]:  # grouped-query attention
            v_mean = v_mean.repeat_interleave(out.shape[-3] // v_mean.shape[-3], -3)
        return out + v_mean

    @staticmethod
    def _smooth_query(query: torch.Tensor, key: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool,
                      scale: float | None, enable_gqa: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Q minus its per-channel mean over tokens, and an additive mask holding the float scores that
        mean contributes (mean(Q) K^T, scaled) plus the original mask: Q K^T is unchanged before rounding."""
        q_mean = query.mean(dim=-2, keepdim=True)
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            key = key.repeat_interleave(query.shape[-3] // key.shape[-3], -3)
        bias = (q_mean @ key.transpose(-2, -1)) * (scale if scale is not None else 1 / math.sqrt(query.shape[-1]))
        L, S = query.shape[-2], key.shape[-2]
        if is_causal:
            causal = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
            attn_mask = causal if attn_mask is None else attn_mask & causal if attn_mask.dtype == torch.bool \
                else attn_mask.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros(attn_mask.shape, dtype=bias.dtype, device=bias.device).masked_fill(
                    ~attn_mask, float("-inf"))
            bias = bias + attn_mask
        return query - q_mean, bias.expand(*bias.shape[:-2], L, S), False

    def _core(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
              dropout_p: float, is_causal: bool, scale: float | None, enable_gqa: bool,
              codes: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """Attention of the quantized Q, K, V; `codes` (Q codes, scales, K codes, scales) puts Q K^T on
        the int8 GEMM (same heads: `int8_reason` refuses grouped-query attention)."""
        if self.probs is None and codes is None:
            return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa)
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            rep = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
        product = int8_attention.int8_scores(*codes).to(query.dtype) if codes is not None \
            else query @ key.transpose(-2, -1)
        scores = product * (scale if scale is not None else 1 / math.sqrt(query.shape[-1]))
        if is_causal:
            L, S = scores.shape[-2:]
            causal = torch.ones(L, S, dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:
            boolean = attn_mask.dtype == torch.bool
            scores = scores.masked_fill(~attn_mask, float("-inf")) if boolean else scores + attn_mask
        probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)
        if self.probs is not None:
            probs = self.probs(probs)
        if dropout_p and self.training:
            probs = F.dropout(probs, dropout_p)
        return probs @ value


class _QuantizedSDPA(TorchFunctionMode):
    """Inside, calls of F.scaled_dot_product_attention run `sdpa` instead. A torch-function mode lives on
    this thread's dispatch stack for the `with` block only: nothing global is patched, other threads and
    other code see torch's own function, and torch.compile traces it."""

    def __init__(self, sdpa: Any) -> None:
        super().__init__()
        self.sdpa = sdpa

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is _SDPA:  # the mode is off inside this method: `sdpa` reaches the real kernels
            return self.sdpa(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class QuantAttnProcessor:
    """Wraps a diffusers attention processor so its attention core runs quantized."""

    def __init__(self, inner: Any, quantizers: AttentionQuantizers) -> None:
        self.inner = inner
        self.quantizers = quantizers
        # diffusers drops kwargs not in `inspect.signature(processor.__call__)`: show the inner one's.
        self.__call__ = inner.__call__

    def __call__(self, attn: nn.Module, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        with _QuantizedSDPA(self.quantizers.sdpa):
            return self.inner(attn, *args, **kwargs)


class keep_quantization:  # noqa: N801 - used like a function: keep_quantization(processor)
    """Marks a processor for a quantized attention layer: its attention core runs quantized with the
    layer's own quantizers (what reaches F.scaled_dot_product_attention is quantized), e.g.
    `model.set_attn_processor(keep_quantization(AttnProcessor2_0()))`."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor.inner if isinstance(processor, QuantAttnProcessor) else processor


def _guarded_set_processor(module: nn.Module, processor: Any, *args: Any, **kwargs: Any) -> None:
    """`set_processor` of a quantized attention layer: a plain processor would silently drop the
    attention quantization, so it is refused; `keep_quantization(processor)` keeps it."""
    if isinstance(processor, keep_quantization):
        processor = QuantAttnProcessor(processor.processor, module.dmquant_attention)
    elif not isinstance(processor, QuantAttnProcessor):
        raise ValueError(
            f"attention {module.dmquant_attention.name or type(module).__name__!r} is quantized by dmquant: "
            f"{type(processor).__name__} would replace its quantized processor and silently drop the Q/K/V "
            "quantization. Keep it with set_attn_processor(dmquant.nn.qattention.keep_quantization(processor)), "
            "or quantize with a recipe without `attention:` to use float attention")
    type(module).set_processor(module, processor, *args, **kwargs)


def is_attention(module: nn.Module) -> bool:
    return hasattr(module, "set_processor") and hasattr(module, "processor")


def quantize_attention(module: nn.Module, spec: AttentionSpec, name: str = "",
                       backend: str = "fake") -> AttentionQuantizers:
    """Attach quantizers to a diffusers attention module and wrap its processor (idempotent)."""
    proc = module.processor
    if isinstance(proc, QuantAttnProcessor):
        proc = proc.inner
    quantizers = AttentionQuantizers(spec, name, heads=getattr(module, "heads", 0), backend=backend)
    module.dmquant_attention = quantizers
    module.set_processor = types.MethodType(_guarded_set_processor, module)  # refuses unquantized processors
    module.set_processor(QuantAttnProcessor(proc, quantizers))
    return quantizers
