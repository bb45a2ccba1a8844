"""Channel balancing (SmoothQuant): migrate activation outliers into the weights, per input channel.

x W^T = (x / s)(W s)^T with s_j = max|x_j|^a / max|W_j|^(1-a): large activation channels shrink and
the matching weight columns grow, so both quantize with less error. The migration strength a is
searched per layer (or per fold group) on calibration inputs, minimising the relative output error of
the quantized layer, optionally with the next step's SVD branch in the loop (SVDQuant). s is folded
into the previous op where `folds` allows it (free at run time) and otherwise divides the input online.

Timestep-aware (ViDiT-Q's static-dynamic balancing): statistics are kept per noise-level bucket, the
static scale takes the mean over buckets of each bucket's channel absmax (no single timestep sets it)
and the search weighs every bucket equally; the time-varying rest is left to a rotation step after
this one (the "dynamic" part).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..memory import release_freed_memory
from ..nn.qmodule import QuantModule
from ..step_configs import SMOOTHING_ALPHAS
from .folds import Fold, smoothing_folds
from .layer import quantized_layers, set_weight, transform_of
from .lowrank import LowRankBranch, svd_split
from .stats import ActivationStats

log = logging.getLogger(__name__)

def smoothing_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|x_j|^alpha / max|W_j|^(1 - alpha) in float64; 1 for dead channels, clamped to 1e+-4."""
    a, w = act_absmax.double(), weight_absmax.double()
    s = a.clamp_min(1e-8) ** alpha / w.clamp_min(1e-8) ** (1 - alpha)
    return torch.where((a > 0) & (w > 0), s, torch.ones_like(s)).clamp(1e-4, 1e4)


def weight_absmax(weight: torch.Tensor) -> torch.Tensor:
    """max |W[:, j]| per input channel j (over outputs and kernel positions)."""
    return weight.detach().transpose(0, 1).reshape(weight.shape[1], -1).abs().amax(1)


def scale_columns(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """W s in float64 (a new tensor; scaled in place of the one float64 copy)."""
    return weight.detach().to(torch.float64, copy=True).mul_(s.reshape(1, -1, *[1] * (weight.dim() - 2)))


@dataclass
class _Group:
    """Layers sharing one smoothing scale: the consumers of a fold, or one layer smoothed online."""

    module: nn.Module
    consumers: tuple[str, ...]
    fold: Fold | None = None


def _check_order(name: str, layer: QuantModule) -> None:
    if layer.transform is not None or layer.lowrank is not None:
        raise ValueError(f"{name} is already rotated, smoothed or has a low-rank branch: "
                         "run smoothquant first (before rotate and svd)")
    if layer.input_quantizer.calibrated:  # its static scale was measured on the untransformed input
        raise ValueError(f"{name} has calibrated input scales already: run smoothquant / rotate before "
                         "ranges, temporal or any step that calibrates activations")


def _groups(module: nn.Module, fold: bool) -> list[_Group]:
    layers = {n: m for _, n, m in quantized_layers([module])
              if m.input_quantizer is not None and m.weight_quantizer is not None and getattr(m, "groups", 1) == 1}
    for name, layer in layers.items():
        _check_order(name, layer)
    groups, taken = [], set()
    for f in smoothing_folds(module) if fold else ():
        target = f.target(module)
        free = all(m.transform is None and m.lowrank is None and getattr(m, "groups", 1) == 1
                   for m in map(module.get_submodule, f.consumers) if isinstance(m, QuantModule))
        target_ok = not isinstance(target, QuantModule) or (target.lowrank is None and (
            target.transform is None or target.transform.output_rotation is None))
        if free and target_ok and any(c in layers for c in f.consumers) and not taken & set(f.consumers):
            groups.append(_Group(module, f.consumers, f))
            taken |= set(f.consumers)
    return groups + [_Group(module, (n,)) for n in layers if n not in taken]


def apply_smoothquant(modules: list[nn.Module], run: Callable[[], Any],
                      alpha: float | Sequence[float] = SMOOTHING_ALPHAS,
                      fold: bool = True, timestep_aware: bool = False, buckets: int = 4, samples: int = 256,
                      rank: int = 0) -> dict[str, float | None]:
    """Smooth every weight- and input-quantized layer; returns the chosen alpha per group (None: left
    unsmoothed because that quantized best).

    `alpha`: one value, or candidates searched per group. `rank` > 0 evaluates each candidate with an
    SVD branch of that rank (as the svd step will add). `samples` bounds the rows kept per layer."""
    alphas = [float(alpha)] if isinstance(alpha, (int, float)) else [float(a) for a in alpha]
    groups = [g for m in modules for g in _groups(m, fold)]
    keyed = {(id(g.module), c): g.module.get_submodule(c) for g in groups for c in g.consumers}
    layers = {f"{i}:{c}": m for i, ((_, c), m) in enumerate(keyed.items()) if isinstance(m, QuantModule)}
    names = {id(m): k for k, m in layers.items()}
    with ActivationStats(layers, samples, buckets if timestep_aware else 1) as stats, torch.no_grad():
        run()  # timestep-aware: quantize() has attached the noise-level hook to the denoiser
    chosen = {}
    with torch.no_grad():
        for g in groups:
            label = f"{g.fold.prev}->{','.join(g.consumers)}" if g.fold else g.consumers[0]
            mods = {c: g.module.get_submodule(c) for c in g.consumers}
            seen = {c: names[id(m)] for c, m in mods.items() if id(m) in names and stats.absmax[names[id(m)]]}
            if not seen:
                log.warning("smoothquant: %s saw no calibration data; left unsmoothed", label)
                continue
            best_alpha, s = _search(mods, seen, stats, alphas, rank)
            if best_alpha is not None:
                _apply(g, mods, s)
            chosen[label] = best_alpha
            for k in seen.values():  # each layer is in one group: its samples are done with
                stats.release(k)
            release_freed_memory()  # the search's float64 trial weights, before the next group's
    return chosen


def _search(mods: dict[str, nn.Module], seen: dict[str, str], stats: ActivationStats, alphas: list[float],
            rank: int) -> tuple[float | None, torch.Tensor]:
    """The alpha (and its s) with the least mean relative output error over layers and noise buckets;
    when searching, "no smoothing" (alpha None, s = 1) is a candidate too, so a layer never gets worse."""
    act = torch.stack([torch.stack(list(stats.absmax[k].values())).mean(0) for k in seen.values()]).amax(0)
    w_max = torch.stack([weight_absmax(m.weight) for m in mods.values()]).amax(0)
    originals = {c: m.weight.detach().clone() for c, m in mods.items()}
    refs = {c: {b: mods[c].float_forward(x, originals[c]) for b, x in stats.sample(k).items()}
            for c, k in seen.items()}
    candidates = [(a, smoothing_factors(act, w_max, a)) for a in alphas]
    if len(alphas) > 1:
        candidates.append((None, torch.ones_like(act, dtype=torch.float64)))
    losses: dict[float | None, float] = {}
    for a, s in candidates:
        errors = []
        for c, k in seen.items():
            layer = mods[c]
            _smooth_layer(layer, originals[c], s, rank)
            for b, x in stats.sample(k).items():
                ref = refs[c][b]
                errors.append(float((layer(x) - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30)))
            layer.lowrank = None
        losses[a] = sum(errors) / len(errors)
    best = min(losses, key=losses.__getitem__)  # the first of equal errors, in candidate order
    if log.isEnabledFor(logging.DEBUG):  # how decisive the choice was: float rounding settles near-ties
        log.debug("smoothquant: %s: %s", ",".join(mods), ", ".join(f"{a}: {v:.6g}" for a, v in losses.items()))
    for c, m in mods.items():  # back to the unsmoothed state; _apply commits the winner
        set_weight(m, originals[c])
        if isinstance(m, QuantModule) and m.transform is not None:
            m.transform.in_scale, m.transform.smooth = None, None
            if m.transform.is_identity():
                m.transform = None
    return best, dict(candidates)[best]


def _smooth_layer(layer: QuantModule, weight: torch.Tensor, s: torch.Tensor, rank: int) -> None:
    """Candidate state for the search: W s (minus its SVD part when rank > 0), input divided online."""
    ws = scale_columns(weight, s)
    transform_of(layer).set_smoothing(s.to(weight), folded=False)
    if rank > 0:
        split = svd_split(ws.reshape(ws.shape[0], -1), rank, weight.dtype, overwrite=True)
        layer.lowrank = LowRankBranch.build(layer, split.down, split.up, split.rank)
        ws = split.residual.reshape(ws.shape)
    set_weight(layer, ws)


def _apply(g: _Group, mods: dict[str, nn.Module], s: torch.Tensor) -> None:
    for m in mods.values():
        set_weight(m, scale_columns(m.weight, s))
        if isinstance(m, QuantModule):
            transform_of(m).set_smoothing(s.to(m.weight), folded=g.fold is not None)
    if g.fold is not None:
        g.fold.divide(g.module, s)
