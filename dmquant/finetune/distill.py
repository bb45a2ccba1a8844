"""Data-free distillation of a quantized denoiser against its own full-precision self.

The teacher is the same modules under `quantization_disabled`: the quantized layers share the float
weights, which stay untouched until the adapters merge at the end, so this *is* the float model, with
no copy in memory. Inputs are the calibration trajectory's recorded denoiser calls (no dataset): every
step draws `batch_size` of them, i.e. timesteps spread over the whole trajectory, from a generator seeded
by (seed, step) alone, so a resumed run draws the same batches. Loss: MSE between student and teacher
outputs, plus optionally `feature_weight` times the relative MSE of every block's output (block-wise
feature loss); with `drop` the student's activations skip their quantizers at random (QDrop, `qdrop.py`).
With `guidance` the output loss compares the classifier-free guided predictions u + s (c - u) of each
call's [unconditional; conditional] halves instead of the halves themselves: the sampler only ever
uses that combination, and the error of c - u reaches it s-fold (on the pixart miniature at W4A4 the
guided error is 9x the per-half error, the halves' errors correlating 0.5). With `objective: sample`
each step instead runs whole sampling runs of the pipeline and compares final latents (`sampling.py`).
Each call is its own backward (the memory of one sample's graph; the batch is gradient accumulation).
Runs under `accelerate` (mixed precision autocast; with several processes each takes a share of the
batch and gradients are averaged), with a progress bar and atomic checkpoints.
"""
from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from ..algorithms.hooks import output_tensors
from ..algorithms.units import find_units
from ..components import denoiser_path, get_path
from ..nn.qmodule import QuantModule
from ..nn.switch import quantization_disabled
from ..observe import activation_quantizers, static_quantizers, trainable_static_scales
from ..step_configs import DistillConfig
from .adapters import LayerAdapters, adapter_buffers, adapter_parameters, merge_adapters, serving_adapters
from .checkpoint import load_checkpoint, save_checkpoint
from .qdrop import QDrop
from .sampling import SampledLatentLoss

log = logging.getLogger(__name__)

SCALE_FLOOR = 1e-3  # learnt activation step sizes stay above this share of their calibrated value


@dataclass
class DistillResult:
    """What one fine-tuning run did: losses of the steps it ran (from `start` after a resume)."""

    losses: list[float]
    start: int
    mse_before: float  # output MSE vs float on up to 16 evenly spaced calls at the start (PTQ, or the checkpoint);
    # of the guided prediction when the loss is guided; with objective sample the final-latent MSE of 4 prompts
    mse_after: float  # the same, for the merged model
    trainable_params: int
    peak_memory_mb: float
    memory: str  # what peak_memory_mb measures
    seconds: float
    notes: dict[str, Any] = field(default_factory=dict)


class Schedule:
    """Per-step extras a method adds to the loop (QVGen's rank decay); the default adds nothing."""

    def before_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Called before optimizer step `step` (also the first one after a resume)."""

    def penalty(self, step: int) -> torch.Tensor | None:
        """An extra loss term for step `step` (a regulariser), or None."""
        return None


def trajectory_inputs(modules: Sequence[nn.Module], run: Any, step: str) -> tuple[nn.Module, list]:
    """(denoiser, recorded calls) for a fine-tuning step; only pipelines calibrated with a
    CalibrationSet have a trajectory."""
    trajectory = getattr(run, "trajectory", None)
    if trajectory is None or not trajectory.calls:
        raise ValueError(f"{step} distils on the recorded denoiser trajectory: quantize a pipeline with "
                         "calibration settings or prompts, not a bare model with a callable")
    denoiser = get_path(run.obj, denoiser_path(run.obj))
    if not any(m is denoiser for m in modules):
        raise ValueError(f"{step}: the recipe does not quantize the denoiser")
    return denoiser, list(trajectory.calls)


def lsq_scales(module: nn.Module, step: str, layers: Sequence[QuantModule] | None = None) -> dict[str, torch.Tensor]:
    """Static activation step sizes to learn (per timestep group: the scale rows), by quantizer name;
    `layers` limits them to those layers' input quantizers."""
    scales = {q.name: q.scale for q in static_quantizers(module)}
    trainable_static_scales(module, step)  # raises unless a `ranges` step calibrated them
    if layers is not None:
        keep = {layer.input_quantizer.name for layer in layers if layer.input_quantizer is not None}
        for name in [n for n in scales if n not in keep]:
            scales.pop(name).requires_grad_(False)
    return scales


def on_device(kwargs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A recorded call's arguments (kept on CPU) on the model's device."""
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, kwargs)


def lr_factor(schedule: str, step: int, iters: int) -> float:
    """Multiplier of every base learning rate at optimizer step `step`: a function of the step alone (no
    scheduler state), so a resumed run continues the same curve. Cosine decays to 0 at `iters`; on the
    pixart miniature it scored 1.2 dB below a constant rate (docs/results.md): the activation step sizes
    were still moving when their rate decayed, so the LSQ recipes keep "constant". Without step sizes
    (svdquant-efficientdm-w4a4: dynamic activations) it settles the end of the run, which otherwise swings
    by up to 2 dB between checkpoints on the SD miniature."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / max(iters, 1)))
    return 1.0


def _batch(seed: int, step: int, n: int, size: int) -> list[int]:
    """The calls of optimizer step `step`: a function of (seed, step) only, hence resumable."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randperm(n, generator=gen)[:size].tolist()


class _Features:
    """Forward hooks keeping each block's first output tensor (for the block-wise feature loss)."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        self.outputs: list[torch.Tensor] = []
        self._handles = [b.register_forward_hook(lambda _m, _a, o: self.outputs.append(output_tensors(o)[0]))
                         for b in blocks]

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def guided(out: torch.Tensor, scale: float | None) -> torch.Tensor:
    """The classifier-free guided prediction of a call batched [unconditional; conditional], as diffusers
    batches it; `out` itself when `scale` is None."""
    if scale is None:
        return out
    uncond, cond = out.chunk(2)
    return uncond + scale * (cond - uncond)


def check_guidance_batched(calls: list, name: str) -> None:
    """Refuse a guided loss on calls that are not one batch of identical [unconditional; conditional]
    latent halves (a pipeline that calls the two separately, or sampled without guidance)."""
    for call in calls:
        x = next(v for v in call.kwargs.values() if isinstance(v, torch.Tensor))
        if x.shape[0] % 2 or not torch.equal(*x.chunk(2)):
            raise ValueError(f"{name}: guidance needs every denoiser call batched as [unconditional; conditional] "
                             f"halves of the same latents (classifier-free guidance above 1, both halves in one "
                             f"call); a recorded call has a batch of {x.shape[0]} whose halves differ")


def _relative_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out.float() - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-30)


@torch.no_grad()
def _output_mse(denoiser: nn.Module, calls: list, held: list[int], teacher: Callable, features: "_Features",
                device: torch.device, guidance: float | None) -> float:
    """Mean output MSE (of the guided prediction with `guidance`) against the float model over the calls
    `held` (the deterministic figure)."""
    errs = []
    for i in held:
        target = guided(teacher(i)[0], guidance)
        out = guided(output_tensors(denoiser(**on_device(calls[i].kwargs, device)))[0].float(), guidance)
        errs.append(float((out - target).pow(2).mean()))
        features.take()
    return sum(errs) / len(errs)


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, "process max RSS (whole process)"


def distill_adapters(denoiser: nn.Module, calls: list, adapters: dict[str, LayerAdapters],
                     scales: dict[str, torch.Tensor], cfg: DistillConfig, name: str,
                     schedule: Schedule | None = None, resample: Callable[[], list] | None = None,
                     sampler: SampledLatentLoss | None = None) -> DistillResult:
    """Train `adapters` (and the step sizes `scales`) so the quantized denoiser matches its float self
    on `calls`, then merge the adapters into the weights. With `cfg.trajectory == "student"` the inputs
    are instead `resample()`: the calls met when the quantized model samples itself, re-sampled every
    `cfg.refresh_every` steps (its errors compound along its own trajectory, which the float one never
    visits). With `cfg.objective == "sample"` the loss is `sampler`'s (final latents of sampling runs of
    the calibration prompts). In both cases `calls` then only give the before/after figures. The model's
    own parameters are frozen for the run and restored after; on a failure during training the float
    weights and step sizes are as before (once the adapters are merged, the model is the fine-tuned one)."""
    from accelerate import Accelerator  # heavy: only when a fine-tuning step runs

    if cfg.trajectory == "student" and resample is None:
        raise ValueError(f"{name}: trajectory: student re-samples the calibration prompts, which needs a "
                         "pipeline calibrated with calibration settings or prompts")
    if (cfg.objective == "sample") != (sampler is not None):
        raise ValueError(f"{name}: objective: sample needs the sampled-latent loss, and only it uses one")
    schedule = schedule or Schedule()
    device = next(denoiser.parameters()).device
    accel = Accelerator(cpu=device.type == "cpu", mixed_precision=cfg.mixed_precision)
    params = {**adapter_parameters(adapters), **{f"scale/{k}": v for k, v in scales.items()}}
    buffers = adapter_buffers(adapters)
    relative = {k: t for k, t in params.items() if k.startswith("scale/") or ".branch." in k}  # own scale
    smooth = {k: t for k, t in params.items() if ".smooth." in k}  # log scales: absolute steps
    groups = [{"params": [p for k, p in params.items() if k not in relative and k not in smooth], "lr": cfg.lr},
              {"params": list(smooth.values()), "lr": cfg.smooth_lr},
              *({"params": [t], "lr": (cfg.lsq_lr if k.startswith("scale/") else cfg.branch_lr)
                 * float(t.detach().abs().mean())} for k, t in relative.items())]
    optimizer = torch.optim.Adam([g for g in groups if g["params"]])
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    initial = {k: t.detach().clone() for k, t in scales.items()}
    # A step size may shrink a thousandfold, not to zero: there its LSQ gradient is 0 x inf (NaN). Through
    # the sampler (objective sample) the loss drives some to zero, i.e. prunes that activation.
    floors = {k: (t * SCALE_FLOOR).clamp_min(torch.finfo(t.dtype).tiny) for k, t in initial.items()}
    flags = [(p, p.requires_grad) for p in denoiser.parameters()]
    blocks = [u.module for u in find_units([denoiser], cfg.blocks) if not isinstance(u.module, QuantModule)] \
        if cfg.feature_weight else []
    features = _Features(blocks)
    qdrop = QDrop(activation_quantizers(denoiser), cfg.drop, cfg.seed)
    path = Path(cfg.checkpoint) / f"{name}.safetensors" if cfg.checkpoint else None
    start = load_checkpoint(path, cfg.seed, params, buffers, optimizer) if cfg.resume and path and path.exists() else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def teacher_of(inputs: list) -> Callable[[int], tuple[torch.Tensor, list[torch.Tensor]]]:
        """Float output (and block features) of call i of `inputs`, computed once: the float model is
        deterministic, and only until the merge the float model (the merge writes the float weights)."""
        cache: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}

        def teacher(i: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
            if i not in cache:
                with quantization_disabled(denoiser), torch.no_grad():
                    out = output_tensors(denoiser(**on_device(inputs[i].kwargs, device)))[0].float()
                cache[i] = (out, [f.float() for f in features.take()])
            return cache[i]
        return teacher

    if cfg.guidance is not None:
        check_guidance_batched(calls, name)

    def call_losses(step: int, batch: list[int]) -> float:
        """Backward of this process's share of the step's calls (the per-call objective); the mean loss."""
        total = 0.0
        for i in batch[accel.process_index::accel.num_processes]:
            kwargs = on_device(inputs[i].kwargs, device)
            target, target_features = teacher(i)
            with qdrop.call(step, i), accel.autocast():
                out = output_tensors(denoiser(**kwargs))[0].float()
                loss = (guided(out, cfg.guidance) - guided(target, cfg.guidance)).pow(2).mean()
                if blocks:
                    loss = loss + cfg.feature_weight * sum(
                        map(_relative_mse, features.take(), target_features)) / len(blocks)
            accel.backward(loss / len(batch))
            total += float(loss.detach()) / len(batch)
        return total

    held = torch.linspace(0, len(calls) - 1, min(16, len(calls))).round().long().unique().tolist()
    was_training, t0, losses, skipped = denoiser.training, time.perf_counter(), [], []
    denoiser.eval()
    denoiser.requires_grad_(False)
    inputs, teacher = calls, teacher_of(calls)  # what training draws from: the student's own calls once re-sampled
    held_teacher = teacher

    def figure() -> float:
        """The before / after figure: the objective's error on held inputs (per-call targets are cached)."""
        if sampler is not None:
            return sampler.held_error()
        return _output_mse(denoiser, calls, held, held_teacher, features, device, cfg.guidance)

    try:
        with serving_adapters(adapters):
            before = figure()
        with serving_adapters(adapters), torch.enable_grad():
            for step in tqdm(range(start, cfg.iters), desc=name, unit="step", initial=start, total=cfg.iters,
                             disable=None if accel.is_main_process else True):
                if resample is not None and cfg.trajectory == "student" and (step == start
                                                                             or step % cfg.refresh_every == 0):
                    inputs = resample()
                    if cfg.guidance is not None:
                        check_guidance_batched(inputs, name)
                    teacher = teacher_of(inputs)
                for g, lr in zip(optimizer.param_groups, base_lrs):
                    g["lr"] = lr * lr_factor(cfg.lr_schedule, step, cfg.iters)
                schedule.before_step(step, optimizer)
                optimizer.zero_grad(set_to_none=True)
                batch = _batch(cfg.seed, step, len(inputs) if sampler is None else len(sampler.prompts),
                               cfg.batch_size)
                if sampler is not None:  # one sampling run of this process's share of the step's prompts
                    mine = list(enumerate(batch))[accel.process_index::accel.num_processes]
                    with qdrop.call(step, 0), accel.autocast():
                        loss = sampler(step, mine) / len(batch)
                    accel.backward(loss)
                    total = float(loss.detach())
                else:
                    total = call_losses(step, batch)
                if not math.isfinite(total):  # NaN parameters would be merged into every weight
                    raise FloatingPointError(f"{name}: the loss is {total} at optimizer step {step}: training "
                                             "diverged; lower lr / lsq_lr")
                extra = schedule.penalty(step)
                if extra is not None:
                    accel.backward(extra / accel.num_processes)  # summed over processes below
                if accel.num_processes > 1:
                    for p in params.values():
                        if p.grad is not None:
                            p.grad = accel.reduce(p.grad, reduction="sum")
                    total = float(accel.reduce(torch.tensor(total, device=device), reduction="sum"))
                if all(bool(torch.isfinite(p.grad).all()) for p in params.values() if p.grad is not None):
                    optimizer.step()
                else:  # an overflow in the backward (long graphs: objective sample): skip the step, as AMP does
                    skipped.append(step)
                    log.warning("%s: non-finite gradient at optimizer step %d: step skipped", name, step)
                    if len(skipped) > max(10, cfg.iters // 10):
                        raise FloatingPointError(f"{name}: non-finite gradients at {len(skipped)} optimizer "
                                                 "steps: training diverged; lower lr / lsq_lr")
                with torch.no_grad():
                    for k, t in scales.items():
                        t.clamp_(min=floors[k])
                losses.append(total)
                if path is not None and accel.is_main_process and ((step + 1) % cfg.checkpoint_every == 0
                                                                   or step + 1 == cfg.iters):
                    save_checkpoint(path, step + 1, cfg.seed, params, buffers, optimizer)
        schedule.before_step(cfg.iters, optimizer)  # lets a schedule finish (QVGen: the last rank cut)
        merge_adapters(adapters)
        after = figure()
    except BaseException:
        with torch.no_grad():
            for k, t in scales.items():
                t.copy_(initial[k])
        raise
    finally:
        features.remove()
        qdrop.remove()
        for t in scales.values():
            t.requires_grad_(False)
        for p, flag in flags:
            p.requires_grad_(flag)
        denoiser.train(was_training)
    peak, kind = _peak_memory(device)
    trainable = sum(p.numel() for p in params.values())
    notes: dict[str, Any] = {"skipped_steps": skipped} if skipped else {}
    if after > before:  # finite all along, yet worse than the start: no error fired, so say it here
        notes["worse_than_start"] = True
        log.warning("%s: the fine-tuned model is further from the float one than its start on the held figure "
                    "(%.4g -> %.4g): training did not converge; lower lr / lsq_lr or compare it against the "
                    "recipe without fine-tuning before using it", name, before, after)
    result = DistillResult(losses, start, before, after, trainable, round(peak, 1), kind,
                           round(time.perf_counter() - t0, 3), notes)
    log.info("%s: %d trainable parameters, output MSE vs float %.4g -> %.4g, peak memory %.0f MB (%s)", name,
             trainable, before, after, peak, kind)
    return result
