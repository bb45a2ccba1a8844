"""QuantConv1d/2d/3d: convolutions with quantized weight and input (channels on axis 1).

Weights are quantized on the (out, in/groups * kernel) view, so per-group scales run along the
flattened receptive field. Conv3d covers the patch embeddings and VAEs of video models.
"""
from __future__ import annotations

import torch
from torch import nn

from .qmodule import QuantModule


class _QuantConvNd(QuantModule):
    INPUT_AXIS = 1

    @classmethod
    def empty_like(cls, module: nn.modules.conv._ConvNd) -> "_QuantConvNd":
        return cls(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                   padding=module.padding, dilation=module.dilation, groups=module.groups,
                   bias=module.bias is not None, padding_mode=module.padding_mode, device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """An unbatched input (C, *S) runs as a batch of one, so axis 1 is its channels for the input
        quantizer and smoothing (per-pixel scales mean the same thing batched or not)."""
        if x.dim() == len(self.kernel_size) + 1:
            return super().forward(x.unsqueeze(0)).squeeze(0)
        return super().forward(x)

    def float_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, weight, self.bias)


class QuantConv1d(_QuantConvNd, nn.Conv1d):
    """Conv1d with quantized weight and input."""


class QuantConv2d(_QuantConvNd, nn.Conv2d):
    """Conv2d with quantized weight and input."""


class QuantConv3d(_QuantConvNd, nn.Conv3d):
    """Conv3d with quantized weight and input."""
