"""SVDQuant's low-rank branch: W = L1 L2 + R, the top-r SVD part kept in 16-bit beside the low-bit GEMM.

Once smoothing has moved activation outliers into the weight, the weight's outliers sit in a few large
singular directions; a rank-r branch (r << n) keeps them in high precision, and the residual R, with a
flatter spectrum, quantizes to 4 bits with a smaller error. By Eckart-Young ||R||_F is the norm of the
singular values past r. The branch reads the layer's (transformed, unquantized) input and also holds
merged LoRA ranks (`dmquant.transforms.lora`), concatenated after the SVD ones.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..memory import release_freed_memory
from ..nn.qmodule import QuantModule
from .layer import quantized_layers, set_weight

_CONV = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}


@dataclass
class LowRankSplit:
    """W = up @ down + residual, with up = U_r S_r^1/2 and down = S_r^1/2 V_r^T."""

    down: torch.Tensor  # (r, in), in the weight's dtype
    up: torch.Tensor  # (out, r)
    residual: torch.Tensor  # float64, W minus the product of the *stored* factors
    tail_norm: float  # sqrt(sum of squared singular values past r)

    @property
    def rank(self) -> int:
        return self.down.shape[0]


EXACT_SVD_MAX = 1024  # a full SVD up to this min(out, in); above it a randomized one (same top ranks)
RANDOMIZED_OVERSAMPLE, RANDOMIZED_ITERS = 16, 6


def _randomized_svd(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k singular triplets by a seeded range finder with power iterations (Halko et al. 2011):
    U S V^T = Q Q^T W, the projection of W on a k+p dimensional basis of its range. A full float64 SVD
    of a 1152x4608 weight takes ~6 s on one core, this ~0.2 s, and the smoothing search runs it ten
    times per layer. Seeded, so quantizing twice gives the same branch."""
    g = torch.Generator().manual_seed(0)
    omega = torch.randn(w.shape[1], min(k + RANDOMIZED_OVERSAMPLE, min(w.shape)), generator=g, dtype=w.dtype)
    q = torch.linalg.qr(w @ omega).Q
    for _ in range(RANDOMIZED_ITERS):
        q = torch.linalg.qr(w @ torch.linalg.qr(w.T @ q).Q).Q
    ub, s, vh = torch.linalg.svd(q.T @ w, full_matrices=False)
    return (q @ ub)[:, :k], s[:k], vh[:k]


def svd_split(w2d: torch.Tensor, rank: int, dtype: torch.dtype, overwrite: bool = False) -> LowRankSplit:
    """Top-`rank` SVD factors of a 2-D weight (computed in float64, stored in `dtype`); exact for
    weights up to EXACT_SVD_MAX on their short side, randomized above (`_randomized_svd`).
    `overwrite`: a float64 `w2d` the caller no longer needs becomes the residual (one weight-sized
    float64 buffer fewer; the smoothing search's trial weights)."""
    w = w2d.detach() if overwrite and w2d.dtype == torch.float64 else w2d.detach().double()
    r = max(0, min(rank, *w.shape))
    if min(w.shape) <= EXACT_SVD_MAX or r == 0:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        tail = float(s[r:].norm())
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:  # U_r S_r V_r^T projects W, so the residual norm is sqrt(||W||^2 - sum s_r^2)
        u, s, vh = _randomized_svd(w, r)
        flat = w.reshape(-1)
        tail = float((torch.dot(flat, flat) - s.square().sum()).clamp_min(0).sqrt())  # no squared copy
    root = s.sqrt()
    up, down = (u * root).to(dtype), (root[:, None] * vh).to(dtype)
    # L1 L2 + R = W in the stored precision; addmm: no float64 product temporary (a weight-sized copy),
    # in place where w is a buffer of this call's own (or the caller's to overwrite)
    owned = overwrite or w2d.dtype != torch.float64  # .double() copied it
    up64, down64 = up.double(), down.double()
    residual = w.addmm_(up64, down64, alpha=-1) if owned else torch.addmm(w, up64, down64, alpha=-1)
    return LowRankSplit(down, up, residual, tail)


def _plain(module: nn.Module) -> bool:
    """No hooks (user, accelerate offload) that calling the module would run and a fused path would skip."""
    return not (module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"))


class LowRankBranch(nn.Module):
    """up(down(x)) in the model's float dtype: the SVD ranks first, then each merged adapter's."""

    def __init__(self, down: nn.Module, up: nn.Module, svd_rank: int = 0, adapters: Any = ()) -> None:
        super().__init__()
        self.down, self.up = down, up
        self.svd_rank = svd_rank
        self.adapters: list[tuple[str, int]] = [(str(n), int(r)) for n, r in adapters]

    @property
    def rank(self) -> int:
        return self.down.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out + up(down(x)) for a kernel's output: a linear branch's second GEMM accumulates into `out`
        in place (no (tokens, out) temporary and no extra pass over it)."""
        if not (_plain(self) and _plain(self.up) and type(self.up) is nn.Linear and self.up.bias is None
                and out.dtype == self.up.weight.dtype):
            return out + self(x)
        h = self.down(x)
        out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), self.up.weight.t())
        return out

    @classmethod
    def build(cls, layer: QuantModule, down: torch.Tensor, up: torch.Tensor, svd_rank: int = 0,
              adapters: Any = ()) -> "LowRankBranch":
        """A branch for `layer` from factors (r, in[*kernel]) and (out, r): a Linear pair, or for a
        convolution a conv of the layer's geometry with r outputs followed by a 1x1 conv."""
        r, shape = down.shape[0], layer.weight_shape  # no decode of a packed weight
        if isinstance(layer, nn.Linear):
            d = nn.Linear(shape[1], r, bias=False, device="meta")
            u = nn.Linear(r, shape[0], bias=False, device="meta")
        else:
            conv = _CONV[len(shape)]
            d = conv(shape[1], r, layer.kernel_size, layer.stride, layer.padding, layer.dilation, bias=False,
                     padding_mode=layer.padding_mode, device="meta")
            u = conv(r, shape[0], 1, bias=False, device="meta")
        # contiguous: the same numbers in another memory layout would round differently in the matmul
        d.weight = nn.Parameter(down.reshape(r, *shape[1:]).contiguous())
        u.weight = nn.Parameter(up.reshape(shape[0], r, *[1] * (len(shape) - 2)).contiguous())
        return cls(d, u, svd_rank, adapters)

    @classmethod
    def empty(cls, layer: QuantModule, svd_rank: int, adapters: Any = ()) -> "LowRankBranch":
        """Placeholder of the right shapes (on the layer's device, e.g. meta) for load_state_dict."""
        r, shape = svd_rank + sum(int(n) for _, n in adapters), layer.weight_shape
        new = lambda *dims: torch.empty(*dims, device=layer.weight_device, dtype=layer.weight_dtype)  # noqa: E731
        return cls.build(layer, new(r, *shape[1:]), new(shape[0], r), svd_rank, adapters)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) weights in layer shape: (r, in, *kernel) and (out, r, *ones)."""
        return self.down.weight.detach(), self.up.weight.detach()


def _rank_for(name: str, rank: int, ranks: dict[str, int]) -> int:
    """Per-layer rank: the first `ranks` pattern (regex search) matching the name, else `rank`."""
    return next((int(r) for pattern, r in ranks.items() if re.search(pattern, name)), rank)


def apply_svd(modules: list[nn.Module], run: Callable[[], Any], rank: int = 32,
              ranks: dict[str, int] | None = None) -> dict[str, float]:
    """Split every weight-quantized Linear/Conv into a rank-r branch and a quantized residual
    (data-free: `run` is not called). `ranks` maps name patterns to per-layer ranks (0 skips).
    Returns the residual's relative Frobenius norm ||R|| / ||W|| per layer."""
    out = {}
    for _, name, layer in quantized_layers(modules):
        r = _rank_for(name, rank, ranks or {})
        if layer.weight_quantizer is None or getattr(layer, "groups", 1) != 1 or r <= 0:
            continue
        if layer.lowrank is not None:
            raise ValueError(f"{name} already has a low-rank branch (svd runs once, before LoRA merges)")
        w = layer.weight.detach()
        split = svd_split(w.reshape(w.shape[0], -1), r, w.dtype)
        layer.lowrank = LowRankBranch.build(layer, split.down, split.up, split.rank)
        set_weight(layer, split.residual.reshape(w.shape))
        out[name] = split.tail_norm / max(float(w.double().norm()), 1e-30)
        del w, split
        release_freed_memory()  # the float64 SVD temporaries, before the next layer's (dmquant.memory)
    return out
