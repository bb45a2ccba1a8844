"""BRECQ block reconstruction (Li et al. 2021) of AdaRound weights: the recipe step "adaround".

Units are blocks (the family's block patterns, outermost match wins); weight-quantized layers outside every block
are reconstructed one layer at a time (AdaRound's own setting) rather than left as RTN. In the order
units execute, for each: (1) run() with quantization disabled records its float inputs and outputs,
the targets; (2) run() quantized, earlier units already rounded, records its quantized inputs
(BRECQ's choice); (3) Adam on the AdaRound V of its layers (with `lsq`, also its static activation
scales) minimises MSE(unit_q(x_q), unit_fp(x_fp)) / mean(target^2) + weight * mean regulariser; the
relative MSE lets one `weight` serve blocks of very different output magnitude. Float weights stay
untouched until the end (decided layers are served their rounded weights), so float passes see the
float model and a failure leaves the model at RTN; then each weight becomes its rounded value, on its
grid with unchanged scales, so serialization packs exactly the chosen codes.

Activations: dynamic quantizers quantize; inside `dmquant.quantize` static ones pass data through
until they have scales, so a `ranges` step first makes BRECQ see them quantized (and `lsq` learn
them). Each captured call is a sample (`samples` keeps evenly spaced calls, bounding memory). run()
must repeat its inputs (the passes pair up call by call); each pass is a whole run(), since stopping
after the unit would drop a timestep loop's later calls.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..nn.qmodule import QuantModule
from ..nn.switch import quantization_disabled, serving
from ..observe import trainable_static_scales
from ..timestep import current_noise_level, noise_level
from ..transforms.layer import replace_weight
from .adaround import SoftRounding, annealed_beta, layer_rounding, pack_codes, rounded_weight
from .hooks import hooked_run, output_tensors
from .tiar import temporal_group
from .units import Unit, find_units

log = logging.getLogger(__name__)

@dataclass
class UnitResult:
    """One reconstructed block (or lone layer): output MSE vs float on the quantized inputs."""

    layers: tuple[str, ...]
    samples: int
    input_gap: float  # relative L2 distance of the quantized inputs from the float ones
    mse_rtn: float  # round-to-nearest weights
    mse: float  # the weights kept
    kept_rtn: bool  # the reconstruction did not beat RTN on the calibration data, so RTN stays


def _detached(obj: Any) -> Any:
    """Copies of the tensors in a call's args/kwargs (the model may reuse or modify its buffers)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detached(v) for v in obj)
    return {k: _detached(v) for k, v in obj.items()} if isinstance(obj, dict) else obj


@dataclass
class _Call:
    """A recorded call of a unit, with the noise level then (per-timestep scales read it on replay)."""

    args: tuple
    kwargs: dict
    level: float | None

    def replay(self, module: nn.Module) -> Any:
        with contextlib.nullcontext() if self.level is None else noise_level(self.level):
            return module(*self.args, **self.kwargs)


class _Capture:
    """Forward hook keeping the inputs, and the outputs if asked, of the calls numbered in `keep`."""

    def __init__(self, keep: set[int], outputs: bool) -> None:
        self.keep, self.want_outputs, self.calls = keep, outputs, 0
        self.inputs: list[_Call] = []
        self.outputs: list[list[torch.Tensor]] = []

    def __call__(self, _module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.calls in self.keep:
            self.inputs.append(_Call(_detached(args), _detached(kwargs), current_noise_level()))
            if self.want_outputs:
                self.outputs.append([t.detach().clone() for t in output_tensors(output)])
        self.calls += 1


def _sq_error(output: Any, target: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    pairs = zip(output_tensors(output), target, strict=True)
    return sum(((o.float() - t.float()) ** 2).sum() for o, t in pairs), sum(t.numel() for t in target)


def _input_gap(fp: list[_Call], q: list[_Call]) -> float:
    """Relative L2 distance of a unit's quantized inputs from its float ones (first tensor of each call)."""
    a, b = (torch.cat([output_tensors((c.args, c.kwargs))[0].double().flatten() for c in calls]) for calls in (fp, q))
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


@torch.no_grad()
def _mse(module: nn.Module, inputs: list[_Call], targets: list[list[torch.Tensor]]) -> float:
    errs = [_sq_error(call.replay(module), t) for call, t in zip(inputs, targets)]
    return float(sum(e for e, _ in errs) / sum(n for _, n in errs))


def _optimise(unit: Unit, rounding: list[SoftRounding], scales: list[torch.Tensor], inputs: list[_Call],
              targets: list[list[torch.Tensor]], *, iters: int, lr: float, batch_size: int, weight: float,
              beta: tuple[float, float], warmup: float, lsq_lr: float, seed: int) -> None:
    # Adam steps are about lr in absolute terms: each scale's lr follows its size (lsq_lr is relative).
    groups = [{"params": [t], "lr": lsq_lr * float(t.detach().abs().mean())} for t in scales]
    opt = torch.optim.Adam([{"params": [r.v for r in rounding], "lr": lr}, *groups])
    flat = [t for ts in targets for t in ts]
    norm = max(sum(float(t.double().pow(2).sum()) for t in flat) / sum(t.numel() for t in flat), 1e-30)
    gen = torch.Generator().manual_seed(seed)
    for step in tqdm(range(iters), desc=unit.name, unit="it", leave=False, disable=None):
        opt.zero_grad(set_to_none=True)
        batch = torch.randperm(len(inputs), generator=gen)[:batch_size].tolist()
        for i in batch:  # one backward per call: the memory of a single sample's graph
            err, count = _sq_error(inputs[i].replay(unit.module), targets[i])
            (err / (count * norm * len(batch))).backward()
        b = annealed_beta(step, iters, warmup, beta)
        if b is not None:
            (weight * sum(r.regularizer(b) for r in rounding) / sum(r.v.numel() for r in rounding)).backward()
        opt.step()
        with torch.no_grad():
            for t in scales:  # LSQ steps may not cross zero
                t.clamp_(min=torch.finfo(t.dtype).tiny)


def _reconstruct(unit: Unit, inputs: list[_Call], targets: list[list[torch.Tensor]], gap: float, lsq: bool,
                 optimise: Callable[..., None]) -> tuple[UnitResult, dict[QuantModule, torch.Tensor]]:
    """Optimise one unit (in eval mode, its own parameters frozen); returns its result and the
    uint8 codes to keep per layer, the unit's layers left serving them."""
    module, layers = unit.module, list(unit.layers.values())
    scales = trainable_static_scales(module, "adaround") if lsq else []
    initial = [t.detach().clone() for t in scales]
    flags = [(p, p.requires_grad) for p in module.parameters()]
    was_training = module.training
    module.eval()
    try:
        mse_rtn = _mse(module, inputs, targets)
        rounding = [layer_rounding(layer) for layer in layers]
        for layer, r in zip(layers, rounding):
            layer.serve(lambda layer=layer, r=r: r.soft().to(layer.weight.dtype).reshape(layer.weight.shape))
        module.requires_grad_(False)
        with torch.enable_grad():
            optimise(unit, rounding, scales, inputs, targets)
        codes = {layer: pack_codes(layer, r.codes()) for layer, r in zip(layers, rounding)}
        for layer, c in codes.items():
            layer.serve(lambda layer=layer, c=c: rounded_weight(layer, c))
        mse = _mse(module, inputs, targets)
        kept_rtn = mse > mse_rtn
        if kept_rtn:  # keep RTN (and the initial scales): never worse on the calibration data
            codes = {layer: pack_codes(layer, layer.weight_quantizer.codes(layer.weight.detach())) for layer in layers}
            for layer, c in codes.items():
                layer.serve(lambda layer=layer, c=c: rounded_weight(layer, c))
            with torch.no_grad():
                for t, t0 in zip(scales, initial):
                    t.copy_(t0)
    finally:
        for t in scales:
            t.requires_grad_(False)
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(was_training)
    return UnitResult(tuple(unit.layers), len(inputs), gap, mse_rtn, min(mse, mse_rtn), kept_rtn), codes


def apply_block_reconstruction(modules: list[nn.Module], run: Callable[[], Any], blocks: Sequence[str] | None = None,
                               iters: int = 1000, lr: float = 1e-2, batch_size: int = 4, weight: float = 0.1,
                               beta: Sequence[float] = (20.0, 2.0), warmup: float = 0.2, lsq: bool = False,
                               lsq_lr: float = 1e-3, skip: str | None = None, samples: int | None = None,
                               seed: int = 0, temporal: str | None = None) -> dict[str, UnitResult]:
    """AdaRound every weight-quantized layer of `modules`, block by block (BRECQ); `run()` feeds the
    calibration data. `blocks`: regexes of block names (default: the family's, `families.blocks_for`);
    `skip`: regex of layer names kept at round-to-nearest; `samples`: cap on captured calls per unit; `weight`, `beta`
    (start, end) and `warmup` (fraction of iters): AdaRound's regulariser and its schedule; `lsq`:
    also learn the unit's static activation scales (calibrated already), `lsq_lr` relative to each.
    `temporal`: regex of the denoiser's temporal layers (e.g. role:temporal), rounded first and together
    on their features at every visited timestep (TFMQ-DM's TIAR, `tiar.py`) and left out of the blocks.

    >>> dmquant.quantize(pipe, "adaround-w4a8", calibration=prompts)  # replays one recorded float trajectory
    """
    groups = [(find_units(modules, blocks, "|".join(f"(?:{p})" for p in (skip, temporal) if p) or None), run)]
    if temporal is not None:
        groups.insert(0, temporal_group(modules[0], getattr(run, "trajectory", None), temporal))
    return reconstruct_units(groups, modules, iters=iters, lr=lr, batch_size=batch_size, weight=weight, beta=beta,
                             warmup=warmup, lsq=lsq, lsq_lr=lsq_lr, samples=samples, seed=seed)


def reconstruct_units(groups: Sequence[tuple[Sequence[Unit], Callable[[], Any]]], modules: Sequence[nn.Module], *,
                      iters: int, lr: float, batch_size: int, weight: float, beta: Sequence[float], warmup: float,
                      lsq: bool = False, lsq_lr: float = 1e-3, samples: int | None = None,
                      seed: int = 0) -> dict[str, UnitResult]:
    """BRECQ over groups of (units, the run feeding them), group after group; `modules` are the
    components the float passes run unquantized. One write-back at the end, so every float pass sees
    the float model and every quantized pass the units decided before it."""
    if iters < 0 or batch_size < 1 or len(beta) != 2 or samples is not None and samples < 1:
        raise ValueError("adaround: need iters >= 0, batch_size >= 1, samples >= 1 and beta = [start, end]")
    optimise = functools.partial(_optimise, iters=iters, lr=lr, batch_size=batch_size, weight=weight,
                                 beta=(float(beta[0]), float(beta[1])), warmup=warmup, lsq_lr=lsq_lr, seed=seed)
    results: dict[str, UnitResult] = {}
    codes: dict[QuantModule, torch.Tensor] = {}
    with serving([layer for units, _ in groups for u in units for layer in u.layers.values()]):
        for units, run in groups:
            _reconstruct_group(units, modules, run, optimise, samples, lsq, results, codes)
        with torch.no_grad():  # the single write-back: float weights become their rounded values
            for layer, c in codes.items():
                replace_weight(layer, rounded_weight(layer, c))
    return results


def _reconstruct_group(units: Sequence[Unit], modules: Sequence[nn.Module], run: Callable[[], Any],
                       optimise: Callable[..., None], samples: int | None, lsq: bool,
                       results: dict[str, UnitResult], codes: dict[QuantModule, torch.Tensor]) -> None:
    """The units in the order run() first reaches them, each on its float outputs and quantized inputs."""
    if not units:  # e.g. every layer is TIAR's: no calibration pass to pay for
        return
    counts: dict[Unit, int] = {}  # calls per unit, in the order of each unit's first call
    count = lambda u: lambda *_: counts.update({u: counts.get(u, 0) + 1})  # noqa: E731
    with quantization_disabled(*modules):
        hooked_run(run, [(u.module, count(u)) for u in units])
    for unseen in [u.name for u in units if u not in counts]:
        log.warning("adaround: %s saw no calibration data; keeping round-to-nearest", unseen)
    for unit, n_calls in tqdm(counts.items(), desc="adaround", unit="block", disable=None):
        keep = set(torch.linspace(0, n_calls - 1, min(samples or n_calls, n_calls)).round().long().tolist())
        fp, q = _Capture(keep, outputs=True), _Capture(keep, outputs=False)
        with quantization_disabled(*modules):
            hooked_run(run, [(unit.module, fp)])
        hooked_run(run, [(unit.module, q)])
        if q.calls != fp.calls:
            raise RuntimeError(f"adaround: run() called {unit.name} {fp.calls} times in float and {q.calls} times "
                               "quantized; calibration must repeat the same calls (fix its seeds)")
        if (gap := _input_gap(fp.inputs, q.inputs)) > 1:  # unrelated samples, not quantization error
            log.warning("adaround: %s's quantized inputs are %.0f%% off its float ones: is run() seeded?",
                        unit.name, 100 * gap)
        results[unit.name], unit_codes = _reconstruct(unit, q.inputs, fp.outputs, gap, lsq, optimise)
        codes.update(unit_codes)
        log.info("adaround %s: %s", unit.name, results[unit.name])
