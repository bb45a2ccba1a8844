"""BRECQ block reconstruction (Li et al. 2021) of AdaRound weights: the recipe step "adaround".

The unit of reconstruction is a block (`DEFAULT_BLOCKS`: UNet ResnetBlock2D and Transformer2DModel,
DiT and Latte transformer blocks; the outermost match wins). Weight-quantized layers outside every
block are reconstructed one layer at a time (AdaRound's original setting) rather than left as RTN.
Units are processed in the order they execute; for each one
  1. run() with quantization disabled records the unit's float inputs and outputs (the targets);
  2. run() quantized, earlier units already rounded, records its quantized inputs (BRECQ's choice);
  3. Adam on the AdaRound V of its layers (and, with `lsq`, its static activation scales) minimises
     MSE(unit_q(x_q), unit_fp(x_fp)) / mean(target^2) + weight * mean rounding regulariser.
The relative MSE makes `weight` mean the same for blocks of very different output magnitude.

Float weights stay untouched until the end: decided layers are served their rounded weights by an
instance attribute shadowing `QuantModule.quantized_weight` (the float weight while quantizers are
disabled), so the float passes see the float model. Only then is every weight replaced by its rounded
value, on its grid with unchanged scales, so serialization packs exactly the chosen codes. If the
step fails part-way, the model is left as it was (round-to-nearest).

What BRECQ sees of activations: inside `dmquant.quantize` static activation quantizers observe (pass
data through), so only dynamic ones (per-token inputs, dynamic attention) quantize during the step.
Every captured call of a unit is one sample (`samples` keeps evenly spaced calls to bound memory;
`batch_size` calls make one Adam step). run() must repeat the same calls each time: the float and
quantized passes are paired call by call. Each pass is a whole run(): stopping after the unit would
also drop the later calls of a calibration loop over timesteps.
"""
from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibrate import static_quantizers
from ..nn.qmodule import QuantModule
from ..nn.switch import quantization_disabled
from ..timestep import current_noise_level, noise_level
from .adaround import SoftRounding, annealed_beta, layer_rounding, pack_codes, rounded_weight

log = logging.getLogger(__name__)

DEFAULT_BLOCKS: tuple[str, ...] = (
    r"(^|\.)(down|up)_blocks\.\d+\.(resnets|attentions)\.\d+$",  # UNet ResnetBlock2D / Transformer2DModel
    r"(^|\.)mid_block\.(resnets|attentions)\.\d+$",
    r"(^|\.)(temporal_|single_)?transformer_blocks\.\d+$",  # DiT, Latte temporal, Flux single blocks
)


@dataclass
class UnitResult:
    """One reconstructed block (or lone layer): output MSE vs float on the quantized inputs."""

    layers: tuple[str, ...]
    samples: int
    mse_rtn: float  # round-to-nearest weights
    mse: float  # the weights kept
    kept_rtn: bool  # the reconstruction did not beat RTN on the calibration data, so RTN stays


@dataclass(frozen=True)
class _Settings:
    iters: int
    lr: float
    batch_size: int
    weight: float
    beta: tuple[float, float]
    warmup: float
    lsq: bool
    lsq_lr: float
    seed: int


@dataclass
class _Unit:
    name: str
    module: nn.Module
    layers: dict[str, QuantModule]


def _learnable(m: nn.Module) -> bool:
    return isinstance(m, QuantModule) and m.weight_quantizer is not None and m.weight_quantizer.enabled


def find_units(modules: Sequence[nn.Module], blocks: Sequence[str] = DEFAULT_BLOCKS,
               skip: str | None = None) -> list[_Unit]:
    """Blocks (outermost modules matching a pattern) with their non-skipped weight-quantized layers,
    then every such layer outside all blocks as a unit of its own. Names are `{component}.{path}`."""
    units, lone = [], []
    for i, root in enumerate(modules):
        named = dict(root.named_modules())
        heads: list[str] = []
        for name in named:  # pre-order: a block's ancestors come first, so the outermost match wins
            if name and any(re.search(p, name) for p in blocks) and not any(name.startswith(h + ".") for h in heads):
                heads.append(name)
        layers = {n: m for n, m in named.items() if _learnable(m) and not (skip and re.search(skip, n))}
        for h in heads:
            inner = {f"{i}.{n}": m for n, m in layers.items() if n.startswith(h + ".")}
            if inner:
                units.append(_Unit(f"{i}.{h}", named[h], inner))
        lone += [_Unit(f"{i}.{n}", m, {f"{i}.{n}": m}) for n, m in layers.items()
                 if not any(n == h or n.startswith(h + ".") for h in heads)]
    return units + lone


def _detached(obj: Any) -> Any:
    """Copies of the tensors in a call's args/kwargs (the model may reuse or modify its buffers)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detached(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _detached(v) for k, v in obj.items()}
    return obj


def _tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors of a module output (tensor, tuple, or diffusers output dict), in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    return [t for v in values for t in _tensors(v)]


@dataclass
class _Call:
    """One recorded forward call of a unit; `level` is the denoiser's noise level at the time, which
    per-timestep activation scales read (outside the denoiser's forward nobody sets it)."""

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
                self.outputs.append([t.detach().clone() for t in _tensors(output)])
        self.calls += 1


def _hooked_run(run: Callable[[], Any], hooks: list[tuple[nn.Module, Callable]]) -> None:
    """run() under no_grad with forward hooks (args, kwargs, output) that are removed afterwards."""
    handles = [m.register_forward_hook(h, with_kwargs=True) for m, h in hooks]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()


def _spread(count: int, samples: int | None) -> set[int]:
    if samples is None or samples >= count:
        return set(range(count))
    return set(torch.linspace(0, count - 1, samples).round().long().tolist())


class _ServedWeights:
    """Gives layers a chosen weight without touching their float Parameter, while the backend is held
    at "fake" (no kernel may pack the stale float weight). Exit removes every override."""

    def __init__(self, layers: list[QuantModule]) -> None:
        self.backends = {layer: layer.backend for layer in layers}

    def __enter__(self) -> "_ServedWeights":
        for layer in self.backends:
            layer.backend = "fake"
        return self

    @staticmethod
    def serve(layer: QuantModule, weight: Callable[[], torch.Tensor]) -> None:
        def quantized_weight() -> torch.Tensor:
            return weight() if layer.weight_quantizer.enabled else layer.weight

        layer.quantized_weight = quantized_weight  # instance attribute shadows the method

    def __exit__(self, *exc: Any) -> None:
        for layer, backend in self.backends.items():
            layer.__dict__.pop("quantized_weight", None)
            layer.backend = backend


def _soft_weight(layer: QuantModule, rounding: SoftRounding) -> Callable[[], torch.Tensor]:
    return lambda: rounding.soft().to(layer.weight.dtype).reshape(layer.weight.shape)


def _sq_error(output: Any, target: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    outs = _tensors(output)
    if len(outs) != len(target):
        raise RuntimeError(f"block returned {len(outs)} tensors, its float run {len(target)}")
    return sum(((o.float() - t.float()) ** 2).sum() for o, t in zip(outs, target)), sum(t.numel() for t in target)


@torch.no_grad()
def _mse(unit: _Unit, inputs: list[_Call], targets: list[list[torch.Tensor]]) -> float:
    errs = [_sq_error(call.replay(unit.module), t) for call, t in zip(inputs, targets)]
    return float(sum(e for e, _ in errs) / sum(n for _, n in errs))


def _lsq_scales(module: nn.Module) -> list[torch.Tensor]:
    quantizers = static_quantizers(module)
    pending = [q.name for q in quantizers if q.observing or q.scale is None]
    if pending:
        raise ValueError(f"adaround lsq=True learns calibrated static activation scales, but {pending[:3]} have "
                         "none yet: put a `ranges` step before `adaround` in the recipe")
    return [q.scale for q in quantizers]


def _optimise(unit: _Unit, rounding: dict[QuantModule, SoftRounding], scales: list[torch.Tensor],
              inputs: list[_Call], targets: list[list[torch.Tensor]], s: _Settings) -> None:
    groups = [{"params": [r.v for r in rounding.values()], "lr": s.lr}]
    groups += [{"params": scales, "lr": s.lsq_lr}] if scales else []
    opt = torch.optim.Adam(groups)
    norm = max(sum(float(t.double().pow(2).sum()) for ts in targets for t in ts)
               / sum(t.numel() for ts in targets for t in ts), 1e-30)
    n_weights = sum(r.v.numel() for r in rounding.values())
    gen = torch.Generator().manual_seed(s.seed)
    for step in tqdm(range(s.iters), desc=unit.name, unit="it", leave=False, disable=None):
        opt.zero_grad(set_to_none=True)
        batch = torch.randperm(len(inputs), generator=gen)[: s.batch_size].tolist()
        for i in batch:  # one backward per call: memory of a single sample's graph
            err, count = _sq_error(inputs[i].replay(unit.module), targets[i])
            (err / (count * norm * len(batch))).backward()
        beta = annealed_beta(step, s.iters, s.warmup, s.beta)
        if beta is not None:
            (s.weight * sum(r.regularizer(beta) for r in rounding.values()) / n_weights).backward()
        opt.step()
        with torch.no_grad():
            for t in scales:  # LSQ steps may not cross zero
                t.clamp_(min=torch.finfo(t.dtype).tiny)


def _reconstruct(unit: _Unit, inputs: list[_Call], targets: list[list[torch.Tensor]], s: _Settings) -> tuple[UnitResult, dict]:
    """Optimise one unit; returns its result and {layer: uint8 codes} of the weights to keep."""
    module = unit.module
    scales = _lsq_scales(module) if s.lsq else []
    initial = [t.clone() for t in scales]
    flags = [(p, p.requires_grad) for p in module.parameters()]
    was_training = module.training
    module.eval()
    try:
        mse_rtn = _mse(unit, inputs, targets)
        rounding = {layer: layer_rounding(layer) for layer in unit.layers.values()}
        for layer, r in rounding.items():
            _ServedWeights.serve(layer, _soft_weight(layer, r))
        for p, _ in flags:
            p.requires_grad_(False)
        for t in scales:
            t.requires_grad_(True)
        with torch.enable_grad():
            _optimise(unit, rounding, scales, inputs, targets, s)
        codes = {layer: pack_codes(layer, r.codes()) for layer, r in rounding.items()}
        del rounding
        for layer, c in codes.items():
            _ServedWeights.serve(layer, lambda layer=layer, c=c: rounded_weight(layer, c))
        mse = _mse(unit, inputs, targets)
        kept_rtn = mse > mse_rtn
        if kept_rtn:
            codes = {layer: pack_codes(layer, layer.weight_quantizer.codes(layer.weight.detach())) for layer in codes}
            with torch.no_grad():
                for t, t0 in zip(scales, initial):
                    t.copy_(t0)
            mse = mse_rtn
    finally:
        for t in scales:
            t.requires_grad_(False)
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(was_training)
    return UnitResult(tuple(unit.layers), len(inputs), mse_rtn, mse, kept_rtn), codes


def apply_block_reconstruction(modules: list[nn.Module], run: Callable[[], Any], blocks: Sequence[str] | None = None,
                               iters: int = 1000, lr: float = 1e-3, batch_size: int = 4, weight: float = 0.01,
                               beta: Sequence[float] = (20.0, 2.0), warmup: float = 0.2, lsq: bool = False,
                               lsq_lr: float = 4e-5, skip: str | None = None, samples: int | None = None,
                               seed: int = 0) -> dict[str, UnitResult]:
    """AdaRound every weight-quantized layer of `modules`, block by block (BRECQ); `run()` feeds
    the calibration data. `blocks`: regexes of block names (default `DEFAULT_BLOCKS`); `skip`: regex
    of layer names kept at round-to-nearest; `samples`: cap on captured calls per unit; `weight`,
    `beta` (start, end), `warmup`: AdaRound's regulariser and its schedule; `lsq`: also learn the
    static activation scales inside each block (they must be calibrated already).

    >>> dmquant.quantize(pipe, "adaround-w4a8", calibration=lambda p: p(prompts, num_inference_steps=10))
    """
    if iters < 0 or batch_size < 1 or len(beta) != 2:
        raise ValueError("adaround: need iters >= 0, batch_size >= 1 and beta = [start, end]")
    s = _Settings(iters, lr, batch_size, weight, (float(beta[0]), float(beta[1])), warmup, lsq, lsq_lr, seed)
    units = find_units(modules, DEFAULT_BLOCKS if blocks is None else tuple(blocks), skip)
    results: dict[str, UnitResult] = {}
    codes: dict[QuantModule, torch.Tensor] = {}
    with _ServedWeights([layer for u in units for layer in u.layers.values()]):
        counts: dict[str, int] = {}  # calls per unit, in the order of each unit's first call
        count = lambda name: lambda *_: counts.update({name: counts.get(name, 0) + 1})  # noqa: E731
        with quantization_disabled(*modules):
            _hooked_run(run, [(u.module, count(u.name)) for u in units])
        for u in units:
            if u.name not in counts:
                log.warning("adaround: %s saw no calibration data; keeping round-to-nearest", u.name)
        by_name = {u.name: u for u in units}
        for name in tqdm(counts, desc="adaround", unit="block", disable=None):
            unit, keep = by_name[name], _spread(counts[name], samples)
            fp, q = _Capture(keep, outputs=True), _Capture(keep, outputs=False)
            with quantization_disabled(*modules):
                _hooked_run(run, [(unit.module, fp)])
            _hooked_run(run, [(unit.module, q)])
            if q.calls != fp.calls:
                raise RuntimeError(f"adaround: run() called {name} {fp.calls} times in float and {q.calls} times "
                                   "quantized; calibration must repeat the same calls (fix its seeds)")
            results[name], unit_codes = _reconstruct(unit, q.inputs, fp.outputs, s)
            for layer, c in unit_codes.items():
                codes[layer] = c
                _ServedWeights.serve(layer, lambda layer=layer, c=c: rounded_weight(layer, c))
            log.info("adaround %s: block MSE %.3g (RTN) -> %.3g", name, results[name].mse_rtn, results[name].mse)
        with torch.no_grad():  # the single write-back: float weights become their rounded values
            for layer, c in codes.items():
                layer.weight.copy_(rounded_weight(layer, c))
    return results
