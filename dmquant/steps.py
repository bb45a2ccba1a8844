"""The registry of recipe steps: name -> function, with the typed arguments of `dmquant.step_configs`.

A step is `fn(modules, run, **args)` (see `dmquant.algorithms`); `run_steps` runs a recipe's steps in
order over the quantized components, the calibration data fed by a `StepRun`.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from .algorithms import (
    apply_block_reconstruction,
    apply_gptq,
    apply_vq,
    calibrate_ranges,
    calibrate_temporal,
    split_shortcuts,
)
from .algorithms.paro import search_token_orders
from .config import Step
from .finetune import apply_efficientdm, apply_quest, apply_qvgen
from .transforms import apply_rotation, apply_smoothquant, apply_svd

log = logging.getLogger(__name__)

StepFunction = Callable[..., Any]
STEPS: dict[str, StepFunction] = {"gptq": apply_gptq, "ranges": calibrate_ranges,
                                  "adaround": apply_block_reconstruction, "split_shortcut": split_shortcuts,
                                  "efficientdm": apply_efficientdm, "quest": apply_quest, "qvgen": apply_qvgen,
                                  "temporal": calibrate_temporal, "vq": apply_vq,
                                  "smoothquant": apply_smoothquant, "rotate": apply_rotation, "svd": apply_svd,
                                  "paro": search_token_orders}


class StepRun:
    """What a recipe step calls to feed calibration data: `run()`; `run.trajectory` is the recorded
    denoiser inputs when the data came from `dmquant.calibration` (None for a plain callable)."""

    def __init__(self, runner: Callable[[Any], Any], obj: Any) -> None:
        self.runner, self.obj = runner, obj

    def __call__(self) -> None:
        self.runner(self.obj)

    @property
    def trajectory(self) -> Any:
        return getattr(self.runner, "trajectory", None)

    def sampling(self) -> tuple[list[str], dict[str, Any]] | None:
        """(prompts, pipeline call arguments) the calibration sampled the pipeline with, or None (a recorded
        trajectory, a plain callable, a bare model)."""
        sampling = getattr(self.runner, "sampling", None)
        return sampling(self.obj) if sampling is not None else None

    def with_prompts(self, n: int) -> StepRun:
        """A run on the same calibration settings with `n` prompts, recorded now with the model as it is
        (a fine-tuning step's own data set; see `TrajectoryRunner.with_prompts`)."""
        resize = getattr(self.runner, "with_prompts", None)
        if resize is None:
            raise ValueError(f"a data set of {n} prompts of its own is recorded with calibration settings; "
                             "this calibration is a plain callable")
        return StepRun(resize(self.obj, n), self.obj)

    def record(self) -> Any:
        """A new trajectory sampled with the model as it is now (same prompts, seeds and steps), or None
        when the calibration data cannot be re-sampled (a recorded trajectory or a plain callable)."""
        record = getattr(self.runner, "record", None)
        return record() if record is not None else None


@dataclass
class StepOutcome:
    """What one recipe step did: its typed arguments, its time, and the figures it returned (per-layer
    errors, losses, chosen ranks: whatever the step reports). Kept in `module.dmquant_state.steps`."""

    name: str
    config: Any
    seconds: float
    result: Any


def run_steps(steps: tuple[Step, ...], modules: list[nn.Module], run: StepRun) -> list[StepOutcome]:
    """Run each step with its typed arguments, in order."""
    outcomes = []
    for step in steps:
        t0 = time.perf_counter()
        config = step.config
        result = STEPS[step.name](modules, run, **{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
        outcomes.append(StepOutcome(step.name, config, round(time.perf_counter() - t0, 3), result))
        log.info("step %s took %.1f s", step.name, outcomes[-1].seconds)
    return outcomes
