"""CPU W8A8 linear and convolution on PyTorch's x86 int8 kernels (oneDNN, fbgemm), called directly.

Which op, and why (measured by `scripts/benchmark_kernels.py` on this project's 2-core AVX512-VNNI
machine; fp32 is the baseline):
- Linear: `onednn::qlinear_pointwise` (uint8 activations, prepacked int8 weights, fp32 output) where
  the build has oneDNN; otherwise fbgemm's `quantized.linear_with_input_q_dq_qweight_dq_output_fp32`.
- Convolution (1-3 spatial dims): `onednn::qconv{1,2,3}d_pointwise` with fp32 output. fbgemm offers
  no usable alternative: `quantized.conv*d` needs a calibrated *output* scale (8-bit outputs) and
  `quantized.conv2d_dynamic` requantizes its output with the input's range (relative error 0.25-0.6
  at UNet shapes on torch 2.14). Builds without oneDNN keep convolutions on fake quantization.
- Convolution with per-token (per-pixel) activation scales: a pixel's scale does not factor out of a
  window that spans pixels, so the convolution runs as one int8 GEMM per kernel tap (the layer's
  codes at that tap, prepacked as a linear): each tap multiplies the codes of the pixels it reads,
  its output rows are scaled by those pixels' own scales, and the taps add up in fp32. Exact like
  the linear path; it costs one uint8 gather per tap (measured ~1.6-3.8x fp32 at UNet shapes).

Numerics, compared with dmquant's fake quantization (the reference):
- Weights: the layer's symmetric int8 codes and per-channel float32 scales, bit for bit.
- Activations: symmetric int8 with the reference's scales (static per tensor; dynamic amax / 127 per
  tensor or per token). We compute the codes ourselves exactly as the reference does (divide, round
  half to even, clamp; `_uint8_codes`), which is also faster here than `torch.quantize_per_tensor`.
  The kernels take uint8 with a zero point; 128 makes {0..255} - 128 exactly the grid {-128..127}.
  Per-token scales do not fit the kernels' single input scale: rows are quantized with their own
  scale, the GEMM runs with scale 1 and the output rows are multiplied by their scale afterwards.
  Accumulation is exact int32, so outputs differ from a float64 reference computed from the same
  codes only by fp32 rounding of the rescaling (relative ~1e-7).
- Narrower integers (W4A8, W4A4, any int2-int8 weights and activations) run on the same GEMM: their
  codes are int8 values, and activations use the zero point 2**(bits-1) so uint8 codes stay small.
- Group-wise weights (SVDQuant's int4 in groups of 64): on AVX512-VNNI CPUs dmquant's own kernel
  (`group_gemm`: each group's exact int32 sum scaled into a register-held fp32 accumulator; measured
  2.0-3.5x fp32 at PixArt / SD shapes, one thread), elsewhere one oneDNN int8 GEMM per group with that
  group's per-channel scales, each added into the fp32 output by the sum post-op (1.1-2x fp32: every
  group re-reads and re-writes the output). Both exact like the rest (int32 inside a group).
- reduce_range: without VNNI, AVX2 int8 kernels sum pairs of u8*s8 products in int16 (vpmaddubsw),
  which saturates for large uint8 values (255*127*2 > 32767). There activations use a 7-bit grid
  (step 2s, zero point 64, uint8 codes <= 128, so pair sums fit int16 for any int8 weight), as
  PyTorch's x86 qconfig does: one bit coarser than the reference, never wrong. VNNI CPUs accumulate
  in int32 and keep all 8 bits. `reduce_range=None` picks this from the CPU. Only int8 x int8 can
  saturate (`needs_reduce_range`): W4A8 and W4A4 keep the full grid on every CPU.
- `int8_linear_fbgemm_dynamic` is fbgemm's own dynamic linear (`quantized.linear_dynamic`, one
  asymmetric uint8 range per call): it matches no dmquant recipe and exists for the benchmark.

Packed objects hold opaque oneDNN tensors or fbgemm ScriptObjects: they cannot be pickled, saved in a
state_dict or moved between devices. Quantized modules keep them as plain attributes and rebuild them
lazily from their codes and scales (which are what gets saved). Both layouts give the int8 codes back
bit for bit (`unpack_linear`, `unpack_conv`), so a layer on these kernels drops its own packed codes
and keeps one copy of its weight, the kernel's.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from . import group_gemm
from .common import ActGranularity, channel_scale, dynamic_scale, vnni_available

NAME = "fbgemm"
MAX_IN_FEATURES = 131072  # K * 128 * 127 must fit the int32 accumulator
INT_FORMATS = tuple(f"int{b}" for b in range(2, 9))
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv_prepack")


def supports_linear(in_features: int, out_features: int, fmt: str = "int8", group: int | None = None) -> str | None:
    """Why a linear of this size and format cannot run here (None when it can); `fmt` is the
    integer format of both operands (any int2-int8 code fits the int8 GEMM); `group`: weight scales
    per `group` inputs (dmquant's AVX512-VNNI kernel, else one oneDNN GEMM per group)."""
    if fmt not in INT_FORMATS:
        return f"the CPU kernels multiply int2-int8 codes, not {fmt}"
    if not (onednn_available() or fbgemm_available()):
        return "this torch build has neither oneDNN nor fbgemm int8 kernels"
    vnni_reason = group_gemm.unsupported_reason(group) if group is not None else None
    if vnni_reason and not onednn_available():
        return (f"group-wise weights need oneDNN's accumulating int8 GEMM, which this torch build lacks, or "
                f"dmquant's AVX512-VNNI kernel ({vnni_reason})")
    if in_features < 1 or out_features < 1:
        return f"empty linear ({in_features} -> {out_features})"
    if in_features > MAX_IN_FEATURES:
        return f"in_features {in_features} > {MAX_IN_FEATURES} could overflow int32 accumulation"
    return None


def supports_conv(in_channels: int, out_channels: int, kernel_size: Sequence[int], groups: int = 1,
                  padding_mode: str = "zeros", per_token: bool = False) -> str | None:
    """Why a convolution of this shape cannot run here (None when it can); `per_token`: activations
    with one scale per pixel (run tap by tap on the linear GEMM, which needs groups=1)."""
    if per_token:
        if groups != 1:
            return f"per-pixel activation scales run one GEMM per kernel tap, which needs groups=1, not {groups}"
        if not 1 <= len(kernel_size) <= 3:
            return f"only 1-3 spatial dims are supported, got kernel {tuple(kernel_size)}"
        if padding_mode not in PADDING_MODES:
            return f"padding_mode {padding_mode!r} is not one of {PADDING_MODES}"
        return supports_linear(in_channels, out_channels)
    if not onednn_available():
        return "int8 convolutions need oneDNN, which this torch build lacks"
    if not 1 <= len(kernel_size) <= 3:
        return f"only 1-3 spatial dims are supported, got kernel {tuple(kernel_size)}"
    if groups < 1 or in_channels % groups or out_channels % groups:
        return f"channels ({in_channels}, {out_channels}) are not divisible by groups={groups}"
    if padding_mode not in PADDING_MODES:
        return f"padding_mode {padding_mode!r} is not one of {PADDING_MODES}"
    return supports_linear(in_channels // groups * math.prod(kernel_size), out_channels)


# -- activations -------------------------------------------------------------------------------
def _grid(reduce_range: bool | None, bits: int = 8) -> tuple[float, int, int]:
    """(activation step in units of the scale, uint8 zero point, largest uint8 code) for `bits`-wide
    symmetric activations; see the module docstring for the reduced 7-bit grid of 8-bit ones."""
    if not 2 <= bits <= 8:
        raise ValueError(f"the int8 kernels take 2-8 bit activations, got {bits}")
    reduced = bits == 8 and (not vnni_available() if reduce_range is None else reduce_range)
    if reduced:
        return 2.0, 64, 128
    return 1.0, 2 ** (bits - 1), 2**bits - 1


def needs_reduce_range(weight_bits: int, act_bits: int) -> bool:
    """Without VNNI, u8*s8 pair sums saturate int16 only for 8-bit activations times 8-bit weights
    (255 * 2**(b-1) * 2 > 32767 needs b = 8): narrower codes run on the full grid, exactly."""
    return act_bits == 8 and weight_bits == 8 and not vnni_available()


def _uint8_codes(x: torch.Tensor, scale: torch.Tensor | float, zero_point: int, hi: int) -> torch.Tensor:
    """clamp(round(x / scale) + zp, 0, hi) as uint8: the reference's rounding (division, half to even)."""
    return torch.div(x.float(), scale).round_().add_(zero_point).clamp_(0, hi).to(torch.uint8)


def _input_scale(x: torch.Tensor, input_scale: torch.Tensor | float | None,
                 granularity: ActGranularity, bits: int = 8) -> torch.Tensor | float:
    """Static scalar, or dynamic (M, 1) per-token / scalar per-tensor symmetric scale."""
    if input_scale is None:
        qmax = 2.0 ** (bits - 1) - 1
        if granularity == "token":
            return dynamic_scale(x.reshape(-1, x.shape[-1]), "token", qmax)
        return float(dynamic_scale(x, "tensor", qmax))
    s = float(input_scale)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"static input scale must be finite and positive, got {s}")
    return s


# -- linear ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackedLinear:
    """Prepacked int8 weight for one kernel ("onednn" or "fbgemm"); the bias stays fp32.

    Group-wise weights (`group` > 0): dmquant's VNNI layout (impl "vnni"; `scale` and `bias` are views of
    its padded ones), or one oneDNN weight per group of `group` inputs with its own per-channel scales
    (impl "onednn"): a group's scale is constant inside its GEMM, so it factors out of that group's exact
    int32 sum, and oneDNN's sum post-op adds the groups up in fp32."""

    weight: object  # opaque oneDNN tensor, fbgemm LinearPackedParamsBase; group-wise: a tuple of oneDNN
    # tensors (one per group) or dmquant's VNNI layout (`group_gemm.PackedGroupGemm`, impl "vnni")
    scale: torch.Tensor  # (out,) float32 weight scales; group-wise: (groups, out)
    bias: torch.Tensor | None
    in_features: int
    out_features: int
    impl: str
    group: int = 0


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():  # quantized-tensor constructors warn of their deprecation
        warnings.simplefilter("ignore")
        yield


def _check_codes(codes: torch.Tensor, dims: str) -> None:
    if codes.dtype != torch.int8 or (codes.dim() != 2 if dims == "2" else codes.dim() < 3):
        shape = "(out, in)" if dims == "2" else "(out, in/groups, *kernel)"
        raise ValueError(f"weight codes must be torch.int8 {shape}, got {codes.dtype} {tuple(codes.shape)}")


def _check_bias(bias: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if bias is None:
        return None
    if bias.numel() != n:
        raise ValueError(f"bias has {bias.numel()} values for {n} output channels")
    return bias.detach().float().cpu().reshape(n).contiguous()


def prepack_linear(codes: torch.Tensor, scale: torch.Tensor | float, bias: torch.Tensor | None = None,
                   impl: str | None = None, group: int | None = None) -> PackedLinear:
    """Pack int8 weight codes (out, in) with per-channel (or one) scale: weight = codes * scale[:, None];
    with `group`, scale is (out, groups): weight[:, i] = codes[:, i] * scale[:, i // group].

    `impl` forces "onednn" or "fbgemm" (default: oneDNN when present, it is the faster here)."""
    _check_codes(codes, "2")
    out_f, in_f = codes.shape
    reason = supports_linear(in_f, out_f, group=group)
    if reason:
        raise ValueError(f"no CPU int8 kernel for this linear: {reason} (keep the layer on the fake backend)")
    if group is not None:
        return _prepack_groups(codes, scale, bias, group, impl or group_impl(group))
    impl = impl or ("onednn" if onednn_available() else "fbgemm")
    s, w = channel_scale(scale, out_f).cpu(), codes.detach().cpu().contiguous()
    if impl == "onednn":
        weight = torch.ops.onednn.qlinear_prepack(w, None)
    elif impl == "fbgemm":
        previous = torch.backends.quantized.engine
        try:  # pack with fbgemm whatever engine the user selected
            torch.backends.quantized.engine = "fbgemm"
            with _quiet():
                qw = torch._make_per_channel_quantized_tensor(w, s.double(), torch.zeros(out_f, dtype=torch.long), 0)
                weight = torch.ops.quantized.linear_prepack(qw, None)
        finally:
            torch.backends.quantized.engine = previous
    else:
        raise ValueError(f"unknown CPU linear implementation {impl!r}; use 'onednn' or 'fbgemm'")
    return PackedLinear(weight, s, _check_bias(bias, out_f), in_f, out_f, impl)


def group_impl(group: int) -> str:
    """The group-wise kernel that runs here: dmquant's AVX512-VNNI one ("vnni", 2-3.5x fp32 measured at
    PixArt / SD shapes) where it builds, else one oneDNN GEMM per group ("onednn", 1.1-2x)."""
    return "vnni" if group_gemm.unsupported_reason(group) is None else "onednn"


def _prepack_groups(codes: torch.Tensor, scale: torch.Tensor | float, bias: torch.Tensor | None,
                    group: int, impl: str) -> PackedLinear:
    out_f, in_f = codes.shape
    if group < 1:
        raise ValueError(f"group size must be positive, got {group}")
    n = -(-in_f // group)  # the last group may be shorter
    s = torch.as_tensor(scale, dtype=torch.float32).detach().cpu()
    if s.numel() != out_f * n:
        raise ValueError(f"group-wise weight scale has {s.numel()} values, expected {out_f} x {n} groups of {group}")
    if not (torch.isfinite(s).all() and (s > 0).all()):
        raise ValueError("weight scales must be finite and positive")
    w, s = codes.detach().cpu(), s.reshape(out_f, n)
    if impl == "vnni":
        reason = group_gemm.unsupported_reason(group)
        if reason:
            raise ValueError(f"the AVX512-VNNI group-wise kernel cannot run here: {reason}")
        vnni = group_gemm.pack(w, s, group, _check_bias(bias, out_f))
        # views of the kernel's padded scales and bias: one copy of each
        b = None if vnni.bias is None else vnni.bias[:out_f]
        return PackedLinear(vnni, vnni.scale[:, :out_f], b, in_f, out_f, impl, group)
    if impl != "onednn":
        raise ValueError(f"unknown group-wise implementation {impl!r}; use 'vnni' or 'onednn'")
    weight = tuple(torch.ops.onednn.qlinear_prepack(w[:, i:i + group].contiguous(), None)
                   for i in range(0, in_f, group))
    return PackedLinear(weight, s.t().contiguous(), _check_bias(bias, out_f), in_f, out_f, impl, group)


def unpack_linear(packed: PackedLinear) -> torch.Tensor:
    """The int8 codes (out, in) a linear was packed from, read back from the kernel's layout."""
    if packed.impl == "vnni":
        return group_gemm.unpack(packed.weight)
    if packed.group:
        return torch.cat([w.to_dense().t() for w in packed.weight], dim=1).contiguous()
    if packed.impl == "onednn":
        return packed.weight.to_dense().t().contiguous()  # oneDNN holds the weight as (in, out)
    qweight, _ = torch.ops.quantized.linear_unpack(packed.weight)
    return qweight.int_repr()


def _linear_int(x2: torch.Tensor, packed: PackedLinear, div: torch.Tensor | float, x_scale: float, zp: int,
                hi: int, with_bias: bool) -> torch.Tensor:
    """fp32 x_scale * w_scale * (codes(x2 / div) @ codes(W).T) (+ bias) for a 2-D view."""
    return _gemm(_uint8_codes(x2, div, zp, hi), packed, x_scale, zp, packed.bias if with_bias else None)


def _gemm(q: torch.Tensor, packed: PackedLinear, x_scale: float, zp: int, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 x_scale * w_scale * ((q - zp) @ codes(W).T) (+ bias) for uint8 activation codes (M, in)."""
    if packed.group:
        return _gemm_groups(q, packed, x_scale, zp, bias)
    if packed.impl == "onednn":
        zeros = torch.zeros(packed.out_features, dtype=torch.long)  # tiny; symmetric weights
        return torch.ops.onednn.qlinear_pointwise(q, x_scale, zp, packed.weight, packed.scale, zeros,
                                                  bias, 1.0, 0, torch.float32, "none", [], "")
    # fbgemm quantizes a float input itself: signed integer values with scale 1 make that exact.
    y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(q.float().sub_(zp), 1.0, zp, packed.weight)
    y = y.mul_(x_scale)
    return y if bias is None else y.add_(bias)


def _gemm_groups(q: torch.Tensor, packed: PackedLinear, x_scale: float, zp: int,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """The oneDNN group-wise `_gemm`: group i's int8 GEMM scaled by its weight scales and summed into the
    fp32 output of the groups before it (oneDNN's sum post-op)."""
    zeros = torch.zeros(packed.out_features, dtype=torch.long)
    g = packed.group
    y = None
    for i, (w, s) in enumerate(zip(packed.weight, packed.scale)):
        qi = q[:, i * g:(i + 1) * g].contiguous()
        if y is None:
            y = torch.ops.onednn.qlinear_pointwise(qi, x_scale, zp, w, s, zeros, bias, 1.0, 0, torch.float32,
                                                   "none", [], "")
        else:
            y = torch.ops.onednn.qlinear_pointwise.binary(qi, x_scale, zp, w, s, zeros, y, None, 1.0, 0,
                                                          torch.float32, 1.0, 0, "sum", 1.0, "none", [], "")
    return y


def int8_linear(x: torch.Tensor, packed: PackedLinear, input_scale: torch.Tensor | float | None = None,
                granularity: ActGranularity = "token", reduce_range: bool | None = None,
                act_bits: int = 8) -> torch.Tensor:
    """Integer linear of `x` (..., in) on the int8 GEMM: symmetric `act_bits`-wide activations with a
    static `input_scale`, or dynamic per token/tensor (W8A8, and W4A8 / W4A4 with int4 codes)."""
    if x.shape[-1] != packed.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the packed linear expects {packed.in_features}")
    step, zp, hi = _grid(reduce_range, act_bits)
    x2 = x.detach().reshape(-1, packed.in_features)
    scale = _input_scale(x2, input_scale, granularity, act_bits)
    if packed.impl == "vnni":  # scales and bias applied as the output is written
        y = group_gemm.linear(x2, scale * step, zp, hi, packed.weight)
    elif isinstance(scale, torch.Tensor):  # per token: GEMM with scale 1, then rescale the output rows
        row = scale * step
        y = _linear_int(x2, packed, row, 1.0, zp, hi, with_bias=False)
        y = y.mul_(row) if packed.bias is None else torch.addcmul(packed.bias, y, row)
    else:
        y = _linear_int(x2, packed, scale * step, scale * step, zp, hi, with_bias=True)
    return y.reshape(*x.shape[:-1], packed.out_features).to(x.dtype)


def int8_linear_fbgemm_dynamic(x: torch.Tensor, packed: PackedLinear, reduce_range: bool | None = None) -> torch.Tensor:
    """fbgemm's own dynamic path: one asymmetric uint8 range per call (benchmarks only)."""
    if packed.impl != "fbgemm":
        raise ValueError("int8_linear_fbgemm_dynamic needs a linear packed with impl='fbgemm'")
    x2 = x.detach().reshape(-1, packed.in_features).float().contiguous()
    y = torch.ops.quantized.linear_dynamic(x2, packed.weight, _grid(reduce_range)[1] == 64)
    if packed.bias is not None:
        y = y.add_(packed.bias)
    return y.reshape(*x.shape[:-1], packed.out_features).to(x.dtype)


# -- convolution ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackedConv:
    """oneDNN-prepacked int8 convolution weight plus its geometry; the bias stays fp32."""

    weight: torch.Tensor | tuple[PackedLinear, ...]  # opaque oneDNN tensor, or one linear per tap (per token)
    scale: torch.Tensor  # (out,) float32
    bias: torch.Tensor | None
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]  # (before, after) per spatial dim
    groups: int
    padding_mode: str


def _split_padding(padding: tuple[tuple[int, int], ...], mode: str) -> tuple[list[int], list[int]]:
    """(F.pad list applied to the input first, padding left to the conv op): the op pads with zeros
    symmetrically, so other modes and uneven 'same' padding are applied explicitly."""
    explicit = [(a, b) if mode != "zeros" or a != b else (0, 0) for a, b in padding]
    inner = [a if mode == "zeros" and a == b else 0 for a, b in padding]
    return [v for pair in reversed(explicit) for v in pair], inner


def _tuple(v: int | Sequence[int], nd: int, what: str) -> tuple[int, ...]:
    t = (int(v),) * nd if isinstance(v, int) else tuple(int(i) for i in v)
    if len(t) != nd or min(t) < (0 if what == "padding" else 1):
        raise ValueError(f"conv {what} {v!r} does not fit {nd} spatial dims")
    return t


def _padding(padding: int | Sequence[int] | str, kernel: tuple[int, ...], dilation: tuple[int, ...]
             ) -> tuple[tuple[int, int], ...]:
    if padding == "valid":
        return tuple((0, 0) for _ in kernel)
    if padding == "same":  # PyTorch's split: the odd element goes after
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple((t // 2, t - t // 2) for t in total)
    if isinstance(padding, str):
        raise ValueError(f"conv padding {padding!r} must be 'same', 'valid' or integers")
    return tuple((p, p) for p in _tuple(padding, len(kernel), "padding"))


def prepack_conv(codes: torch.Tensor, scale: torch.Tensor | float, bias: torch.Tensor | None = None,
                 stride: int | Sequence[int] = 1, padding: int | Sequence[int] | str = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, padding_mode: str = "zeros",
                 per_token: bool = False) -> PackedConv:
    """Pack int8 conv weight codes (out, in/groups, *kernel) with per-channel (or one) scale;
    `per_token` packs one linear per kernel tap, for activations with per-pixel scales."""
    _check_codes(codes, "nd")
    out_c, in_g, *kernel = codes.shape
    nd = len(kernel)
    reason = supports_conv(in_g * groups, out_c, kernel, groups, padding_mode, per_token)
    if reason:
        raise ValueError(f"no CPU int8 kernel for this convolution: {reason} (keep the layer on the fake backend)")
    s, st, dil = channel_scale(scale, out_c).cpu(), _tuple(stride, nd, "stride"), _tuple(dilation, nd, "dilation")
    pad = _padding(padding, tuple(kernel), dil)
    w = codes.detach().cpu()
    if per_token:
        weight: torch.Tensor | tuple[PackedLinear, ...] = tuple(
            prepack_linear(w[(slice(None), slice(None), *tap)].contiguous(), s) for tap in _taps(kernel))
    else:  # the input scale given here only guides oneDNN's weight layout; each call passes its own
        weight = torch.ops.onednn.qconv_prepack(w.contiguous(), s, 1.0, 128, list(st),
                                                _split_padding(pad, padding_mode)[1], list(dil), groups, None)
    return PackedConv(weight, s, _check_bias(bias, out_c), in_g * groups, out_c, tuple(kernel), st, dil,
                      pad, groups, padding_mode)


def _taps(kernel: Sequence[int]) -> list[tuple[int, ...]]:
    """Kernel tap indices in row-major order (the order per-tap linears are packed in)."""
    return list(itertools.product(*(range(k) for k in kernel)))


def unpack_conv(packed: PackedConv) -> torch.Tensor:
    """The int8 codes (out, in/groups, *kernel) a convolution was packed from."""
    if isinstance(packed.weight, tuple):
        taps = torch.stack([unpack_linear(t) for t in packed.weight], dim=-1)
        return taps.reshape(packed.out_channels, packed.in_channels, *packed.kernel_size)
    return packed.weight.to_dense().reshape(packed.out_channels, packed.in_channels // packed.groups,
                                            *packed.kernel_size)


def int8_conv(x: torch.Tensor, packed: PackedConv, input_scale: torch.Tensor | float | None = None,
              granularity: ActGranularity = "tensor", reduce_range: bool | None = None,
              act_bits: int = 8) -> torch.Tensor:
    """Integer convolution of `x` (N, C, *S) or unbatched (C, *S): a static or dynamic per-tensor
    input scale on oneDNN's int8 convolution, or dynamic per-token (per-pixel) scales tap by tap
    (`packed` from `prepack_conv(..., per_token=True)`).

    oneDNN computes channels-last; the output is made contiguous like F.conv2d's, because diffusers
    code calls `.view` on conv outputs (one copy of the output, ~1 ms at UNet shapes)."""
    p, nd = packed, len(packed.kernel_size)
    unbatched = x.dim() == nd + 1
    xb = x.detach().unsqueeze(0) if unbatched else x.detach()
    if xb.dim() != nd + 2 or xb.shape[1] != p.in_channels:
        raise ValueError(f"conv input {tuple(x.shape)} does not match {p.in_channels} channels, {nd} spatial dims")
    if granularity not in ("token", "tensor"):
        raise ValueError(f"activation granularity must be 'token' or 'tensor', got {granularity!r}")
    step, zp, hi = _grid(reduce_range, act_bits)
    per_token = isinstance(p.weight, tuple)
    if per_token != (granularity == "token" and input_scale is None):
        raise ValueError("per-token activations need a convolution packed per tap (prepack_conv(per_token=True)), "
                         "and a per-tap packing needs dynamic per-token activations")
    if per_token:
        y = _tap_conv(xb, p, step, zp, hi, act_bits)
        return (y.squeeze(0) if unbatched else y).to(x.dtype)
    scale = step * _input_scale(xb, input_scale, "tensor", act_bits)  # type: ignore[operator]
    explicit, inner = _split_padding(p.padding, p.padding_mode)
    if any(explicit):
        xb = torch.nn.functional.pad(xb, explicit, mode="constant" if p.padding_mode == "zeros" else p.padding_mode)
    q = _uint8_codes(xb, scale, zp, hi)
    if nd in _CHANNELS_LAST:
        q = q.contiguous(memory_format=_CHANNELS_LAST[nd])
    zeros = torch.zeros(p.out_channels, dtype=torch.long)
    op = getattr(torch.ops.onednn, f"qconv{nd}d_pointwise")
    y = op(q, scale, zp, p.weight, p.scale, zeros, p.bias, list(p.stride), inner, list(p.dilation), p.groups,
           1.0, 0, torch.float32, "none", [], "")
    return (y.squeeze(0) if unbatched else y).contiguous().to(x.dtype)


def _tap_conv(xb: torch.Tensor, p: PackedConv, step: float, zp: int, hi: int, act_bits: int) -> torch.Tensor:
    """Convolution with per-pixel scales: for each kernel tap, the codes of the pixels it reads (a
    strided window of the padded channels-last codes) times that tap's weight codes, rows scaled
    by their pixels' scales, summed over taps in fp32; then bias, and NCHW-contiguous output."""
    pad = p.padding
    if p.padding_mode != "zeros":  # reflect/replicate/circular copy pixels: pad before quantizing
        xb = torch.nn.functional.pad(xb, _split_padding(pad, p.padding_mode)[0], mode=p.padding_mode)
        pad = tuple((0, 0) for _ in pad)
    scale = dynamic_scale(xb, "token", 2.0 ** (act_bits - 1) - 1, dim=1).mul_(step)  # (N, 1, *S)
    q = _uint8_codes(xb, scale, zp, hi)
    n, c, *size = q.shape
    padded = [s + a + b for s, (a, b) in zip(size, pad)]
    inner = (slice(None), *(slice(a, a + s) for s, (a, _) in zip(size, pad)))
    codes = q.new_full((n, *padded, c), zp)  # zero padding: the code of 0 (zp), channels last
    codes[inner].copy_(q.movedim(1, -1))
    scales = scale.new_zeros((n, *padded, 1))
    scales[inner].copy_(scale.movedim(1, -1))
    out = [(s - d * (k - 1) - 1) // st + 1 for s, k, d, st in zip(padded, p.kernel_size, p.dilation, p.stride)]
    if min(out) < 1:
        raise ValueError(f"conv input {tuple(xb.shape)} is smaller than the kernel {p.kernel_size} after padding")
    y: torch.Tensor | None = None
    for tap, packed in zip(_taps(p.kernel_size), p.weight):
        window = (slice(None), *(slice(i * d, i * d + st * (o - 1) + 1, st)
                                 for i, d, st, o in zip(tap, p.dilation, p.stride, out)))
        z = _gemm(codes[window].reshape(-1, c), packed, 1.0, zp, None)
        row = scales[window].reshape(-1, 1)
        y = z.mul_(row) if y is None else y.addcmul_(z, row)
    assert y is not None
    if p.bias is not None:
        y = y.add_(p.bias)
    return y.reshape(n, *out, p.out_channels).movedim(-1, 1).contiguous()
