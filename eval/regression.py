"""Quality regression tests: a baseline records an evaluation (pipeline, model, prompts, seed, steps)
and its metrics with tolerances; re-running it fails with a readable diff when a metric got worse.

Tolerances are measured, not guessed: `dmquant.eval.spread` re-runs each baseline on every float code
path of the CPU and under ulp-sized perturbations, and keeps the worst value as the reference and
max(floor, observed range) as the tolerance. A check fails only when the value is worse than that and
the paired bootstrap interval over prompts (against the recorded per-prompt values) separates it.
The gates run dmquant's fake quantization (float math), not the CPU int8 kernels: recipes default to
backend "fake", so the kernels' 7-bit activation grid on CPUs without VNNI does not enter them.

    dmquant regress --baseline baselines/miniature-pixart-w8a8.json            # check
    dmquant regress --baseline baselines/miniature-pixart-w8a8.json --update   # rewrite deliberately

In a user's own test suite: `assert_quality("miniature-pixart", "w8a8", "baselines/....json")`.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bootstrap import paired_ci, separated
from .runner import EvalConfig, evaluate
from .table import METRICS

# FID is left out: at regression-test sample counts (n << feature dim) it is too unstable to gate on.
DEFAULT_TOLERANCE = {"psnr": 1.0, "ssim": 0.02, "adherence": 0.1, "lpips": 0.02}


@dataclass
class Check:
    """One gated metric: the reference (the worst value measured across CPU code paths, see
    dmquant.eval.spread), the value now, the tolerance, and where the baseline kept per-prompt
    values, the paired 95 % interval of (now - recorded run) over prompts."""
    metric: str
    baseline: float
    value: float
    tolerance: float
    direction: str
    interval: tuple[float, float] | None = None

    @property
    def worse_by(self) -> float:
        return self.baseline - self.value if self.direction == "higher" else self.value - self.baseline

    @property
    def separated_worse(self) -> bool:
        """The paired interval lies entirely on the worse side of 0 (True without an interval)."""
        if self.interval is None:
            return True
        lo, hi = self.interval
        return hi < 0 if self.direction == "higher" else lo > 0

    @property
    def ok(self) -> bool:
        return self.worse_by <= self.tolerance or not self.separated_worse

    def verdict(self) -> str:
        """A difference is stated only where the paired interval separates it from 0."""
        if self.interval is None:
            return ""
        lo, hi = self.interval
        word = "no separable difference" if not separated(self.interval) else (
            "worse" if self.separated_worse else "better")
        return f"; vs recorded run {word} [{lo:+.4f}, {hi:+.4f}]"

    def __str__(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        arrow = "↑" if self.direction == "higher" else "↓"
        return (f"{mark} {self.metric:<12}{arrow} baseline {self.baseline:9.4f}  now {self.value:9.4f}  "
                f"worse by {self.worse_by:+.4f} (tolerance {self.tolerance}){self.verdict()}")


def _config(base: dict[str, Any], model: str, out: Path, perturb: int | None = None) -> EvalConfig:
    calib = base.get("calibration", {})  # {"prompts": n, "timesteps": "uniform:K"}: keeps gates cheap
    return EvalConfig(pipeline=base["pipeline"], models=[model], prompts=base["prompts"], seed=base["seed"],
                      steps=base.get("steps"), metrics=tuple(base["metric_set"]), out=out,
                      extra={"calib_prompts": calib.get("prompts"), "calib_timesteps": calib.get("timesteps"),
                             "perturb": perturb})


def evaluate_baseline(base: dict[str, Any], out: Path, model: str | None = None,
                      perturb: int | None = None) -> dict[str, Any]:
    """The gated metrics of one run of a baseline's evaluation, and their per-prompt values under
    "per_prompt" (`perturb`: see runner.perturb_denoiser)."""
    row = evaluate(_config(base, model or base["model"], out, perturb))[-1]
    gated = [k for k in base.get("metrics", DEFAULT_TOLERANCE) if k in row]
    return {**{k: float(row[k]) for k in gated}, "per_prompt": {k: row["per_prompt"][k] for k in gated}}


def check_baseline(path: str | Path, model: str | None = None, out: str | Path | None = None,
                   update: bool = False) -> list[Check]:
    """Re-run a baseline's evaluation (optionally for another model) and compare metric by metric.
    `update` makes this run the new reference (its code-path spread is then no longer measured:
    re-run `python -m dmquant.eval.spread <baseline> --write` for that)."""
    path = Path(path)
    base = json.loads(path.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        now = evaluate_baseline(base, Path(out or tmp), model)
    checks = []
    for key, gate in base["metrics"].items():
        recorded = gate.get("per_prompt")
        interval = paired_ci(now["per_prompt"][key], recorded) if recorded else None
        checks.append(Check(key, gate["value"], now[key], gate["tolerance"], METRICS[key][1], interval))
    if update:
        base["metrics"] = {k: {"value": now[k], "tolerance": v["tolerance"], "per_prompt": now["per_prompt"][k]}
                           for k, v in base["metrics"].items()}
        base.pop("spread_measured", None)
        path.write_text(json.dumps(base, indent=1) + "\n")
    return checks


def record_baseline(path: str | Path, pipeline: str, model: str, prompts: list[str], seed: int = 0,
                    steps: int | None = None, metrics: tuple[str, ...] = ("psnr", "ssim", "adherence"),
                    calibration: dict[str, Any] | None = None) -> Path:
    """Evaluate once and write a new baseline with floor tolerances (`calibration`: held-out
    calibration prompt count and timestep selection, for recipes that calibrate). Then measure its
    spread across CPU code paths: `python -m dmquant.eval.spread <path> --write`."""
    data = {"pipeline": pipeline, "model": model, "prompts": prompts, "seed": seed, "steps": steps,
            "metric_set": list(metrics), **({"calibration": calibration} if calibration else {})}
    with tempfile.TemporaryDirectory() as tmp:
        row = evaluate_baseline(data, Path(tmp))
    data["metrics"] = {k: {"value": row[k], "tolerance": DEFAULT_TOLERANCE[k], "per_prompt": row["per_prompt"][k]}
                       for k in DEFAULT_TOLERANCE if k in row}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1) + "\n")
    return Path(path)


def assert_quality(baseline: str | Path, model: str | None = None) -> None:
    """One-line quality gate for test suites: raises AssertionError listing every regressed metric."""
    checks = check_baseline(baseline, model)
    if not all(c.ok for c in checks):
        raise AssertionError(f"quality regression against {baseline}:\n" + "\n".join(map(str, checks)))
