"""`CalibrationSet`: the settings of a calibration run, and what `dmquant.quantize` calls on them.

    >>> dmquant.quantize(pipe, "q-diffusion-w4a8")   # the recipe's defaults: CalibrationSet(**recipe.calibration)
    >>> dmquant.quantize(pipe, "tfmq-w4a8", calibration=CalibrationSet(num_prompts=32, timesteps="eda:8"))

`prepare(pipe)` runs the float pipeline on the prompts and records the denoiser's inputs at the
selected steps; the returned runner replays them through the (by then quantized) denoiser.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from dmquant.components import denoiser_path, get_path
from dmquant.families import find_family, timestep_scale_for
from dmquant.observe import static_quantizers

from .timesteps import apportion, parse_selection, select_steps, step_weights
from .trajectory import DenoiserCall, Trajectory, TrajectoryRecorder, step_summary

log = logging.getLogger(__name__)


@dataclass
class CalibrationSet:
    """Prompts, sampler steps and timestep selection for calibration (defaults: a miniature's
    held-out captions, 16 prompts, the pipeline's default step count, 10 uniformly chosen steps), and
    what the family table (`dmquant.families`) supplies unless set: the timestep scale and, for video
    families, the sample size (`num_frames`, `height`, `width`; `call_kwargs` for anything else)."""

    prompts: list[str] | None = None
    num_prompts: int = 16
    steps: int | None = None
    timesteps: str | int = "uniform:10"
    seed: int = 1_000_000  # far from evaluation seeds
    batch_size: int = 8
    guidance_scale: float | None = None
    max_calls: int | None = None  # cap on recorded calls (memory bound)
    samples: int | None = None  # keep this many calls of the selected steps: as many a step, EDA-DM's share for eda
    timestep_scale: float | None = None  # None: the family's (dmquant.families), 1000 outside the table
    num_frames: int | None = None  # video size; None: the family's `video_size`, else the pipeline's default
    height: int | None = None
    width: int | None = None
    call_kwargs: dict[str, Any] | None = None  # any other pipeline call arguments
    exclude: list[str] | None = None  # prompts the default ones must avoid (an evaluation's scored prompts)

    def __post_init__(self) -> None:
        parse_selection(self.timesteps)  # fail early on a bad selection
        if self.num_prompts < 1 or self.batch_size < 1 or self.samples is not None and self.samples < 1:
            raise ValueError("num_prompts, batch_size and samples must be positive")
        if self.timestep_scale is not None and self.timestep_scale <= 0:
            raise ValueError(f"timestep_scale must be positive, got {self.timestep_scale}")

    def resolved_timestep_scale(self, pipe: Any) -> float:
        """The setting, else the family's: t / scale is the noise level (FLUX passes t / 1000: 1)."""
        return self.timestep_scale if self.timestep_scale is not None else timestep_scale_for(pipe)

    def pipeline_kwargs(self, pipe: Any) -> dict[str, Any]:
        """The sampling call's size and family quirks: explicit settings, then the family's video size
        and config-tied arguments (CogVideoX's text length, Latte's frame count)."""
        family = find_family(pipe)
        kwargs: dict[str, Any] = {}
        if family is not None:
            denoiser = get_path(pipe, denoiser_path(pipe))
            kwargs.update({k: getattr(denoiser.config, attr) for k, attr in family.config_kwargs.items()
                           if hasattr(getattr(denoiser, "config", None), attr)})
        frames_kwarg = family.frames_kwarg if family is not None else "num_frames"
        default = family.video_size if family is not None and family.video_size else (None, None, None)
        if self.num_frames is not None and family is not None and not family.is_video:
            raise ValueError(f"num_frames is for video pipelines; {type(pipe).__name__} makes images")
        for key, value, fallback in zip((frames_kwarg, "height", "width"), (self.num_frames, self.height, self.width),
                                        default):
            if value is not None or fallback is not None:
                kwargs[key] = value if value is not None else fallback
        kwargs.update(self.call_kwargs or {})
        return kwargs

    def prepare(self, pipe: Any) -> "TrajectoryRunner":
        """Record the float denoiser's inputs along the trajectory of every calibration prompt."""
        from dmquant.pipelines import calibration_prompts, generate
        from dmquant.pipelines.generate import DEFAULT_STEPS

        if isinstance(pipe, nn.Module):
            raise TypeError("CalibrationSet generates data with a pipeline; for a bare model record a Trajectory "
                            "yourself and pass TrajectoryRunner(trajectory) as calibration")
        denoiser = get_path(pipe, denoiser_path(pipe))
        prompts = list(self.prompts) if self.prompts else calibration_prompts(pipe, self.num_prompts, self.exclude)
        steps = self.steps or DEFAULT_STEPS
        selection = parse_selection(self.timesteps)
        batches = [prompts[s:s + self.batch_size] for s in range(0, len(prompts), self.batch_size)]
        scale, call = self.resolved_timestep_scale(pipe), self.pipeline_kwargs(pipe)

        def sample(batch_index: int) -> None:
            generate(pipe, batches[batch_index], seed=self.seed, steps=steps, batch_size=self.batch_size,
                     guidance_scale=self.guidance_scale, start_index=batch_index * self.batch_size, progress=False,
                     **call)

        features = None
        if selection.needs_features:  # EDA-DM: summarise every step on the first batch, then choose
            with TrajectoryRecorder(denoiser, lambda _: False, scale, summary=step_summary) as probe:
                probe.run(lambda: sample(0), first=True)
            features = torch.stack([torch.stack(v).mean(0) for _, v in sorted(probe.summaries.items())])
        keep = set(select_steps(selection, steps if features is None else features.shape[0], features))

        def record(desc: str = "calibration trajectory") -> Trajectory:
            """Sample every calibration prompt with the denoiser as it is now; keep the chosen steps
            (and of them `samples` calls)."""
            with TrajectoryRecorder(denoiser, keep.__contains__, scale, max_calls=self.max_calls) as rec:
                for i in tqdm(range(len(batches)), desc=desc, unit="batch", disable=None, leave=False):
                    rec.run(lambda: sample(i), first=i == 0)
            if self.samples is not None:
                rec.trajectory.calls = _sampled(rec.trajectory.calls, self.samples, features)
            return rec.trajectory

        trajectory = record()
        log.info("recorded %d denoiser calls at %d steps (%.1f MB)", len(trajectory.calls), len(keep),
                 trajectory.nbytes / 2**20)
        description = {**asdict(self), "prompts": prompts, "steps": steps, "timestep_scale": scale,
                       "call_kwargs": call, "recorded_steps": sorted(keep), "recorded_calls": len(trajectory.calls),
                       "calls_per_step": [sum(c.step == k for c in trajectory.calls) for k in sorted(keep)]}
        return TrajectoryRunner(trajectory, description, prompts[: self.batch_size], steps, self.seed, call, record,
                                self)


def _sampled(calls: list[DenoiserCall], total: int, features: torch.Tensor | None) -> list[DenoiserCall]:
    """`total` of the recorded calls: per step as many each, or by EDA-DM's weights when step features
    were measured (`eda`); within a step the runs are taken in turn, carried across steps (sample j
    from run j mod runs), so each run serves one step before any serves two. Recording order kept."""
    steps = sorted({c.step for c in calls})
    pools = [[i for i, c in enumerate(calls) if c.step == s] for s in steps]
    weights = torch.ones(len(steps)) if features is None else step_weights(features)[steps]
    chosen, j = set(), 0
    for pool, n in zip(pools, apportion(weights, total, min(map(len, pools)))):
        chosen.update(pool[(j + k) % len(pool)] for k in range(n))
        j += n
    return [c for i, c in enumerate(calls) if i in chosen]


class TrajectoryRunner:
    """Feeds calibration data: replays the trajectory through the denoiser; components outside the
    denoiser that still need static scales (a text encoder, the VAE decoder) see a short sampling run."""

    def __init__(self, trajectory: Trajectory, description: dict[str, Any] | None = None,
                 prompts: list[str] | None = None, steps: int | None = None, seed: int = 1_000_000,
                 call_kwargs: dict[str, Any] | None = None,
                 record: Callable[[], Trajectory] | None = None, calibration: CalibrationSet | None = None) -> None:
        self.trajectory = trajectory
        self.calibration = calibration  # the settings that recorded it (None: recorded elsewhere)
        # Re-samples the same prompts, seeds and steps with the denoiser as it is then (a fine-tuning
        # step's own trajectory); None when the runner only holds a trajectory recorded elsewhere.
        self.record = record
        self.description = description or {"recorded_calls": len(trajectory.calls)}
        self.prompts, self.steps, self.seed = prompts or [], steps, seed
        self.call_kwargs = dict(call_kwargs or {})  # the sampling size and quirks the trajectory was recorded at

    def sampling(self, pipe: Any) -> tuple[list[str], dict[str, Any]] | None:
        """(every calibration prompt, the pipeline call arguments they were sampled with: size, quirks,
        steps, guidance), for a fine-tuning step that samples the pipeline itself; None without a
        sampling run behind the trajectory."""
        from dmquant.pipelines.generate import sampling_kwargs

        prompts = self.description.get("prompts")
        if not prompts or isinstance(pipe, nn.Module):
            return None
        return list(prompts), sampling_kwargs(pipe, self.steps, self.description.get("guidance_scale"),
                                              **self.call_kwargs)

    def with_prompts(self, pipe: Any, n: int) -> TrajectoryRunner:
        """The same calibration settings on `n` default prompts, recorded now with `pipe` as it is: a
        fine-tuning step's own data set, larger than what the recipe's other steps calibrate on."""
        if self.calibration is None:
            raise ValueError(f"a data set of {n} prompts of its own is recorded with calibration settings (a "
                             "CalibrationSet), and this calibration is a trajectory recorded elsewhere")
        if self.calibration.prompts:
            raise ValueError(f"a data set of {n} prompts of its own draws the default calibration prompts, and "
                             f"this calibration was given a list of {len(self.calibration.prompts)}: leave the "
                             "step's prompts unset to fine-tune on that list")
        return replace(self.calibration, num_prompts=n).prepare(pipe)

    def __call__(self, obj: Any) -> None:
        denoiser = obj if isinstance(obj, nn.Module) else get_path(obj, denoiser_path(obj))
        self.trajectory.replay(denoiser)
        if isinstance(obj, nn.Module) or not self.prompts:
            return
        from dmquant.pipelines import generate
        from dmquant.state import quantized_components

        others = [m for m in quantized_components(obj).values() if m is not denoiser]
        if any(q.observing for m in others for q in static_quantizers(m)):
            with _denoiser_aside(denoiser):
                generate(obj, self.prompts, seed=self.seed, steps=self.steps, progress=False, **self.call_kwargs)


@contextlib.contextmanager
def _denoiser_aside(denoiser: nn.Module) -> Iterator[None]:
    """While a sampling run feeds the text encoder / VAE observers, the denoiser's observing
    quantizers neither record (their statistics are the trajectory's) nor quantize."""
    with contextlib.ExitStack() as stack:
        for q in static_quantizers(denoiser):
            if q.observing:
                stack.enter_context(q.observation_paused())
        yield
