"""Distillation through the sampler: the fine-tuning option `objective: sample`.

The per-call loss matches the quantized denoiser to the float one on the float trajectory's inputs, one
call at a time. What an evaluation against the float model measures is the end of a whole sampling run,
after the quantized model's errors have compounded along its own trajectory. This loss is that
distance: between the final latents the quantized and the float pipeline reach from the same prompts
and noise (guidance included), backpropagated through every denoising step. Every optimizer step draws
`batch_size` of the calibration prompts and fresh noise, both a function of (seed, step) alone, so a
resumed run draws the same; the pipeline's own call (its scheduler, guidance and conditioning) runs,
without its `no_grad` decorator, so it needs a call that returns latents with `output_type="latent"`
(measured on PixArt-alpha; a call that returns anything else is refused).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator

import torch
from torch import nn

from ..components import denoiser_path, get_path
from ..nn.switch import quantization_disabled

NOISE_SEED = 2_000_000  # away from the evaluation seeds (0, 1, ...) and the calibration seeds (1_000_000, ...)
HELD_STEP = -1  # the noise of the before / after figure: no optimizer step's


@contextlib.contextmanager
def sampling_pipeline(pipe: Any) -> Iterator[None]:
    """While training through the pipeline: no module of it but the trained adapters collects gradients
    (the text encoder runs on every call), and its progress bars stay quiet; both restored after."""
    modules = [m for m in vars(pipe).values() if isinstance(m, nn.Module)]
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    bars = dict(getattr(pipe, "_progress_bar_config", {}))
    for p, _ in flags:
        p.requires_grad_(False)
    pipe.set_progress_bar_config(**{**bars, "disable": True})
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        pipe._progress_bar_config = bars


class SampledLatentLoss:
    """The loss of `objective: sample` on the pipeline `run` calibrated: its prompts, step count,
    guidance and call arguments. Call it inside `sampling_pipeline(run.obj)`."""

    def __init__(self, run: Any, seed: int, name: str) -> None:
        sampling = run.sampling()
        if sampling is None:
            raise ValueError(f"{name}: objective: sample runs the pipeline on the calibration prompts: quantize "
                             "a pipeline with calibration settings or prompts, not a bare model")
        pipe = run.obj
        self.pipe, self.seed, self.name = pipe, seed, name
        self.prompts, kwargs = sampling
        self._kwargs = {**kwargs, "output_type": "latent"}
        self._call = inspect.unwrap(type(pipe).__call__)  # the pipeline call without its no_grad decorator
        self.denoiser = get_path(pipe, denoiser_path(pipe))
        self._held: torch.Tensor | None = None  # float targets of the before / after figure

    def latents(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """The pipeline's final latents for `prompts`, prompt i from the noise of generator seeds[i]."""
        device = next(self.denoiser.parameters()).device
        gens = [torch.Generator(device).manual_seed(s) for s in seeds]
        out = self._call(self.pipe, prompt=prompts, generator=gens, **self._kwargs)[0]
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"{self.name}: objective: sample needs {type(self.pipe).__name__} to return latents "
                             f"as a tensor with output_type='latent'; it returned {type(out).__name__}")
        return out.float()

    def noise_seeds(self, step: int, positions: list[int]) -> list[int]:
        """Fresh noise for every (seed, optimizer step, position in the step's batch)."""
        return [NOISE_SEED + (self.seed * 100_003 + step) * 1_000 + j for j in positions]

    def error(self, step: int, chosen: list[tuple[int, int]], target: torch.Tensor | None = None) -> torch.Tensor:
        """Sum over `chosen` (position in the step's batch, prompt index) of the final-latent MSE of the
        quantized pipeline against the float one from the same noise (or against `target`)."""
        prompts = [self.prompts[i] for _, i in chosen]
        seeds = self.noise_seeds(step, [j for j, _ in chosen])
        if target is None:
            target = self.float_latents(prompts, seeds)
        return (self.latents(prompts, seeds) - target).pow(2).flatten(1).mean(1).sum()

    @torch.no_grad()
    def float_latents(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        with quantization_disabled(self.denoiser):
            return self.latents(prompts, seeds)

    def __call__(self, step: int, chosen: list[tuple[int, int]]) -> torch.Tensor:
        """`error`, to backpropagate."""
        loss = self.error(step, chosen)
        if not loss.requires_grad:
            raise ValueError(f"{self.name}: no gradient reached the denoiser through "
                             f"{type(self.pipe).__name__}'s call")
        return loss

    @torch.no_grad()
    def held_error(self) -> float:
        """Mean final-latent MSE of the first (up to) 4 calibration prompts from noise no training step
        draws: the before / after figure of this objective. The float targets are kept from the first
        call: after the merge the float weights hold W + B A, no longer the float model."""
        chosen = list(enumerate(range(min(4, len(self.prompts)))))
        if self._held is None:
            self._held = self.float_latents([self.prompts[i] for _, i in chosen],
                                            self.noise_seeds(HELD_STEP, [j for j, _ in chosen]))
        return float(self.error(HELD_STEP, chosen, self._held)) / len(chosen)
