"""The stateful shell around GPTQ: hooks accumulate each layer's input Hessian H = 2/n sum x x^T
during a calibration run, then every quantized layer's weight is replaced by its GPTQ solution
(all layers from one run, or block after block on the already-quantized prefix: `sequential`)."""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..nn.qconv import _QuantConvNd
from ..nn.qmodule import QuantModule
from ..transforms.layer import replace_weight
from .gptq import gptq
from .hooks import hooked_run

log = logging.getLogger(__name__)


def conv_patches(layer: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """Receptive fields of a Conv1d/2d/3d as rows (positions, in * kernel), in the column order of the
    weight's (out, in * kernel) view: an unfold in any number of spatial dimensions."""
    nd = x.dim() - 2
    k, s, d = layer.kernel_size, layer.stride, layer.dilation
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
    else:
        pads: list[int] = []
        for i in reversed(range(nd)):  # F.pad takes the last dimension first
            if layer.padding == "valid":
                lo = hi = 0
            elif layer.padding == "same":
                total = d[i] * (k[i] - 1)
                lo, hi = total // 2, total - total // 2
            else:
                lo = hi = layer.padding[i]
            pads += [lo, hi]
        x = F.pad(x, pads)
    for i in range(nd):  # each spatial axis -> (positions, window), windows appended at the end
        x = x.unfold(2 + i, d[i] * (k[i] - 1) + 1, s[i])[..., :: d[i]]
    # (N, C, *positions, *kernel) -> (N * positions, C * kernel)
    perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    return x.permute(perm).reshape(-1, x.shape[1] * int(torch.tensor(k).prod()))


def _input_rows(layer: QuantModule, x: torch.Tensor) -> torch.Tensor:
    """Rows whose outer products form H, in the column order of the weight's 2-D view."""
    if isinstance(layer, _QuantConvNd):
        return conv_patches(layer, x)
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
    """Every weight-quantized Linear/Conv1d/2d/3d of `modules`, keyed "<component index>.<name>".
    Grouped convolutions are left out (their Hessian is one per group): they keep round-to-nearest."""
    layers = {}
    for i, mod in enumerate(modules):
        for n, m in mod.named_modules():
            if not isinstance(m, QuantModule) or m.weight_quantizer is None:
                continue
            if isinstance(m, _QuantConvNd) and m.groups > 1:
                log.warning("%s: grouped convolution (groups=%d) keeps round-to-nearest: Hessian-based steps "
                            "need one input Hessian per layer", n, m.groups)
                continue
            layers[f"{i}.{n}"] = m
    return layers


def stage_of(name: str) -> str:
    """The block a layer belongs to: up to the first numeric index ("0.transformer_blocks.3.attn1.to_q"
    -> "0.transformer_blocks.3", "0.down_blocks.1.resnets.0.conv1" -> "0.down_blocks.1"), else itself."""
    parts = name.split(".")
    for j in range(2, len(parts)):
        if parts[j].isdigit():
            return ".".join(parts[: j + 1])
    return name


def _call_order(layers: dict[str, QuantModule], run: Callable[[], Any]) -> list[str]:
    order: list[str] = []
    seen: set[str] = set()

    def make(name: str) -> Callable:
        def hook(*_: Any) -> None:
            if name not in seen:
                seen.add(name)
                order.append(name)
        return hook

    hooked_run(run, [(m, make(n)) for n, m in layers.items()])  # leaf layers finish in the order they start
    return order


def _gptq_layers(layers: dict[str, QuantModule], hessians: dict[str, torch.Tensor], block_size: int,
                 damp: float, act_order: bool, losses: dict[str, float]) -> None:
    for name, layer in layers.items():
        if name not in hessians:
            log.warning("GPTQ: layer %s saw no calibration data; keeping round-to-nearest", name)
            continue
        w2d = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        result = gptq(w2d, hessians[name], layer.weight_quantizer.spec, block_size, damp, act_order)
        replace_weight(layer, result.weight)
        layer.weight_quantizer.set_qparams(result.qparams)
        losses[name] = result.loss


def apply_gptq(modules: list[nn.Module], run: Callable[[], Any], block_size: int = 128, damp: float = 0.01,
               act_order: bool = False, sequential: bool = False) -> dict[str, float]:
    """GPTQ every weight-quantized Linear/Conv in `modules`; `run()` feeds calibration data.

    `sequential`: blocks (`stage_of`) are solved in the order the forward reaches them, each on
    Hessians collected with every earlier block already quantized, so a block corrects the error its
    inputs really carry (one calibration run per block instead of one in all).
    Returns the GPTQ objective per layer."""
    layers = weight_layers(modules)
    losses: dict[str, float] = {}
    if not sequential:
        with HessianCollector(layers) as hc, torch.no_grad():
            run()
        _gptq_layers(dict(tqdm(layers.items(), desc="gptq", unit="layer", disable=None)), hc.hessians,
                     block_size, damp, act_order, losses)
        return losses
    order = _call_order(layers, run)
    stages: dict[str, list[str]] = {}
    for name in order + [n for n in layers if n not in order]:  # never-called layers last (they warn)
        stages.setdefault(stage_of(name), []).append(name)
    for names in tqdm(stages.values(), desc="gptq (sequential)", unit="block", disable=None):
        part = {n: layers[n] for n in names}
        with HessianCollector(part) as hc, torch.no_grad():
            run()
        _gptq_layers(part, hc.hessians, block_size, damp, act_order, losses)
    return losses
