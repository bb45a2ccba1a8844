"""Activation scale math and shape padding shared by the CPU and GPU kernels (plain torch).

Kept free of any kernel call so CPU tests can check it against float64 references. The rules mirror
dmquant's fake-quant primitives exactly (symmetric scale = amax / qmax, an all-zero row gets scale 1,
round half to even, clamp to the grid), so a kernel fed these codes sees the reference's codes.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path
from typing import Literal

import torch

ActGranularity = Literal["token", "tensor"]
E4M3_MAX = 448.0


log = logging.getLogger(__name__)
_AVX512_ISAS = ("AVX512", "AVX10", "ALL", "DEFAULT")
_VNNI_ISAS = ("VNNI", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10", "ALL", "DEFAULT")


def vnni_available() -> bool:
    """AVX512-VNNI / AVX-VNNI: int8 kernels then accumulate u8*s8 without int16 saturation. A oneDNN
    capped below VNNI (ONEDNN_MAX_CPU_ISA=AVX2, SSE41, AVX512_CORE) saturates like a CPU without it."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if cap and not any(isa in cap for isa in _VNNI_ISAS):
        return False
    probe = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(probe is not None and probe())


def avx512_capped() -> str | None:
    """Why torch or oneDNN is told not to use AVX-512 here (`ATEN_CPU_CAPABILITY`, `ONEDNN_MAX_CPU_ISA`),
    else None: dmquant's own AVX-512 kernels then stand down too, so a capped run is a capped run."""
    aten = torch.backends.cpu.get_cpu_capability()  # honours ATEN_CPU_CAPABILITY
    if not aten.upper().startswith("AVX512"):
        return f"torch's CPU capability is {aten} (ATEN_CPU_CAPABILITY), not AVX-512"
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if cap and not any(isa in cap for isa in _AVX512_ISAS):  # AVX2_VNNI has VNNI, not AVX-512
        return f"ONEDNN_MAX_CPU_ISA={cap} caps the CPU below AVX-512"
    return None


@functools.cache
def build_extension(name: str, source: Path, flags: tuple[str, ...]) -> tuple[object | None, str | None]:
    """(dmquant's compiled C++ kernel module, None) or (None, why not): built by torch's extension
    loader once per process (cached on disk by torch); any failure leaves the caller's fallback path."""
    if not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")):
        return None, "no C++ compiler to build it (set CXX)"
    try:
        from torch.utils.cpp_extension import load
        log.info("building dmquant's %s kernel (once; cached by torch)", name)
        return load(name=name, sources=[str(source)], extra_cflags=list(flags), verbose=False), None
    except Exception as exc:  # noqa: BLE001 - any build failure means the fallback path runs instead
        return None, f"its build failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"


def dynamic_scale(x2: torch.Tensor, granularity: ActGranularity, qmax: float, dim: int = -1) -> torch.Tensor:
    """Symmetric scale of a 2-D activation view: (M, 1) per token (row) or (1, 1) per tensor.

    `dim` names the channel axis of a per-token scale, so a convolution input (N, C, *S) gets its
    per-pixel scales (N, 1, *S) without a transposed copy (amin/amax are exact in any layout)."""
    if granularity not in ("token", "tensor"):
        raise ValueError(f"activation granularity must be 'token' or 'tensor', got {granularity!r}")
    xf = x2.float()
    if xf.numel() == 0:  # an empty batch: the keepdim shape of the reduction below
        shape = [1, 1] if granularity == "tensor" else [1 if d == dim % xf.dim() else n for d, n in enumerate(xf.shape)]
        return xf.new_ones(shape)
    # amin and amax apart: torch.aminmax along a dim runs ~10x slower on CPU (measured, torch 2.14)
    if granularity == "token":
        lo, hi = xf.amin(dim=dim, keepdim=True), xf.amax(dim=dim, keepdim=True)
    else:
        lo, hi = xf.amin().reshape(1, 1), xf.amax().reshape(1, 1)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise FloatingPointError("non-finite (NaN/inf) activations reached a quantized kernel: "
                                 "check the model's inputs or run it in higher precision")
    amax = torch.maximum(lo.abs(), hi.abs())
    scale = amax / qmax
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def int_codes(x: torch.Tensor, scale: torch.Tensor | float, qmin: int, qmax: int) -> torch.Tensor:
    """round(x / scale) clamped to [qmin, qmax], as exact integer values in float32.

    Division (not multiplication by 1/scale) and torch.round (half to even) match the fake-quant
    reference bit for bit, which multiplying by a reciprocal would not at rounding ties."""
    return torch.div(x.float(), scale).round_().clamp_(qmin, qmax)


def requantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes (out, ...) and per-output-channel scales of an already-quantized weight.

    For group-wise weights of convolutions, whose per-group scales do not factor out of a window: each
    weight moves by at most half an int8 step of its row (amax / 254), against up to half the group's
    own int4 step (amax_group / 14) for the rounding that made it."""
    w = weight.detach().double().reshape(weight.shape[0], -1)
    amax = w.abs().amax(1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    codes = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
    return codes.reshape(weight.shape), scale.reshape(-1).float()


def fp8_codes(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """x / scale saturated to e4m3's range and rounded to float8_e4m3fn (nearest, ties to even)."""
    return torch.div(x.float(), scale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def pad_to(t: torch.Tensor, dim: int, multiple: int, minimum: int = 0) -> torch.Tensor:
    """Zero-pad `dim` up to a multiple of `multiple` (and at least `minimum`); zeros do not change a
    matmul's valid block, so kernels with shape rules slice the padding off afterwards."""
    size = t.shape[dim]
    target = max(-(-size // multiple) * multiple, minimum)
    if target == size:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [0, target - size]
    return torch.nn.functional.pad(t, pad)


def channel_scale(scale: torch.Tensor | float, out_features: int) -> torch.Tensor:
    """A weight scale given per tensor or per output channel, as a float32 vector of length `out`."""
    s = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
    if s.numel() == 1:
        s = s.expand(out_features)
    if s.numel() != out_features:
        raise ValueError(f"weight scale has {s.numel()} values for {out_features} output channels "
                         "(give one per output channel or a single per-tensor value)")
    if not (torch.isfinite(s).all() and (s > 0).all()):
        raise ValueError("weight scales must be finite and positive")
    return s.contiguous()
