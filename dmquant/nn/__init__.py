"""Quantized modules: layers, the tensor quantizer and attention quantization."""
from .qattention import AttentionQuantizers, QuantAttnProcessor, is_attention, keep_quantization, quantize_attention
from .qconv import QuantConv1d, QuantConv2d, QuantConv3d
from .qlinear import QuantLinear
from .qmodule import QuantModule
from .quantizer import TensorQuantizer
from .registry import QUANT_MODULES, quant_class_for
from .switch import quantization_disabled, set_quantization_enabled

__all__ = ["TensorQuantizer", "QuantModule", "QuantLinear", "QuantConv1d", "QuantConv2d", "QuantConv3d",
           "QUANT_MODULES", "quant_class_for", "AttentionQuantizers", "QuantAttnProcessor",
           "quantize_attention", "is_attention", "keep_quantization", "quantization_disabled",
           "set_quantization_enabled"]
