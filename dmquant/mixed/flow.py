"""`search(pipe, budget)`: record the float trajectory, measure sensitivities (cached), allocate bits,
and return an ordinary recipe.

    >>> from dmquant.mixed import search
    >>> result = search(pipe, "4.5bits", base="gptq-w4a8")   # or budget="w4a8": that recipe's bytes
    >>> dmquant.quantize(pipe, result.recipe)
    >>> result.write("recipe.yaml", heatmap="sensitivity.png")

The seed fixes the calibration prompts' noise, hence the trajectory, the measurement and (the integer
program being exact and deterministic) the allocation.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..apply import plan_for
from ..components import denoiser_path, get_path
from ..config import Recipe
from ..recipes import get_recipe
from .allocate import Allocation, is_numeric_budget, solve
from .candidates import DEFAULT_CANDIDATES, FP, Candidate, parse_candidates, quantizable_layers, weight_nbytes
from .content import ContentFn, judge_content, latent_content
from .latency import latency_limit, measure_latency
from .recipe import build_recipe, save_heatmap, suggest_exclude, write_recipe
from .sensitivity import Sensitivity, fingerprint, measure

log = logging.getLogger(__name__)
DEFAULT_CALIBRATION = {"num_prompts": 4, "batch_size": 4, "timesteps": "uniform:8"}
CONTENTS = ("auto", "judge", "latent", "none")


@dataclass
class SearchResult:
    recipe: Recipe
    allocation: Allocation
    sensitivity: Sensitivity
    base_candidate: str  # the candidate equal to the base recipe's weight spec (for the heatmap)
    exclude: list[str]  # layers the measurement says a default skip list should hold

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for c in self.allocation.choice.values():
            counts[c] = counts.get(c, 0) + 1
        a = self.allocation
        return (f"{self.recipe.name}: {a.average_bits:.3f} average weight bits over {len(a.choice)} layers, "
                f"denoiser {a.total_bytes / 2**20:.4f} MiB "
                f"(limit {(a.budget_bytes + self.sensitivity.fixed_bytes) / 2**20:.4f}), "
                f"predicted cost {a.cost:.4f}; layers per format {counts}; suggested exclude {self.exclude}"
                + (f"; searched layers {a.seconds * 1e3:.3f} ms measured" if a.seconds is not None else ""))

    def layer_table(self) -> list[dict[str, Any]]:
        """One row per searched layer: the chosen format, its bytes, and the measured relative output
        error (mean over timestep groups) at the chosen and at the base format."""
        sens, rows = self.sensitivity, []
        base = sens.candidates.index(self.base_candidate)
        for i, name in enumerate(sens.layers):
            chosen = self.allocation.choice[name]
            c = sens.candidates.index(chosen)
            rows.append({"layer": name, "format": chosen, "bytes": int(sens.nbytes[i, c]),
                         "error (chosen)": float(sens.quality[i, c].mean()),
                         f"error ({self.base_candidate})": float(sens.quality[i, base].mean())})
        return rows

    def write(self, path: str | Path, heatmap: str | Path | None = None) -> Path:
        out = write_recipe(self.recipe, path, header=f"dmquant mixed\n{self.summary()}")
        if heatmap is not None:
            save_heatmap(self.sensitivity, heatmap, self.base_candidate, self.allocation)
        return out


def _content(pipe: Any, kind: str) -> tuple[ContentFn | None, str]:
    from dmquant.pipelines import judge, miniature_name  # diffusers adapters: loaded only for a pipeline

    if kind not in CONTENTS:
        raise ValueError(f"content metric {kind!r}: choose from {CONTENTS}")
    name = miniature_name(pipe)
    if kind == "auto":
        kind = "judge" if name is not None else "latent" if hasattr(pipe.scheduler, "alphas_cumprod") else "none"
    if kind == "judge":
        if name is None:
            raise ValueError("content='judge' needs a miniature pipeline (the judge is trained on its data)")
        return judge_content(pipe, judge(name)), f"judge:{name}"
    if kind == "latent":
        return latent_content(pipe.scheduler), "latent"
    return None, "none"


def measure_pipeline(pipe: Any, candidates: list[Candidate], base: Recipe, *, calibration: dict | None = None,
                     seed: int = 0, groups: int = 4, content: str = "auto", cache_dir: str | Path | None = None,
                     progress: bool = True) -> Sensitivity:
    """Sensitivity of the pipeline's float denoiser, from the cache when the same model, calibration,
    candidates and metrics were measured before (the trajectory is not even recorded then)."""
    from dmquant.calibration import CalibrationSet  # loads diffusers' pipeline machinery: only when measuring

    settings = {**DEFAULT_CALIBRATION, **(calibration or {}), "seed": 1_000_000 + seed}
    denoiser = get_path(pipe, denoiser_path(pipe))
    content_fn, content_name = _content(pipe, content)
    key = fingerprint([p for _, p in sorted(denoiser.state_dict().items())], settings,
                      [c.name for c in candidates], base.input and base.input.short(), groups, content_name)
    path = Path(cache_dir) / f"sensitivity-{key}" if cache_dir is not None else None
    if path is not None and path.with_suffix(".json").is_file():
        log.info("sensitivity from cache %s", path)
        return Sensitivity.load(path)
    trajectory = CalibrationSet(**settings).prepare(pipe).trajectory
    sens = measure(denoiser, trajectory, candidates, base.input, groups=groups, content=content_fn,
                   content_name=content_name, progress=progress)
    sens.meta.update(calibration=settings, key=key)
    if path is not None:
        sens.save(path)
    return sens


def recipe_nbytes(denoiser: torch.nn.Module, recipe: Recipe, sens: Sensitivity) -> int:
    """The denoiser's bytes under `recipe`'s uniform plan, counted as the allocation counts them."""
    plan = plan_for(denoiser, recipe)
    layers = quantizable_layers(denoiser)
    total = sens.fixed_bytes
    for name in sens.layers:
        w = layers[name].weight
        step = plan.get(name)
        total += weight_nbytes(tuple(w.shape), step.weight if step is not None else None, w.element_size())
    return total


def search(pipe: Any, budget: str | float, *, base: str | Recipe = "w4a8",
           candidates: str | list[str] | tuple[str, ...] = DEFAULT_CANDIDATES, name: str | None = None,
           calibration: dict | None = None, seed: int = 0, groups: int = 4, content: str = "auto",
           content_weight: float = 1.0, cache_dir: str | Path | None = "outputs/mixed-cache",
           latency: str | None = None, latency_backend: str = "auto", progress: bool = True) -> SearchResult:
    """Measure, allocate under `budget` ('4.5bits', '1.2MiB', or a recipe name for its bytes) and
    build the recipe on `base` (its activation spec, steps and attention settings are kept).
    `latency` ('0.8x' of the FP layers, '12ms') adds a limit on the searched layers' time, measured here
    per layer and candidate on the kernels `latency_backend` picks (`dmquant.mixed.latency`)."""
    base = get_recipe(base)
    if base.weight is None:
        raise ValueError(f"base recipe {base.name!r} quantizes no weights: nothing to allocate")
    if "denoiser" not in base.components or len(base.components) > 1:
        raise ValueError("mixed-precision search covers the denoiser; use a denoiser-only base recipe")
    cands = parse_candidates(candidates)
    base_name = next((c.name for c in cands if c.weight == base.weight), None)
    if base_name is None:
        raise ValueError(f"the base weight spec {base.weight.short()} must be one of the candidates "
                         f"{[c.name for c in cands]} (e.g. add {base.weight.format}:{base.weight.granularity})")
    budget_recipe = None if is_numeric_budget(budget) else get_recipe(str(budget))  # fail before measuring
    sens = measure_pipeline(pipe, cands, base, calibration=calibration, seed=seed, groups=groups, content=content,
                            cache_dir=cache_dir, progress=progress)
    denoiser = get_path(pipe, denoiser_path(pipe))
    recipe_bytes = None if budget_recipe is None else recipe_nbytes(denoiser, budget_recipe, sens)
    times = limit = None
    if latency is not None:
        from dmquant.calibration import CalibrationSet  # one recorded call gives each layer its input

        one = {**DEFAULT_CALIBRATION, **(calibration or {}), "num_prompts": 1, "batch_size": 1,
               "timesteps": "uniform:1", "seed": 1_000_000 + seed}
        call = CalibrationSet(**one).prepare(pipe).trajectory.calls[0]
        times = measure_latency(denoiser, sens.layers, call, cands, base.input, latency_backend)
        limit = latency_limit(latency, times, sens.candidates)
    allocation = solve(sens, budget, content_weight=content_weight, recipe_bytes=recipe_bytes, latency=times,
                       latency_limit=limit)
    label = name or f"{base.name}-mixed-{str(budget).replace(' ', '')}"
    recipe = build_recipe(base, allocation, cands, list(quantizable_layers(denoiser)), label,
                          f"{base.name} with per-layer formats searched under {budget} (dmquant mixed)")
    non_fp = [c.name for c in cands if c.name != FP]
    result = SearchResult(recipe, allocation, sens, base_name,
                          suggest_exclude(sens, min(non_fp,
                                                    key=lambda n: sens.nbytes[:, sens.candidates.index(n)].sum())))
    log.info("%s", result.summary())
    return result
