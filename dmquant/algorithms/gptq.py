"""GPTQ (Frantar et al. 2022): quantize weight columns one at a time, pushing each column's rounding
error onto the not-yet-quantized columns through the inverse Hessian of the layer's inputs.

The pure function `gptq(weight, hessian, spec)` follows the paper's Cholesky formulation with lazy
block updates; scales are chosen once from the original weight (per channel or per group, "static
groups"), so the result stores exactly like a round-to-nearest weight of the same spec.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import QuantSpec
from ..granularity import PerGroup
from ..primitives import QParams, choose_qparams, element_format


@dataclass
class GPTQResult:
    weight: torch.Tensor  # (out, in) dequantized values on the quantization grid
    qparams: QParams
    loss: float  # sum over columns of (w - q)^2 / [H^-1]_jj / 2: the objective GPTQ minimises greedily
    perm: torch.Tensor | None  # column order used (act-order), None for the natural order


def _column_quantizer(spec: QuantSpec, qp: QParams, n_cols: int):
    """q(col j values) with the scale of column j's group, as exact dequantized values."""
    grid = element_format(spec.fmt, spec.symmetric)
    scale = qp.effective_scale()
    zero = qp.zero_point
    size = spec.gran.size if isinstance(spec.gran, PerGroup) else n_cols

    def quant(col: torch.Tensor, j: int) -> torch.Tensor:
        g = min(j // size, scale.shape[1] - 1)
        s = scale[:, g].to(col.dtype) if scale.shape[0] == col.shape[0] else scale[0, 0].to(col.dtype)
        z = 0 if zero is None else zero[:, g].to(col.dtype)
        return (grid.round(col / s + z) - z) * s

    return quant


def gptq(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, block_size: int = 128,
         damp: float = 0.01, act_order: bool = False) -> GPTQResult:
    """Quantize a 2-D weight (out, in) given H = 2 X X^T / n over its inputs (in, in)."""
    W = weight.detach().double().clone()
    H = hessian.detach().double().clone()
    n_cols = W.shape[1]
    qp = choose_qparams(weight.detach().float(), spec.fmt, spec.gran, spec.symmetric)
    dead = torch.diag(H) == 0  # inputs that never fire: any value works, use zero
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(n_cols, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    quant = _column_quantizer(spec, qp, n_cols)
    Q = torch.zeros_like(W)
    loss = 0.0
    for start in range(0, n_cols, block_size):
        end = min(start + block_size, n_cols)
        W1, Hinv1 = W[:, start:end].clone(), Hinv[start:end, start:end]
        Err1 = torch.zeros_like(W1)
        for i in range(end - start):
            col = start + i
            orig = int(perm[col]) if perm is not None else col
            w, d = W1[:, i], Hinv1[i, i]
            q = quant(w, orig)
            Q[:, col] = q
            loss += float(((w - q) ** 2).sum() / d**2 / 2)
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, end:] -= Err1 @ Hinv[start:end, end:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return GPTQResult(Q.to(weight.dtype), qp, loss, perm)

