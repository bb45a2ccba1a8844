"""int4 x fp16 GEMM on AVX512-FP16 (`csrc/f16_gemm.cpp`): W4A16 faster than fp32 where bf16 is not.

A W4A16 layer otherwise decodes its codes to the activation dtype and runs torch's 16-bit or fp32 GEMM.
On CPUs whose bf16 dot product is slow (an AVX512-BF16 Xeon measured bf16 GEMMs at 0.52-0.58x fp32,
and oneDNN's fp16 GEMM at fp32 speed, converting to fp32 inside) that can be no faster than fp32.
AVX512-FP16's vfmadd231ph does 32 multiply-adds a zmm, twice fp32's (measured 338 against 174 GFLOP/s
on one core), so this kernel multiplies in fp16: activations are scaled per token by a power of two
(exact) so |a| <= 1, each column's weights by a power of two so |w| <= 1, and products are summed in
fp16 over at most 64 inputs (a partial sum below 32, fp16 spacing 2^-6 at worst) before they join
an fp32 sum. The int4 codes stay nibbles, decoded a 64-column panel at a time. Where the CPU lacks
AVX512-FP16 (or `ATEN_CPU_CAPABILITY` / `ONEDNN_MAX_CPU_ISA` cap it), layers keep the decode-GEMM.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .common import avx512_capped, build_extension

SOURCE = Path(__file__).with_name("csrc") / "f16_gemm.cpp"
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512fp16", "-mf16c")
PANEL, K_STEP = 64, 64  # output columns a panel; inputs are padded to whole fp16 partial sums
FP16_MAX = 65504.0


def cpu_reason() -> str | None:
    """Why this CPU (or an ISA cap in the environment) cannot run the kernel (None when it can)."""
    flags = torch.cpu.get_capabilities()
    if not all(flags.get(f, False) for f in ("avx512_f", "avx512_bw", "avx512_fp16")):
        return "the CPU has no AVX512-FP16"
    return avx512_capped()


def _build() -> tuple[object | None, str | None]:
    """(the compiled module, None) or (None, why not); built once per process, cached on disk by torch."""
    return build_extension("dmquant_f16_gemm", SOURCE, FLAGS)


def unsupported_reason(group: int | None = None) -> str | None:
    """Why weights with this group size (None: one group a row) cannot take the kernel here."""
    if group is not None and group % 2:
        return f"group size {group} is odd (the kernel works in pairs of inputs)"
    return cpu_reason() or _build()[1]


@dataclass(frozen=True)
class PackedF16Gemm:
    """4-bit codes in 64-column panels of input pairs, with fp16 scales and zero points per group."""

    weight: torch.Tensor  # uint8 (N' / 64, K' / 2, 64): low nibbles the pair's first 64 values, high the next
    scale: torch.Tensor  # float16 (N' / 64, groups, 128): each group's scale / col, two lanes a column
    zero: torch.Tensor  # float16 (N' / 64, groups, 128): each group's zero point on the 0..15 codes
    col: torch.Tensor  # float32 (N',): a power of two per column, at least its largest |weight|
    bias: torch.Tensor | None  # float32 (N',)
    group: int  # inputs a group (K' for one group a row)
    in_features: int
    out_features: int


def _pairs(t: torch.Tensor) -> torch.Tensor:
    """(N', X) per-column values -> (N' / 64, X, 128): each column's value in its two lanes of a panel."""
    n, x = t.shape
    return t.view(n // PANEL, 4, 16, x).permute(0, 3, 1, 2).unsqueeze(-1).expand(-1, -1, -1, -1, 2).reshape(
        n // PANEL, x, 128)


def pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int | None = None,
         bias: torch.Tensor | None = None) -> PackedF16Gemm:
    """Codes 0..15 (out, in), scales and zero points (out, groups) with w = (code - zero) * scale."""
    n, k = codes.shape
    if codes.numel() and not (0 <= int(codes.min()) and int(codes.max()) <= 15):
        raise ValueError("the fp16 kernel takes 4-bit codes 0..15")
    group = k if group is None else group
    if group % 2:
        raise ValueError(unsupported_reason(group))
    groups = -(-k // group)
    if scale.shape != (n, groups) or zero.shape != (n, groups):
        raise ValueError(f"scale and zero must be ({n}, {groups}): one per row and group of {group}")
    n_pad, k_pad = -(-n // PANEL) * PANEL, max(-(-k // K_STEP) * K_STEP, K_STEP)
    group = k_pad if groups == 1 else group
    g_pad = -(-k_pad // group)
    s, z = scale.double(), zero.double()
    each = lambda t: t.repeat_interleave(group, dim=1)[:, :k]  # noqa: E731 - per group -> per input
    big = ((codes.float() - each(z.float())).abs() * each(s.float().abs())).amax(-1).double() if k else s[:, 0] * 0
    if not (torch.isfinite(s).all() and torch.isfinite(z).all()):
        raise ValueError("the fp16 kernel needs finite scales and zero points")
    col = torch.where(big > 0, torch.ldexp(torch.ones_like(big), torch.frexp(big).exponent), torch.ones_like(big))
    fill = lambda t, rows, cols: torch.nn.functional.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))  # noqa: E731
    # a group whose codes all sit on its zero point sets no bound on col: its (unused) scale is clamped
    s16 = fill((s / col.unsqueeze(-1)).clamp(-FP16_MAX, FP16_MAX).to(torch.float16), n_pad, g_pad)
    z16 = fill(z.to(torch.float16), n_pad, g_pad)
    q = fill(codes.to(torch.uint8), n_pad, k_pad)
    values = q.view(n_pad // PANEL, 4, 16, k_pad // 2, 2).permute(0, 3, 1, 2, 4).reshape(n_pad // PANEL, -1, 128)
    weight = (values[..., :64] | (values[..., 64:] << 4)).contiguous()
    b = None if bias is None else torch.nn.functional.pad(bias.detach().float().reshape(n), (0, n_pad - n)).contiguous()
    return PackedF16Gemm(weight, _pairs(s16).contiguous(), _pairs(z16).contiguous(),
                         torch.nn.functional.pad(col.float(), (0, n_pad - n), value=1.0).contiguous(), b, group, k, n)


def unpack(packed: PackedF16Gemm) -> torch.Tensor:
    """The 0..15 codes (out, in) `pack` was given."""
    w = packed.weight
    values = torch.cat([w & 15, w >> 4], dim=-1)  # (N' / 64, K' / 2, 128)
    panels, pairs = values.shape[:2]
    q = values.view(panels, pairs, 4, 16, 2).permute(0, 2, 3, 1, 4).reshape(panels * PANEL, pairs * 2)
    return q[:packed.out_features, :packed.in_features].contiguous()


def _module() -> object:
    reason = cpu_reason()
    module, build_reason = (None, None) if reason else _build()
    if module is None:
        raise RuntimeError(f"the fp16 weight-only kernel cannot run here: {reason or build_reason}")
    return module


def half_rows(x2: torch.Tensor, k_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp16 rows scaled by 2^-e, zero padded to k_pad; the fp32 powers of two 2^e) of float rows."""
    return tuple(_module().half_rows(x2.float().contiguous(), k_pad))  # type: ignore[return-value]


def linear(x: torch.Tensor, packed: PackedF16Gemm) -> torch.Tensor:
    """x (..., in) in any float dtype -> (..., out) float32."""
    if x.shape[-1] != packed.in_features:
        raise ValueError(f"the layer takes {packed.in_features} inputs, got {x.shape[-1]}")
    module = _module()
    x2 = x.reshape(-1, x.shape[-1])
    a, row = half_rows(x2, packed.weight.shape[1] * 2)
    y = module.f16_gemm(a, row, packed.weight, packed.scale, packed.zero, packed.group, packed.col, packed.bias)
    if y.shape[1] != packed.out_features:
        y = y[:, :packed.out_features]
    return y.reshape(*x.shape[:-1], packed.out_features)



def conv2d(x: torch.Tensor, packed: PackedF16Gemm, kernel: tuple[int, int], stride: tuple[int, int],
           padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """A 2-D convolution (groups 1, zero padding) as one GEMM over its windows, one row a pixel, each
    scaled to fp16 by its own power of two (the windows are written in fp16 directly, input pairs
    outermost). Returns float32 (N, out, H', W') in channels-last memory format."""
    if x.shape[1] * kernel[0] * kernel[1] != packed.in_features:
        raise ValueError(f"the convolution takes {packed.in_features // (kernel[0] * kernel[1])} channels, "
                         f"got {x.shape[1]}")
    module = _module()
    a, row = module.conv_rows(x.float().contiguous(), list(kernel), list(stride), list(padding), list(dilation),
                              packed.weight.shape[1] * 2)
    y = module.f16_gemm(a, row, packed.weight, packed.scale, packed.zero, packed.group, packed.col, packed.bias)
    if y.shape[1] != packed.out_features:
        y = y[:, :packed.out_features].contiguous()
    n, h, w = x.shape[0], *_out_size(x.shape[2:], kernel, stride, padding, dilation)
    return y.view(n, h, w, packed.out_features).permute(0, 3, 1, 2)  # a dense channels-last tensor


def _out_size(size: tuple[int, ...], kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
              dilation: tuple[int, int]) -> tuple[int, int]:
    return tuple((s + 2 * p - d * (k - 1) - 1) // st + 1  # type: ignore[return-value]
                 for s, k, st, p, d in zip(size, kernel, stride, padding, dilation))
