"""Trainable low-rank weight deltas served to quantized layers while they fine-tune, then folded away.

A `LowRankDelta` is up @ down, reshaped to the layer's weight. Two placements share it:
  * inside the quantizer (QALoRA, EfficientDM): the layer computes with Q(W + delta), so the adapter is
    trained through the STE exactly as it will be stored; `merge_adapters` writes W + delta into the
    float weight and the layer then quantizes it to the very same codes (bit-for-bit: same tensors, same
    ops, unchanged scales), leaving no module behind;
  * beside it (QVGen's auxiliary branch): Q(W + lora) + aux, the aux acting on the quantized input in high
    precision; it must be decayed to rank 0 before the end (`dmquant.finetune.qvgen`).
The float Parameter is not touched until the merge, so the same modules under `quantization_disabled`
are the full-precision teacher throughout training (the layers are served their weights, see
`QuantModule.serve`).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..nn.qmodule import QuantModule
from ..nn.switch import serving


class LowRankDelta(nn.Module):
    """delta = unit * (up @ down) with up (out, r), down (r, in * kernel); up starts at zero (delta = 0).

    `unit` makes the optimisation scale-aware (EfficientDM): the product is counted in steps of the
    layer's weight quantization grid (the per-row step size, detached), because an update below half a
    step rounds away; one learning rate then moves coarse and fine layers alike. `mask` switches ranks
    off (QVGen's rank decay) without changing parameter shapes, so optimizer state and checkpoints keep
    their layout."""

    def __init__(self, layer: QuantModule, rank: int, unit: torch.Tensor, generator: torch.Generator) -> None:
        super().__init__()
        w = layer.weight
        fan_in = w[0].numel()
        bound = 1 / math.sqrt(fan_in)  # kaiming-uniform(a=sqrt(5)) bound, as peft initialises lora_A
        down = (torch.rand(rank, fan_in, generator=generator) * 2 - 1) * bound
        self.down = nn.Parameter(down.to(w.device))
        self.up = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device))
        self.register_buffer("unit", unit.detach().float().reshape(-1, 1).to(w.device))
        self.register_buffer("mask", torch.ones(rank, device=w.device))
        self.shape = w.shape

    @property
    def rank(self) -> int:
        return int(self.mask.sum())

    def forward(self) -> torch.Tensor:
        return (self.unit * ((self.up * self.mask) @ self.down)).reshape(self.shape)


def grid_step(layer: QuantModule) -> torch.Tensor:
    """Per-output-row weight quantization step (mean over a row's groups or blocks), for `unit`."""
    step = layer.weight_quantizer.qparams.effective_scale().detach().float().mean(1)
    rows = layer.weight.shape[0]
    return step if step.numel() == rows else step.expand(rows)  # per tensor: one step for every row


@dataclass
class LayerAdapters:
    """What one layer trains: a LoRA inside its weight quantizer and/or an auxiliary branch beside it."""

    layer: QuantModule
    lora: LowRankDelta | None = None
    aux: LowRankDelta | None = None

    def merged_weight(self) -> torch.Tensor:
        """W + lora in the weight's dtype: what the quantizer sees now and what the merge stores."""
        w = self.layer.weight
        return w if self.lora is None else w + self.lora().to(w.dtype)

    def served(self) -> torch.Tensor:
        out = self.layer.weight_quantizer(self.merged_weight())
        return out if self.aux is None or self.aux.rank == 0 else out + self.aux().to(out.dtype)


def make_adapters(layers: dict[str, QuantModule], rank: int, aux_rank: int = 0, seed: int = 0,
                  scale_aware: bool = True) -> dict[str, LayerAdapters]:
    """Adapters for the weight-quantized `layers` (LoRA of `rank` inside, aux of `aux_rank` beside)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, layer in layers.items():
        unit = grid_step(layer) if scale_aware else torch.ones(layer.weight.shape[0])
        lora = LowRankDelta(layer, rank, unit, gen) if rank > 0 else None
        aux = LowRankDelta(layer, aux_rank, unit, gen) if aux_rank > 0 else None
        out[name] = LayerAdapters(layer, lora, aux)
    return out


def adapter_parameters(adapters: dict[str, LayerAdapters]) -> dict[str, torch.Tensor]:
    """{name: tensor} of every adapter parameter and buffer (what training updates and checkpoints)."""
    found = {}
    for name, a in adapters.items():
        for kind, mod in (("lora", a.lora), ("aux", a.aux)):
            if mod is not None:
                found.update({f"{name}.{kind}.{k}": v for k, v in mod.named_parameters()})
    return found


def adapter_buffers(adapters: dict[str, LayerAdapters]) -> dict[str, torch.Tensor]:
    return {f"{n}.aux.mask": a.aux.mask for n, a in adapters.items() if a.aux is not None}


@contextlib.contextmanager
def serving_adapters(adapters: dict[str, LayerAdapters]) -> Iterator[None]:
    """Inside, each layer computes with its adapters; on exit (also on error) the layers are restored."""
    with serving([a.layer for a in adapters.values()]):
        for a in adapters.values():
            a.layer.serve(a.served)
        yield


@torch.no_grad()
def merge_adapters(adapters: dict[str, LayerAdapters]) -> None:
    """Fold every LoRA into its float weight (the weight scales stay those trained with); auxiliary
    branches must have decayed to rank 0 (they have no place in a plain quantized layer)."""
    live = [n for n, a in adapters.items() if a.aux is not None and a.aux.rank > 0]
    if live:
        raise RuntimeError(f"auxiliary branches still have rank > 0: {live[:3]}")
    for a in adapters.values():
        if a.lora is not None:
            a.layer.weight.copy_(a.merged_weight())
