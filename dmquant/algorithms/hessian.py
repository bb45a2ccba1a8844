"""The stateful shell around GPTQ: hooks accumulate each layer's input Hessian H = 2/n sum x x^T
during one calibration run, then every quantized layer's weight is replaced by its GPTQ solution."""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..nn.qconv import _QuantConvNd
from ..nn.qmodule import QuantModule
from .gptq import gptq

log = logging.getLogger(__name__)


def _input_rows(layer: QuantModule, x: torch.Tensor) -> torch.Tensor:
    """Rows whose outer products form H, in the column order of the weight's 2-D view."""
    if isinstance(layer, _QuantConvNd):
        if x.dim() != 4:  # Conv1d/3d: fold extra dims into a 2-D unfold where possible
            raise NotImplementedError("GPTQ Hessians are implemented for Conv2d and Linear")
        cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


class HessianCollector:
    """Context manager: forward hooks add 2 x x^T / n to a float64 Hessian per layer."""

    def __init__(self, layers: dict[str, QuantModule]) -> None:
        self.layers = layers
        self.hessians: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._handles: list[Any] = []

    def _hook(self, name: str) -> Callable:
        def hook(module: QuantModule, args: tuple, _out: Any) -> None:
            x = args[0].detach()
            if module.transform is not None:  # smoothing / rotation: the weight multiplies the transformed input
                x = module.transform(x)
            rows = _input_rows(module, x).double()
            n_old, n_new = self.counts.get(name, 0), rows.shape[0]
            h = self.hessians.get(name)
            h = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64) if h is None else h
            h.mul_(n_old / (n_old + n_new)).add_(rows.T @ rows, alpha=2 / (n_old + n_new))
            self.hessians[name], self.counts[name] = h, n_old + n_new

        return hook

    def __enter__(self) -> "HessianCollector":
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()


def weight_layers(modules: list[nn.Module]) -> dict[str, QuantModule]:
    """Every weight-quantized Linear/Conv2d of `modules`, keyed "<component index>.<name>"."""
    return {f"{i}.{n}": m for i, mod in enumerate(modules) for n, m in mod.named_modules()
            if isinstance(m, QuantModule) and m.weight_quantizer is not None
            and (not isinstance(m, _QuantConvNd) or m.weight.dim() == 4)}


def apply_gptq(modules: list[nn.Module], run: Callable[[], Any], block_size: int = 128, damp: float = 0.01,
               act_order: bool = False) -> dict[str, float]:
    """GPTQ every weight-quantized Linear/Conv2d in `modules`; `run()` feeds calibration data.
    Returns the GPTQ objective per layer."""
    layers = weight_layers(modules)
    with HessianCollector(layers) as hc, torch.no_grad():
        run()
    losses = {}
    for name, layer in tqdm(layers.items(), desc="gptq", unit="layer", disable=None):
        if name not in hc.hessians:
            log.warning("GPTQ: layer %s saw no calibration data; keeping round-to-nearest", name)
            continue
        w2d = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        result = gptq(w2d, hc.hessians[name], layer.weight_quantizer.spec, block_size, damp, act_order)
        with torch.no_grad():
            layer.weight.copy_(result.weight.reshape(layer.weight.shape))
        layer.weight_quantizer.set_qparams(result.qparams)
        losses[name] = result.loss
    return losses
