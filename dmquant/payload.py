"""The stored form of a quantized weight: packed codes plus compactly encoded scales.

Codes are bit-packed at the format's width (the same bytes a packed layer holds in memory); MX scales
are stored as E8M0 bytes and NVFP4 block scales as e4m3 bytes (both exact), other scales as float32
(float16 where lossless), zero points as bytes. Loading hands the codes to the layer as they are, so a
loaded model computes exactly what the saved one did and never materialises a float weight.
"""
from __future__ import annotations

import math

import torch

from .config import QuantSpec
from .formats import BlockFormat, e8m0_decode, e8m0_encode, get_format
from .nn.qmodule import QuantModule
from .packing import pack, packed_nbytes
from .primitives import QParams, element_format

E4M3 = get_format("fp8_e4m3")


def _scale_codec(fmt) -> str:
    return fmt.scale_kind if isinstance(fmt, BlockFormat) else "float32"


def encode_weight(layer: QuantModule, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors that replace `{prefix}weight` and the weight quantizer's buffers in a state dict."""
    wq = layer.weight_quantizer
    spec, qp = wq.spec, wq.qparams
    if layer.is_packed:
        packed = layer.packed_codes()
    else:
        packed = pack(element_format(spec.fmt, spec.symmetric).encode(layer.weight_codes()), spec.bits)
    q = f"{prefix}weight_quantizer."
    out = {f"{prefix}weight.packed": packed}
    kind = _scale_codec(spec.fmt)
    if kind == "e8m0":
        out[q + "scale.e8m0"] = e8m0_encode(qp.scale)
    elif kind == "fp8_e4m3":
        out[q + "scale.e4m3"] = E4M3.encode(qp.scale)
    else:
        out[q + "scale"] = _compact(qp.scale.float())
    if qp.zero_point is not None:
        out[q + "zero_point"] = qp.zero_point.to(torch.uint8)
    if qp.tensor_scale is not None:
        out[q + "tensor_scale"] = qp.tensor_scale.float()
    return out


def _compact(scale: torch.Tensor) -> torch.Tensor:
    """float16 when that is lossless (scales of half-precision models), else float32."""
    half = scale.half()
    return half if torch.equal(half.float(), scale) else scale


def decode_weight(spec: QuantSpec, prefix: str, state: dict[str, torch.Tensor], shape: list[int]) -> torch.Tensor:
    """Replace the layer's scales in `state` by float buffers and return its packed codes (checked)."""
    q = f"{prefix}weight_quantizer."
    if q + "scale.e8m0" in state:
        scale = e8m0_decode(state.pop(q + "scale.e8m0"))
    elif q + "scale.e4m3" in state:
        scale = E4M3.decode(state.pop(q + "scale.e4m3"))
    else:
        scale = state.pop(q + "scale").float()
    zero = state.pop(q + "zero_point", None)
    qp = QParams(scale, None if zero is None else zero.float(), state.get(q + "tensor_scale"))
    state[q + "scale"] = qp.scale
    if qp.zero_point is not None:
        state[q + "zero_point"] = qp.zero_point
    packed = state.pop(f"{prefix}weight.packed")
    expected = packed_nbytes(math.prod(shape), spec.bits)
    if packed.dtype != torch.uint8 or packed.numel() != expected:
        raise ValueError(f"corrupt checkpoint: {prefix}weight.packed has {packed.numel()} {packed.dtype} values, "
                         f"expected {expected} uint8 for {shape} at {spec.bits} bits")
    return packed


def extra_nbytes(layer: QuantModule) -> int:
    """Bytes the transforms add to a layer in high precision: its low-rank branch (SVD and LoRA ranks)
    and its stored smoothing scales or rotation matrix (dmquant.transforms)."""
    parts = [m for m in (layer.lowrank, layer.transform) if m is not None]
    return sum(t.numel() * t.element_size() for m in parts for t in (*m.parameters(), *m.buffers()))


def weight_nbytes(layer: QuantModule) -> int:
    """Bytes of the stored weight payload (codes + scales + `extra_nbytes`), without building it."""
    wq = layer.weight_quantizer
    numel = math.prod(layer.weight_shape)
    if layer.is_vq:  # codebook + packed indices
        return sum(t.numel() * t.element_size() for t in (layer.vq_codebook, layer.vq_packed)) + extra_nbytes(layer)
    if wq is None:
        return numel * layer.weight_dtype.itemsize + extra_nbytes(layer)
    qp = wq.qparams
    scale_bytes = 1 if _scale_codec(wq.spec.fmt) != "float32" else _compact(qp.scale.float()).element_size()
    n = packed_nbytes(numel, wq.spec.bits) + qp.scale.numel() * scale_bytes
    n += 0 if qp.zero_point is None else qp.zero_point.numel()
    return n + (0 if qp.tensor_scale is None else 4) + extra_nbytes(layer)
