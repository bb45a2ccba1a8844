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
from ..transforms.layer import replace_weight, transform_of


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


class SmoothingTwin(nn.Module):
    """A trainable per-input-channel scale e^v on top of a layer's input transform, active while
    quantization is on: the layer computes with x' = T(x) / e^v and its weight (and low-rank branch)
    times e^v, so the float product is unchanged while both quantizers see rebalanced ranges
    (SmoothQuant's migration, learned against the teacher as in OmniQuant's equivalent transformation).
    With quantization off it is the layer's own transform, so the teacher stays float. `merge` folds
    e^v into the layer's online smoothing scale (x / (s e^v)), which the saved plan records."""

    def __init__(self, layer: QuantModule) -> None:
        super().__init__()
        self.base = layer.transform
        self.axis = layer.INPUT_AXIS
        self.enabled = lambda: layer.weight_quantizer.enabled
        self.log_scale = nn.Parameter(torch.zeros(layer.weight.shape[1], device=layer.weight.device))

    def scale_columns(self, t: torch.Tensor) -> torch.Tensor:
        """t (a weight or branch down factor: input channels on dim 1) times e^v."""
        return t * self.log_scale.exp().to(t.dtype).reshape(1, -1, *[1] * (t.dim() - 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.base is not None:
            x = self.base(x)
        if not self.enabled():
            return x
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return x / self.log_scale.exp().to(x.dtype).reshape(shape)

    @torch.no_grad()
    def merge(self, layer: QuantModule) -> None:
        layer.transform = self.base
        t = transform_of(layer)
        factor = self.log_scale.exp().to(layer.weight.dtype)
        t.set_smoothing(factor if t.in_scale is None else t.in_scale * factor.to(t.in_scale.dtype), folded=False)


def smoothable(layer: QuantModule) -> bool:
    """A learned scale folds into the layer's own online smoothing: not behind a rotation (the scale
    would act on rotated channels) nor where the previous op divides (folded smoothing)."""
    t = layer.transform
    return t is None or (t.rotation is None and t.smooth != "folded")


class BranchTwin(nn.Module):
    """Copies of a layer's 16-bit low-rank branch (SVDQuant's L1 L2), used while quantization is on:
    trainable with `train`, and/or taking a learned smoothing scale on their down factor (the branch
    reads the smoothed input x' too). The same modules with quantization off keep the original branch
    and so stay the float teacher. `merge` copies the factors into the branch (same rank, shapes and
    dtype: the deployed model keeps its size and format, and computes what was trained)."""

    def __init__(self, layer: QuantModule, train: bool = True, smoothing: SmoothingTwin | None = None) -> None:
        super().__init__()
        self.base = layer.lowrank
        self.enabled = lambda: layer.weight_quantizer.enabled
        down, up = self.base.down.weight.detach(), self.base.up.weight.detach()
        self.down, self.up = (nn.Parameter(down.clone()), nn.Parameter(up.clone())) if train else (down, up)
        self.columns = smoothing.scale_columns if smoothing is not None else None  # not a submodule

    def _down(self) -> torch.Tensor:
        return self.down if self.columns is None else self.columns(self.down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled():
            return self.base(x)
        return torch.func.functional_call(self.base, {"down.weight": self._down(), "up.weight": self.up}, (x,))

    @torch.no_grad()
    def merge(self) -> None:
        down, up = self._down(), self.up.clone()  # computed before the copies: `down` may alias the base's
        self.base.down.weight.copy_(down)
        self.base.up.weight.copy_(up)


@dataclass
class LayerAdapters:
    """What one layer trains: a LoRA inside its weight quantizer, an auxiliary branch beside it, and/or
    the factors of its own low-rank branch."""

    layer: QuantModule
    lora: LowRankDelta | None = None
    aux: LowRankDelta | None = None
    branch: BranchTwin | None = None
    smoothing: SmoothingTwin | None = None

    def merged_weight(self) -> torch.Tensor:
        """(W + lora) e^v in the weight's dtype: what the quantizer sees now and what the merge stores."""
        w = self.layer.weight
        w = w if self.lora is None else w + self.lora().to(w.dtype)
        return w if self.smoothing is None else self.smoothing.scale_columns(w)

    def served(self) -> torch.Tensor:
        out = self.layer.weight_quantizer(self.merged_weight())
        return out if self.aux is None or self.aux.rank == 0 else out + self.aux().to(out.dtype)


def make_adapters(layers: dict[str, QuantModule], rank: int, aux_rank: int = 0, seed: int = 0,
                  scale_aware: bool = True, branch: bool = False, smooth: bool = False) -> dict[str, LayerAdapters]:
    """Adapters for the weight-quantized `layers` (LoRA of `rank` inside, aux of `aux_rank` beside; with
    `branch`, the factors of every existing low-rank branch train too; with `smooth`, a smoothing scale
    of every layer where one folds, see `smoothable`)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, layer in layers.items():
        unit = grid_step(layer) if scale_aware else torch.ones(layer.weight.shape[0])
        lora = LowRankDelta(layer, rank, unit, gen) if rank > 0 else None
        aux = LowRankDelta(layer, aux_rank, unit, gen) if aux_rank > 0 else None
        smoothing = SmoothingTwin(layer) if smooth and smoothable(layer) else None
        twin = BranchTwin(layer, branch, smoothing) \
            if layer.lowrank is not None and (branch or smoothing is not None) else None
        out[name] = LayerAdapters(layer, lora, aux, twin, smoothing)
    return out


def adapter_parameters(adapters: dict[str, LayerAdapters]) -> dict[str, torch.Tensor]:
    """{name: tensor} of every trainable adapter tensor (what training updates and checkpoints); the
    branch factors as `<layer>.branch.down` / `.up`."""
    found = {}
    for name, a in adapters.items():
        for kind, mod in (("lora", a.lora), ("aux", a.aux), ("branch", a.branch), ("smooth", a.smoothing)):
            if mod is not None:
                found.update({f"{name}.{kind}.{k}": v for k, v in mod.named_parameters()})
    return found


def adapter_buffers(adapters: dict[str, LayerAdapters]) -> dict[str, torch.Tensor]:
    return {f"{n}.aux.mask": a.aux.mask for n, a in adapters.items() if a.aux is not None}


@contextlib.contextmanager
def serving_adapters(adapters: dict[str, LayerAdapters]) -> Iterator[None]:
    """Inside, each layer computes with its adapters; on exit (also on error) the layers are restored."""
    twins = [a for a in adapters.values() if a.branch is not None]
    smoothed = [a for a in adapters.values() if a.smoothing is not None]
    with serving([a.layer for a in adapters.values()]):
        try:
            for a in adapters.values():
                a.layer.serve(a.served)
            for a in twins:
                a.layer.lowrank = a.branch
            for a in smoothed:
                a.layer.transform = a.smoothing
            yield
        finally:
            for a in twins:
                a.layer.lowrank = a.branch.base
            for a in smoothed:
                a.layer.transform = a.smoothing.base


@torch.no_grad()
def merge_adapters(adapters: dict[str, LayerAdapters]) -> None:
    """Fold every LoRA and learned smoothing scale into its float weight (the weight scales stay those
    trained with), every trained branch into its layer's branch, every smoothing scale into the layer's
    input transform; auxiliary branches must have decayed to rank 0 (they have
    no place in a plain quantized layer)."""
    live = [n for n, a in adapters.items() if a.aux is not None and a.aux.rank > 0]
    if live:
        raise RuntimeError(f"auxiliary branches still have rank > 0: {live[:3]}")
    for a in adapters.values():
        if a.lora is not None or a.smoothing is not None:
            replace_weight(a.layer, a.merged_weight())
        if a.branch is not None:
            a.branch.merge()
        if a.smoothing is not None:
            a.smoothing.merge(a.layer)
