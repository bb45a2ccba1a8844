"""Group-wise int8 GEMM on AVX512-VNNI (`csrc/group_gemm.cpp`), compiled on first use.

oneDNN's int8 GEMM takes one scale per output channel, so group-wise weights (SVDQuant's int4 in groups
of 64) otherwise run as one oneDNN GEMM per group, each re-reading and re-writing the fp32 output
(`cpu._gemm_groups`): 1.1-1.8x fp32 at PixArt's shapes. This kernel keeps each group's exact int32 sum
and the fp32 accumulator in registers and applies the group's scales between the two, the way
SVDQuant's GPU kernels do: the output is written once. Codes of 4 bits or fewer are held as nibbles
(half a byte a weight, like the layer's own packing) and decoded one 32-column panel at a time into an
L2-sized buffer: measured 1.00-1.02x the byte layout's time at K = 1152, 1.22x at K = 4608.
Built by torch's C++ extension loader (needs a C++ compiler; the build is cached); where it cannot build
or the CPU (or `ATEN_CPU_CAPABILITY` / `ONEDNN_MAX_CPU_ISA`) lacks AVX512-VNNI, layers take the oneDNN
path and `report` says which ran.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .common import avx512_capped, build_extension, vnni_available

SOURCE = Path(__file__).with_name("csrc") / "group_gemm.cpp"
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni")


def cpu_reason() -> str | None:
    """Why this CPU (or the ISA caps set in the environment) cannot run the kernel."""
    flags = torch.cpu.get_capabilities()
    if not all(flags.get(f, False) for f in ("avx512_f", "avx512_bw", "avx512_vnni")):
        return "the CPU has no AVX512-VNNI"
    capped = avx512_capped()
    if capped:
        return capped
    if not vnni_available():
        return "oneDNN reports no VNNI"
    return None


def _build() -> tuple[object | None, str | None]:
    """(the compiled module, None) or (None, why not); built once per process, cached on disk by torch."""
    return build_extension("dmquant_group_gemm", SOURCE, FLAGS)


def unsupported_reason(group: int) -> str | None:
    """Why group-wise weights with this group size cannot take the kernel here (None when they can)."""
    if group % 4:
        return f"group size {group} is not a multiple of 4"
    return cpu_reason() or _build()[1]


@dataclass(frozen=True)
class PackedGroupGemm:
    """Weight codes in vpdpbusd's layout, padded to 32 columns and whole groups, with per-group sums."""

    weight: torch.Tensor  # int8 (N' / 16, K' / 4, 16, 4), or for codes in [-8, 7] uint8 nibbles (N' / 32, K' / 4, 64)
    wsum: torch.Tensor  # int32 (K' / group, N'): each group's code sum, for the activations' zero point
    scale: torch.Tensor  # float32 (K' / group, N')
    bias: torch.Tensor | None  # float32 (N',)
    group: int
    in_features: int
    out_features: int


def pack(codes: torch.Tensor, scale: torch.Tensor, group: int, bias: torch.Tensor | None = None) -> PackedGroupGemm:
    """Int8 codes (out, in), scales (out, groups) and bias -> the kernel's layout (zero padding is inert)."""
    n, k = codes.shape
    groups = -(-k // group)
    n_pad, k_pad = -(-n // 32) * 32, groups * group
    w = torch.nn.functional.pad(codes.to(torch.int8), (0, k_pad - k, 0, n_pad - n))
    s = torch.nn.functional.pad(scale.float().reshape(n, groups), (0, 0, 0, n_pad - n))
    wsum = w.view(n_pad, groups, group).sum(-1, dtype=torch.int32).t().contiguous()
    packed = w.view(n_pad // 16, 16, k_pad // 4, 4).permute(0, 2, 1, 3).contiguous()
    if n and k and -8 <= int(codes.min()) and int(codes.max()) <= 7:  # 4 bits or fewer: two codes a byte
        u = packed.view(n_pad // 32, 2, k_pad // 4, 64).add(8).to(torch.uint8)
        packed = (u[:, 0] | (u[:, 1] << 4)).contiguous()
    b = None if bias is None else torch.nn.functional.pad(bias.float().reshape(n), (0, n_pad - n)).contiguous()
    return PackedGroupGemm(packed, wsum, s.t().contiguous(), b, group, k, n)


def unpack(packed: PackedGroupGemm) -> torch.Tensor:
    """The int8 codes (out, in) that `pack` was given."""
    w = packed.weight
    if w.dtype == torch.uint8:  # nibbles: low = the panel's first 16 columns, high = the next 16, each code + 8
        halves = torch.stack([w & 15, w >> 4], dim=1).to(torch.int8) - 8  # (N' / 32, 2, K' / 4, 64)
        w = halves.view(w.shape[0] * 2, w.shape[1], 16, 4)
    full = w.permute(0, 2, 1, 3).reshape(w.shape[0] * 16, w.shape[1] * 4)
    return full[:packed.out_features, :packed.in_features].contiguous()


def codes(x: torch.Tensor, scale: torch.Tensor | float, zp: int, hi: int) -> torch.Tensor:
    """uint8 clamp(round(x / scale) + zp, 0, hi) of float rows x (M, in), scale per row (M, 1) or one:
    bit for bit `cpu._uint8_codes` in one pass."""
    s = torch.as_tensor(scale, dtype=torch.float32).reshape(-1).contiguous()
    return _module().codes(x.float().contiguous(), s, zp, hi)


def _module() -> object:
    reason = cpu_reason()
    module, build_reason = (None, None) if reason else _build()
    if module is None:
        raise RuntimeError(f"the group-wise int8 kernel cannot run here: {reason or build_reason}")
    return module


def linear(x2: torch.Tensor, scale: torch.Tensor | float, zp: int, hi: int, packed: PackedGroupGemm) -> torch.Tensor:
    """fp32 x2 (M, in) -> (M, out): activation codes with `scale` per row (M, 1) or one, the group-wise
    product, each row times its scale, plus the bias, written once."""
    q = codes(x2, scale, zp, hi)
    row = torch.as_tensor(scale, dtype=torch.float32).reshape(-1).expand(q.shape[0]).contiguous()
    return gemm(q, zp, packed, row)


def gemm(q: torch.Tensor, zp: int, packed: PackedGroupGemm, row: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 row[m] * sum_g scale[g] * ((q - zp) @ codes.T over group g) + bias for uint8 activation codes
    q (M, in); `row` (M,) is optional; both are applied as the output is written."""
    module = _module()
    k_pad = packed.weight.shape[1] * 4
    if k_pad != packed.in_features:
        q = torch.nn.functional.pad(q, (0, k_pad - packed.in_features), value=zp)
    y = module.group_gemm(q.contiguous(), zp, packed.weight, packed.wsum, packed.scale, packed.group, row,
                          packed.bias)
    return y if y.shape[1] == packed.out_features else y[:, :packed.out_features].contiguous()
