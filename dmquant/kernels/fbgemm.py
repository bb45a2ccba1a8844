"""CPU W8A8 through fbgemm's quantized linear ops, called directly (no torch.ao modules).

Measured on this project's 2-core AVX2 machine (4096x4096, 256 tokens): fp32 37-77 ms, fbgemm dynamic
int8 9-34 ms (2.3-4x faster), fbgemm static-scale int8 with fp32 output 12 ms (~4.6x). Other int8 CPU
paths (`torch._int_mm`, int8pack) are 25-50x slower, so this is the only CPU kernel dmquant uses.

Numerics. Weights: the layer's symmetric int8 per-channel codes and scales, bit for bit. Activations:
- static scale s: fbgemm takes uint8 with zero point 128, which is exactly the symmetric int8 grid
  {-128..127} * s, so outputs match the fake-quant reference up to float accumulation order;
- dynamic: fbgemm picks one asymmetric uint8 range per call (per tensor, not per token), with
  `reduce_range` (7-bit activations) so AVX2's u8*s8 pair sums cannot saturate int16. That is coarser
  than a per-token fake-quant recipe; `scripts/benchmark_kernels.py` reports the error.
Convolutions stay on the fake path: `quantized.conv2d` needs a calibrated *output* scale and
`conv2d_dynamic` returned wrong results (relative error 0.86) on torch 2.14 here.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

from ..formats import IntFormat
from ..granularity import PerChannel, PerTensor

NAME = "fbgemm"


def available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def unsupported_reason(layer: Any) -> str | None:
    """Why `layer` cannot run on this kernel (None when it can)."""
    from ..nn.qlinear import QuantLinear

    wq, iq = layer.weight_quantizer, layer.input_quantizer
    if not isinstance(layer, QuantLinear):
        return "only Linear layers run on fbgemm here"
    if wq is None or not (isinstance(wq.spec.fmt, IntFormat) and wq.spec.bits == 8 and wq.spec.symmetric
                          and isinstance(wq.spec.gran, (PerChannel, PerTensor))):
        return "weights must be symmetric int8 per channel or per tensor"
    if iq is None or not (isinstance(iq.spec.fmt, IntFormat) and iq.spec.bits == 8 and iq.spec.symmetric):
        return "activations must be symmetric int8"
    if not available():
        return "this torch build has no fbgemm engine"
    return None


def prepare(layer: Any) -> Any:
    """Prepack the layer's int8 codes and per-channel scales (not serializable: rebuilt on demand)."""
    wq = layer.weight_quantizer
    codes = wq.codes(layer.weight.detach()).to(torch.int8)
    scale = wq.scale.reshape(-1).double().expand(codes.shape[0]).contiguous()
    with warnings.catch_warnings():  # quantized-tensor constructors warn of a future deprecation
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch._make_per_channel_quantized_tensor(
            codes, scale, torch.zeros(codes.shape[0], dtype=torch.long), 0)
    bias = None if layer.bias is None else layer.bias.detach().float()
    return torch.ops.quantized.linear_prepack(qweight, bias)


def run(layer: Any, packed: Any, x: torch.Tensor) -> torch.Tensor:
    iq = layer.input_quantizer
    shape, dtype = x.shape, x.dtype
    x2 = x.reshape(-1, shape[-1]).float().contiguous()
    if iq.spec.dynamic:
        y = torch.ops.quantized.linear_dynamic(x2, packed, True)
    else:
        s = float(iq.scale.reshape(()))
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x2, s, 128, packed)
    return y.reshape(*shape[:-1], y.shape[-1]).to(dtype)
