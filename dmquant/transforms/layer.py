"""What the transforms did to one quantized layer, kept on the layer so a saved model re-creates it.

With input scale s, input rotation Q and output records (t, P) the layer computes in a transformed
space, x_layer = (x / s) Q and y_layer = (y / t) P, its weight already holding the inverse. Only the
*online* parts run in `forward` (smoothing not folded into the previous op, rotations not folded into
the previous layer); folded parts and output records stay as data: a LoRA merge needs them to map an
adapter into the layer's space, and the plan names them so loading rebuilds the same buffers.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import orthogonal as rot
from ..memory import reclaim_file_pages
from ..nn.qmodule import QuantModule


class LayerTransform(nn.Module):
    """Smoothing scale and rotation of a layer's input (applied online unless folded upstream), plus
    the scale and rotation a downstream fold left on its output."""

    def __init__(self, in_features: int, out_features: int, axis: int, smooth: str | None = None,
                 output_scale: bool = False, rotation: str | None = None, output_rotation: str | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.axis = in_features, axis
        self.smooth = smooth  # None | "online" (x / s here) | "folded" (the previous op divides)
        self.rotation = rotation  # None | "hadamard" | "random" | "kron" (online) | "folded:hadamard:<block>"
        self.output_rotation = output_rotation  # None | "hadamard:<block>" folded for the next layer
        kw: dict[str, Any] = dict(device=device, dtype=dtype)
        self.register_buffer("in_scale", torch.ones(in_features, **kw) if smooth else None)
        self.register_buffer("out_scale", torch.ones(out_features, **kw) if output_scale else None)
        # Hadamards are rebuilt from their name; random matrices (n x n) and kron's small factor are stored
        side = {"random": in_features, "kron": in_features // rot.hadamard_block(in_features)}.get(rotation)
        self.register_buffer("matrix", torch.empty(side, side, **kw) if side else None)
        self._hadamards: dict[tuple, torch.Tensor] = {}

    # -- recording (by the transform steps) ---------------------------------------------------------
    def set_smoothing(self, s: torch.Tensor, folded: bool) -> None:
        self.in_scale, self.smooth = s, "folded" if folded else "online"

    def scale_outputs(self, t: torch.Tensor) -> None:
        self.out_scale = t if self.out_scale is None else self.out_scale * t

    def set_rotation(self, spec: str, matrix: torch.Tensor | None = None) -> None:
        rot.parse(spec)
        self.rotation, self.matrix = spec, matrix

    def is_identity(self) -> bool:
        return not (self.smooth or self.rotation or self.output_rotation) and self.out_scale is None

    def plan_fields(self) -> dict[str, Any]:
        return dict(smooth=self.smooth, output_scale=self.out_scale is not None, rotation=self.rotation,
                    output_rotation=self.output_rotation)

    # -- use --------------------------------------------------------------------------------------
    def _matrix(self, spec: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        kind, block = rot.parse(spec)
        if kind == "random":
            return self.matrix.to(dtype=dtype, device=device)
        key = (block or rot.hadamard_block(n), dtype, device)
        if key not in self._hadamards:
            self._hadamards[key] = rot.hadamard(key[0], dtype).to(device)
        return self._hadamards[key]

    def _rotate(self, x: torch.Tensor, spec: str, n: int) -> torch.Tensor:
        """x @ Q for the rotation `spec` of an n-wide space (block Hadamard, random, or kron)."""
        h = self._matrix(spec, n, x.dtype, x.device)
        if rot.parse(spec)[0] == "kron":
            return rot.kron_rotate(x, self.matrix.to(dtype=x.dtype, device=x.device), h)
        return rot.rotate(x, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The online part: x -> (x / s) Q, before the layer's input quantizer."""
        if self.smooth == "online":
            shape = [1] * x.dim()
            shape[self.axis] = -1
            x = x / self.in_scale.reshape(shape)
        if self.rotation in rot.KINDS:
            x = self._rotate(x, self.rotation, self.in_features)
        return x

    def adapter_factors(self, down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LoRA factors acting on the original x and y, mapped into the layer's space (float64):
        x A^T = x_layer ((A s) Q)^T and y_layer = (y / t) P, so A' = (A s) Q and B' = P^T (B / t)."""
        down, up = down.double(), up.double()
        if self.in_scale is not None:
            down = down * self.in_scale.double().reshape(1, -1, *[1] * (down.dim() - 2))
        if self.rotation is not None:
            down = self._rotate(down, self.rotation, self.in_features)
        if self.out_scale is not None:
            up = up / self.out_scale.double().reshape(-1, *[1] * (up.dim() - 1))
        if self.output_rotation is not None:
            p = self._matrix(self.output_rotation, up.shape[0], torch.float64, up.device)
            up = rot.rotate(up.movedim(0, -1), p).movedim(-1, 0)
        return down, up

    def extra_repr(self) -> str:
        parts = [f"smooth={self.smooth}"] if self.smooth else []
        parts += [f"rotation={self.rotation}"] if self.rotation else []
        parts += ["output_scale"] if self.out_scale is not None else []
        return ", ".join(parts + ([f"output_rotation={self.output_rotation}"] if self.output_rotation else []))


# -- helpers the steps share ------------------------------------------------------------------------
def quantized_layers(modules: list[nn.Module]) -> list[tuple[nn.Module, str, QuantModule]]:
    """(component, name, layer) of every quantized layer of the components, in module order."""
    found = []
    for module in modules:
        plan = getattr(getattr(module, "dmquant_state", None), "plan", None)
        for name, layer in module.named_modules():
            if isinstance(layer, QuantModule) and (plan is None or name in plan):
                found.append((module, name, layer))
    return found


def transform_of(layer: nn.Module) -> LayerTransform:
    """The layer's transform record, created empty on first use."""
    if layer.transform is None:
        w = layer.weight
        layer.transform = LayerTransform(w.shape[1], w.shape[0], layer.INPUT_AXIS, device=w.device, dtype=w.dtype)
    return layer.transform


def replace_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Give the weight Parameter new data: a new tensor (quantized-weight caches key on it), never a
    write into the old one, which may lie in a checkpoint's memory map: its pages stay clean and go
    back to the OS (`dmquant.memory`)."""
    old = module.weight.data
    module.weight.data = weight.detach().to(old.device, old.dtype, copy=True).reshape(old.shape)
    reclaim_file_pages(old)


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """`replace_weight`, then re-fit the weight quantizer's scales to the new weight."""
    replace_weight(module, weight)
    wq = getattr(module, "weight_quantizer", None)
    if wq is not None:
        wq.init_from(module.weight.detach())
