"""CPU weight-only kernels (W4A16 / W8A16): torch's int4 / int8 packed matmuls with 16-bit activations.

- int4, groups of 32-256 along the input: `aten._weight_int4pack_mm_for_cpu`. Its weight is torch's
  own nibble layout (built from unsigned codes 0..15) and each group carries a (scale, zero) pair with
  w = (q - 8) * scale + zero. A symmetric int4 code c is q = c + 8 with zero 0; an asymmetric uint4
  code q with zero point z is w = (q - 8) * s + (8 - z) * s: both the reference's value, up to the
  16-bit rounding of the scale and zero the kernel takes.
- int8 per output channel: `aten._weight_int8pack_mm` (w = code * scale).
- Both layouts give the codes back (`unpack_int4`: torch's CPU int4 layout stores, per block of 64
  output rows and per input, 32 bytes whose low nibbles are rows 0-31 and high nibbles rows 32-63;
  checked against the op itself at first use), so a layer keeps only the kernel's copy.
Both multiply bf16 / fp16 activations (fp32 ones run ~50x slower than fp32 `F.linear` here), so the
dispatch only picks them when the layer's input is 16-bit: a W4A16 / W8A16 recipe's own definition.
Outputs carry the activation dtype's rounding (bf16: relative ~4e-3 against the float reference).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..granularity import PerChannel, PerGroup, PerTensor
from ..primitives import element_format
from .common import channel_scale

HALF = (torch.bfloat16, torch.float16)
INT4_GROUPS = (32, 64, 128, 256)


def available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(torch.ops.aten, "_weight_int8pack_mm")


@dataclass(frozen=True)
class PackedWeightOnly:
    """Kernel-layout weight plus its scales, in the activation dtype the kernel multiplies."""

    bits: int
    weight: torch.Tensor  # int4: torch's packed uint8 layout; int8: (out, in) int8
    scales: torch.Tensor  # int4: (groups, out, 2) scale/zero pairs; int8: (out,)
    group: int
    bias: torch.Tensor | None
    out_features: int


def unsupported_reason(layer, dtype: torch.dtype) -> str | None:  # noqa: ANN001 - a QuantLinear
    """Why `layer` cannot run weight-only with `dtype` activations (None when it can)."""
    wq, iq = layer.weight_quantizer, layer.input_quantizer
    if iq is not None or wq is None:
        return "weight-only kernels need weight quantization without input quantization"
    if not hasattr(layer, "in_features"):
        return "weight-only kernels cover linear layers only"
    if dtype not in HALF:
        return f"weight-only kernels multiply bf16/fp16 activations, the input is {str(dtype).removeprefix('torch.')}"
    if not available():
        return "this torch build lacks the CPU weight-only kernels"
    spec = wq.spec
    if spec.format in ("int4", "uint4"):
        g = spec.gran
        if not (isinstance(g, PerGroup) and g.size in INT4_GROUPS and layer.in_features % g.size == 0):
            return f"int4 weight-only needs groups of {INT4_GROUPS} dividing in_features, not {spec.granularity}"
        if layer.out_features % 32 or layer.in_features % 2:
            return "int4 weight-only needs out_features % 32 == 0 and an even in_features"
        return None
    if spec.format == "int8" and spec.symmetric and isinstance(spec.gran, (PerChannel, PerTensor)):
        return None
    return f"no weight-only kernel for {spec.short()} weights (int4 groups or int8 per channel)"


def prepare(layer, dtype: torch.dtype) -> PackedWeightOnly:  # noqa: ANN001
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


def gives_codes(packed: PackedWeightOnly) -> bool:
    """int8 always; int4 when out_features fills whole 64-row blocks of a layout this torch matches."""
    return packed.bits == 8 or (packed.out_features % INT4_BLOCK_N == 0 and int4_unpack_exact())


def packed_codes(layer, packed: PackedWeightOnly) -> torch.Tensor:  # noqa: ANN001 - a QuantLinear
    """The layer's weight codes (out, in) as int8 grid values, read back from `packed`."""
    if not gives_codes(packed):
        raise ValueError(f"the int4 weight-only layout cannot give {layer.qname}'s codes back")
    if packed.bits == 8:
        return packed.weight
    low = element_format(layer.weight_quantizer.spec.fmt, layer.weight_quantizer.spec.symmetric).min_value
    return unpack_int4(packed.weight, packed.out_features, layer.in_features).to(torch.int8) + int(low)


def linear(x: torch.Tensor, packed: PackedWeightOnly) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if packed.bits == 8:
        y = torch.ops.aten._weight_int8pack_mm(x2, packed.weight, packed.scales)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed.weight, packed.group, packed.scales)
    if packed.bias is not None:
        y = y + packed.bias
    return y.reshape(*x.shape[:-1], packed.out_features)
