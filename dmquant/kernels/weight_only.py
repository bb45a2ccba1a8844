"""CPU weight-only kernels (W4A16 / W8A16): 16-bit activations times int4 / int8 weight codes.

Two ways to multiply, picked per layer from the token count of its first call:
- *decode-GEMM* (>= `DECODE_MIN_TOKENS` tokens, the denoiser's attention and MLP layers): the layer's
  own packed codes are decoded to the activation dtype per call (one layer's 16-bit weight at a
  time, freed after the call) and multiplied on the 16-bit GEMM. Where bf16 is native this runs at
  bf16 speed: measured at 1024 x 1152 x 4608 on an AVX-512-BF16 core, 76 ms against 154 ms fp32 and
  71 ms bf16; torch's int4 kernel takes 182 ms there. The kernel holds no copy of its own.
  Convolutions always take this way (their decoded weight on the 16-bit convolution).
- *torch's packed kernels* (fewer tokens: timestep and adaLN projections, where decoding a whole
  weight for one row costs 15x the matmul). int4 in groups of 32-256 along the input:
  `aten._weight_int4pack_mm_for_cpu`. Its weight is torch's own nibble layout (built from unsigned
  codes 0..15) and each group carries a (scale, zero) pair with w = (q - 8) * scale + zero. A
  symmetric int4 code c is q = c + 8 with zero 0; an asymmetric uint4 code q with zero point z is
  w = (q - 8) * s + (8 - z) * s: both the reference's value, up to the 16-bit rounding of the scale
  and zero the kernel takes.
  int8 per output channel: `aten._weight_int8pack_mm` (w = code * scale).
  Both layouts give the codes back (`unpack_int4`: torch's CPU int4 layout stores, per block of 64
  output rows and per input, 32 bytes whose low nibbles are rows 0-31 and high nibbles rows 32-63;
  checked against the op itself at first use), so a layer keeps only the kernel's copy.
On CPUs with AVX512-FP16, 4-bit linears and 2-D convolutions take a third way at any token count (small bf16 / fp16
batches excepted, which torch's packed kernels serve): *dmquant's fp16 kernel* (`f16_gemm`), products
in fp16 at twice fp32's rate, activations of any float dtype rounded to fp16 per token, the codes its
own nibble panels (read back exactly, so the layer holds one copy); a convolution multiplies its
windows, written in fp16 one row a pixel, on the same GEMM.
The first two ways are for bf16 / fp16 activations, a W4A16 / W8A16 recipe's own definition; outputs carry
their rounding (bf16: relative ~4e-3 against the float reference). fp32 activations on a packed layer
take the decode-GEMM in fp32: bit for bit the simulated path's weight, decoded 6x faster than the
generic decoder, but no faster than an fp32 model (torch's packed kernels run ~50x slower than fp32
`F.linear` on fp32 inputs, so they are never picked for them).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..granularity import PerChannel, PerGroup, PerTensor
from ..primitives import element_format
from . import f16_gemm
from .common import channel_scale

HALF = (torch.bfloat16, torch.float16)
INT4_GROUPS = (32, 64, 128, 256)
DECODE_MIN_TOKENS = 48  # below, torch's packed kernels win (measured crossover ~50 tokens at 1152 x 6912)


def available() -> bool:
    """Whether torch's packed weight-only ops exist (the decode-GEMM needs none)."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(torch.ops.aten, "_weight_int8pack_mm")


@dataclass(frozen=True)
class PackedWeightOnly:
    """Kernel-layout weight plus its scales, in the activation dtype the kernel multiplies."""

    bits: int
    weight: torch.Tensor  # aten int4: torch's packed uint8 layout; aten int8 and decode: see `decode`
    scales: torch.Tensor  # aten int4: (groups, out, 2) scale/zero pairs; aten int8: (out,); decode: (out, groups)
    group: int
    bias: torch.Tensor | None
    out_features: int
    decode: bool = False  # decode-GEMM: weight is the layer's codes, (out, in / 2) nibble pairs or (out, in)
    nibbles: bool = False  # decode: two 4-bit codes a byte, low nibble first (the layer's own packing)
    signed: bool = True  # decode: two's complement codes (else unsigned, with `zero`)
    zero: torch.Tensor | None = None  # decode, asymmetric: (out, groups) zero points


def unsupported_reason(layer, dtype: torch.dtype) -> str | None:  # noqa: ANN001 - a QuantLinear / QuantConv
    """Why `layer` cannot run weight-only with `dtype` activations (None when it can)."""
    wq, iq = layer.weight_quantizer, layer.input_quantizer
    if iq is not None or wq is None:
        return "weight-only kernels need weight quantization without input quantization"
    if layer.is_vq:
        return "vector-quantized weights decode through their codebook"
    if dtype not in HALF and not (dtype == torch.float32 and layer.is_packed):
        return (f"weight-only kernels multiply bf16/fp16 activations (fp32 on packed layers), the input is "
                f"{str(dtype).removeprefix('torch.')}")
    spec, n_in = wq.spec, row_length(layer)
    g = spec.gran
    if not isinstance(g, (PerChannel, PerTensor, PerGroup)):
        return f"weight-only kernels need weights per channel, tensor or group, not {spec.granularity}"
    if spec.format in ("int4", "uint4"):
        return None if n_in % 2 == 0 else "int4 weight-only needs an even number of inputs per row"
    if spec.format == "int8" and spec.symmetric:
        return None
    return f"no weight-only kernel for {spec.short()} weights (int4 / uint4, or symmetric int8)"


def row_length(layer) -> int:  # noqa: ANN001
    """Inputs per output row: in_features, or in_channels / groups x kernel size for a convolution."""
    return math.prod(layer.weight_shape[1:])


def _aten_fits(layer) -> bool:  # noqa: ANN001
    """Whether torch's packed kernels take the layer: linear; int8 per channel, or int4 in groups of
    32-256 over a multiple of 32 rows."""
    spec = layer.weight_quantizer.spec
    if not (available() and hasattr(layer, "in_features")):
        return False
    if spec.bits == 8:
        return isinstance(spec.gran, (PerChannel, PerTensor))
    g = spec.gran
    return isinstance(g, PerGroup) and g.size in INT4_GROUPS and layer.in_features % g.size == 0 \
        and layer.out_features % 32 == 0


def f16_fits(layer) -> bool:  # noqa: ANN001
    """Whether dmquant's fp16 kernel takes the layer here: a linear, or a 2-D convolution (groups 1,
    zero padding given as numbers), with 4-bit integer codes, on a CPU with AVX512-FP16 (and a compiler)."""
    spec = layer.weight_quantizer.spec
    if spec.format not in ("int4", "uint4"):
        return False
    conv = isinstance(layer, torch.nn.Conv2d) and layer.groups == 1 and layer.padding_mode == "zeros" \
        and not isinstance(layer.padding, str)
    if not (hasattr(layer, "in_features") or conv):
        return False
    return f16_gemm.unsupported_reason(spec.gran.size if isinstance(spec.gran, PerGroup) else None) is None


def prepare(layer, dtype: torch.dtype, tokens: int | None = None) -> PackedWeightOnly | f16_gemm.PackedF16Gemm:  # noqa: ANN001
    """The layer's weight for the kernel its calls want: torch's packed kernels for fewer than
    `DECODE_MIN_TOKENS` 16-bit rows when they take the layer, else dmquant's fp16 kernel where it
    runs, else the decode-GEMM (`tokens` None: not known yet)."""
    few = tokens is not None and tokens < DECODE_MIN_TOKENS and dtype in HALF and _aten_fits(layer)
    if not few and f16_fits(layer):
        return _prepare_f16(layer)
    if not few:
        return _prepare_decode(layer, dtype)
    wq = layer.weight_quantizer
    codes = layer.weight_codes()  # (out, in) grid values: signed int4 / uint4 / int8
    qp = wq.qparams
    bias = None if layer.bias is None else layer.bias.detach().to(dtype)
    if wq.spec.bits == 8:
        scale = channel_scale(qp.scale, layer.out_features).to(dtype)
        return PackedWeightOnly(8, codes.to(torch.int8).contiguous(), scale, 0, bias, layer.out_features)
    group = wq.spec.gran.size
    scale = qp.scale.float().reshape(layer.out_features, -1)  # (out, groups)
    # codes c on a grid starting at `low` (-8 signed, 0 unsigned), w = (c - z) s; the kernel's
    # unsigned q = c - low gives w = (q - 8) s + (8 + low - z) s.
    low = element_format(wq.spec.fmt, wq.spec.symmetric).min_value
    z = torch.zeros_like(scale) if qp.zero_point is None else qp.zero_point.float().reshape(scale.shape)
    unsigned, zero = codes - low, (8 + low - z) * scale
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned.to(torch.int32).contiguous(), 1)
    pairs = torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()  # (groups, out, 2)
    return PackedWeightOnly(4, weight, pairs, group, bias, layer.out_features)


def _prepare_f16(layer) -> f16_gemm.PackedF16Gemm:  # noqa: ANN001
    """The layer's codes as 0..15 (a signed code c is c + 8, its zero point 8) in the fp16 kernel's panels."""
    wq = layer.weight_quantizer
    spec, qp = wq.spec, wq.qparams
    out = layer.weight_shape[0]
    low = element_format(spec.fmt, spec.symmetric).min_value
    scale = _rows(qp.effective_scale(), out)
    zero = torch.zeros_like(scale) if qp.zero_point is None else _rows(qp.zero_point, out)
    group = spec.gran.size if isinstance(spec.gran, PerGroup) else None
    codes = layer.weight_codes().reshape(out, -1)
    return f16_gemm.pack((codes - low).to(torch.uint8), scale, zero - low, group, layer.bias)


def _prepare_decode(layer, dtype: torch.dtype) -> PackedWeightOnly:  # noqa: ANN001
    """Scales in `dtype` over the layer's own codes: its packed nibbles when it holds them (shared,
    not copied), else int8 codes of its float master."""
    wq = layer.weight_quantizer
    spec, qp = wq.spec, wq.qparams
    out, inp = layer.weight_shape[0], row_length(layer)
    scale = _rows(qp.effective_scale(), out)  # (out, groups): one group per row when per channel / tensor
    zero = None if qp.zero_point is None else _rows(qp.zero_point, out).to(dtype)
    held = layer._buffers.get("weight_packed")
    nibbles = spec.bits == 4 and held is not None
    if nibbles:
        weight = held.view(out, inp // 2)
    elif spec.bits == 4:
        weight = layer.int_weight_codes() if spec.symmetric else layer.weight_codes().to(torch.uint8)
    else:
        weight = layer.int_weight_codes()
    bias = None if layer.bias is None else layer.bias.detach().to(dtype)
    group = spec.gran.size if isinstance(spec.gran, PerGroup) else inp  # the last group may be ragged
    return PackedWeightOnly(spec.bits, weight, scale.to(dtype).contiguous(), group, bias, out,
                            decode=True, nibbles=nibbles, signed=spec.symmetric, zero=zero)


def _rows(t: torch.Tensor, out: int) -> torch.Tensor:
    t = t.detach().float()
    return t.reshape(out, -1) if t.numel() >= out else t.reshape(1, -1).expand(out, -1)


def decode(packed: PackedWeightOnly) -> torch.Tensor:
    """The (out, in) weight in the scales' dtype: (code - zero) * scale, built in one buffer (a
    ragged last group is padded while scaling and cut off after)."""
    out, groups = packed.scales.shape
    n_in, width = packed.weight.shape[1] * (2 if packed.nibbles else 1), groups * packed.group
    w = torch.empty(out, width, dtype=packed.scales.dtype)
    codes = w if width == n_in else torch.empty(out, n_in, dtype=w.dtype)
    if packed.nibbles:
        pairs, p = codes.view(out, -1, 2), packed.weight
        if packed.signed:
            pairs[..., 0] = (p << 4).view(torch.int8) >> 4
            pairs[..., 1] = p.view(torch.int8) >> 4
        else:
            pairs[..., 0], pairs[..., 1] = p & 15, p >> 4
    else:
        codes.copy_(packed.weight)
    if codes is not w:
        w[:, :n_in], w[:, n_in:] = codes, 0
    blocks = w.view(out, groups, packed.group)
    if packed.zero is not None:
        blocks.sub_(packed.zero.unsqueeze(-1))
    blocks.mul_(packed.scales.unsqueeze(-1))
    return w if codes is w else w[:, :n_in]


INT4_BLOCK_N = 64


def unpack_int4(weight: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The unsigned 0..15 codes (out, in) that `_convert_weight_to_int4pack_for_cpu` packed."""
    blocks = weight.reshape(out_features // INT4_BLOCK_N, in_features, INT4_BLOCK_N // 2)
    nibbles = torch.cat([blocks & 15, blocks >> 4], dim=-1)  # (blocks, in, 64 rows)
    return nibbles.permute(0, 2, 1).reshape(out_features, in_features)


@functools.lru_cache(maxsize=1)
def int4_unpack_exact() -> bool:
    """Whether this torch packs int4 the way `unpack_int4` reads it (a round trip, once)."""
    if not available():
        return False
    q = torch.randint(0, 16, (2 * INT4_BLOCK_N, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    try:
        return torch.equal(unpack_int4(packed, *q.shape).to(torch.int32), q)
    except RuntimeError:  # another layout size
        return False


def gives_codes(packed: PackedWeightOnly | f16_gemm.PackedF16Gemm) -> bool:
    """The fp16 kernel and torch's int8 always; torch's int4 when out_features fills whole 64-row blocks
    of a layout this torch matches. The decode-GEMM holds the layer's own codes: nothing to give back."""
    if isinstance(packed, f16_gemm.PackedF16Gemm):
        return True
    if packed.decode:
        return False
    return packed.bits == 8 or (packed.out_features % INT4_BLOCK_N == 0 and int4_unpack_exact())


def packed_codes(layer, packed: PackedWeightOnly | f16_gemm.PackedF16Gemm) -> torch.Tensor:  # noqa: ANN001
    """The layer's weight codes (out, in) as int8 grid values, read back from `packed`."""
    if not gives_codes(packed):
        raise ValueError(f"the int4 weight-only layout cannot give {layer.qname}'s codes back")
    low = element_format(layer.weight_quantizer.spec.fmt, layer.weight_quantizer.spec.symmetric).min_value
    if isinstance(packed, f16_gemm.PackedF16Gemm):
        return f16_gemm.unpack(packed).to(torch.int8) + int(low)
    if packed.bits == 8:
        return packed.weight
    return unpack_int4(packed.weight, packed.out_features, layer.in_features).to(torch.int8) + int(low)


def conv(layer, x: torch.Tensor, packed: PackedWeightOnly | f16_gemm.PackedF16Gemm) -> torch.Tensor:  # noqa: ANN001
    """A convolution on the fp16 kernel, or its decoded 16-bit weight on the 16-bit convolution."""
    if isinstance(packed, f16_gemm.PackedF16Gemm):
        return f16_gemm.conv2d(x, packed, layer.kernel_size, layer.stride, layer.padding, layer.dilation)
    return layer._conv_forward(x, decode(packed).reshape(layer.weight_shape), packed.bias)


def linear(x: torch.Tensor, packed: PackedWeightOnly | f16_gemm.PackedF16Gemm) -> torch.Tensor:
    if isinstance(packed, f16_gemm.PackedF16Gemm):
        return f16_gemm.linear(x, packed)
    if packed.decode:
        return torch.nn.functional.linear(x, decode(packed), packed.bias)
    x2 = x.reshape(-1, x.shape[-1])
    if packed.bits == 8:
        y = torch.ops.aten._weight_int8pack_mm(x2, packed.weight, packed.scales)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed.weight, packed.group, packed.scales)
    if packed.bias is not None:
        y = y + packed.bias
    return y.reshape(*x.shape[:-1], packed.out_features)
