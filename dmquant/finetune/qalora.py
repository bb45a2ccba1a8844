"""EfficientDM (He et al. 2024) as the recipe step `efficientdm`: QALoRA distilled from the FP teacher.

Every weight-quantized layer of the denoiser gets a LoRA merged with its weight *before* the weight
quantizer, Q(W + s * B A), so training sees exactly the low-bit weight it will store; the merge then
folds B A into W and the unchanged weight scales map the new float weight onto the codes trained with
(no re-scaling: re-initialising the scales from W + B A would move codes the loss never saw, so the
merged model would not be the trained one). Scale-aware optimisation: B A is counted in the layer's own
weight quantization steps s (see `LowRankDelta`). With `lsq` the static activation step sizes are learnt
too, one per timestep group (EfficientDM's temporal LSQ; LSQ gradients through `fake_quantize`), which
needs them calibrated first: put a `ranges` step before this one. Only LoRA factors and step sizes train,
plus with `branch` the factors of an SVD low-rank branch (after an `svd` step: the 16-bit capacity
SVDQuant already pays for, trained in place, so the merged model keeps its size).
"""
from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Sequence

from torch import nn

from ..nn.qmodule import QuantModule
from ..nn.switch import quantization_disabled
from .adapters import make_adapters
from .distill import DistillConfig, DistillResult, Schedule, distill_adapters, lsq_scales, trajectory_inputs
from .sampling import SampledLatentLoss, sampling_pipeline


def weight_quantized_layers(module: nn.Module, skip: str | None = None) -> dict[str, QuantModule]:
    """{name: layer} of the layers with an enabled weight quantizer, minus those matching `skip`."""
    return {n: m for n, m in module.named_modules() if isinstance(m, QuantModule) and m.weight_quantizer is not None
            and m.weight_quantizer.enabled and not (skip and re.search(skip, n))}


Select = Callable[[nn.Module, list], dict[str, QuantModule]]


def finetune_layers(modules: Sequence[nn.Module], run: Any, name: str, select: Select, rank: int, lsq: bool,
                    scale_aware: bool, aux_rank: int = 0, schedule_for: Any = None, branch: bool = False,
                    smooth: bool = False, **loop: Any) -> DistillResult:
    """The common body of the fine-tuning steps: adapters on the layers `select(denoiser, calls)` picks,
    their step sizes if `lsq` (all of them when every weight-quantized layer trains), the distillation
    loop, the merge."""
    cfg = DistillConfig(**loop)
    if cfg.prompts is not None:  # its own data set, from the float model (every quantizer off)
        with quantization_disabled(*modules):
            run = run.with_prompts(cfg.prompts)
    denoiser, calls = trajectory_inputs(modules, run, name)
    layers = select(denoiser, calls)
    every = len(layers) == len(weight_quantized_layers(denoiser))
    scales = lsq_scales(denoiser, name, None if every else list(layers.values())) if lsq else {}
    adapters = make_adapters(layers, rank, aux_rank, cfg.seed, scale_aware, branch, smooth)
    if branch and not any(a.branch is not None for a in adapters.values()):
        raise ValueError(f"{name}: branch: true trains low-rank branches, and no layer has one: put an svd "
                         "step before this one")
    schedule: Schedule | None = schedule_for(adapters, cfg) if schedule_for is not None else None
    recorder = getattr(run, "record", None)

    def resample() -> list:
        trajectory = recorder()
        if trajectory is None:
            raise ValueError(f"{name}: trajectory: student re-samples the calibration prompts, which needs a "
                             "pipeline calibrated with calibration settings or prompts")
        return list(trajectory.calls)

    sampler = SampledLatentLoss(run, cfg.seed, name) if cfg.objective == "sample" else None
    with sampling_pipeline(run.obj) if sampler is not None else contextlib.nullcontext():
        result = distill_adapters(denoiser, calls, adapters, scales, cfg, name, schedule,
                                  resample if recorder is not None else None, sampler=sampler)
    result.notes.update(layers=len(layers), rank=rank, lsq_scales=len(scales),
                        branches=sum(a.branch is not None for a in adapters.values()),
                        smoothed=sum(a.smoothing is not None for a in adapters.values()))
    return result


def apply_efficientdm(modules: list[nn.Module], run: Any, rank: int = 8, lsq: bool = True,
                      scale_aware: bool = True, skip: str | None = None, branch: bool = False,
                      smooth: bool = False, **loop: Any) -> DistillResult:
    """Recipe step `efficientdm`: QALoRA of `rank` on every weight-quantized denoiser layer (not those
    matching `skip`), temporal LSQ of the activation step sizes if `lsq`, with `branch` the factors
    of their SVD low-rank branches (learning rate `branch_lr`), with `smooth` a per-input-channel
    smoothing scale per layer (`smooth_lr`; see `SmoothingTwin`). Loop arguments (`iters`, `lr`,
    `batch_size`, `lsq_lr`, `branch_lr`, `smooth_lr`, `feature_weight`, `blocks`, `mixed_precision`, `checkpoint`,
    `checkpoint_every`, `resume`, `seed`, `trajectory`, `refresh_every`, `lr_schedule`, `drop`, `guidance`,
    `objective`, `prompts`): `DistillConfig`.

    >>> dmquant.quantize(pipe, "efficientdm-w4a4")   # ranges, then this step
    """
    return finetune_layers(modules, run, "efficientdm", lambda d, _: weight_quantized_layers(d, skip), rank, lsq,
                           scale_aware, branch=branch, smooth=smooth, **loop)
