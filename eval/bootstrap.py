"""Bootstrap confidence intervals over prompts, so a table states a difference only where it holds.

An eval scores each model on the same prompts and seeds, so two models are compared *paired*: one
resample of prompt indices is applied to both, and the interval is that of the difference of their
statistics. Percentile intervals (Efron & Tibshirani 1993, ch. 13) from a fixed seed, so a table is
reproducible. A statistic is either per-prompt values (the mean is resampled, vectorised) or any
function of an index tensor (FID refits its Gaussians on the resampled features).

>>> lo, hi = bootstrap_ci(psnr_per_prompt)                   # 95 % interval of the mean
>>> lo, hi = paired_ci(psnr_model_a, psnr_model_b)           # of mean(a - b): separated if 0 is outside
>>> lo, hi = runs_interval([36.5, 37.1], [38.4, 36.0])        # calibration runs (seeds) as the unit

Prompts are not the only randomness: a calibrated recipe is one draw of its calibration (data, the
reconstruction's batches), and on the miniatures two seeds of one recipe differ by up to 2.4 dB PSNR,
separably over prompts (docs/results/methods-tfmq). `runs_interval` treats each calibration run as one
observation, so a claim about a recipe holds across its runs, not for one draw of it.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch

RESAMPLES = 2000
CONFIDENCE = 0.95
Statistic = Union[Sequence[float], torch.Tensor, Callable[[torch.Tensor], float]]


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = 0) -> torch.Tensor:
    """(resamples, n) prompt indices drawn with replacement from a fixed seed."""
    if n < 2:
        raise ValueError(f"a bootstrap over prompts needs at least 2 prompts, got {n}")
    return torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))


def percentile_interval(stats: torch.Tensor, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The (1-c)/2 and (1+c)/2 quantiles of the resampled statistics (linear interpolation)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    q = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(stats.double(), q)
    return float(lo), float(hi)


def _stats(stat: Statistic, idx: torch.Tensor) -> torch.Tensor:
    if callable(stat):
        return torch.tensor([float(stat(row)) for row in idx], dtype=torch.float64)
    return torch.as_tensor(stat, dtype=torch.float64)[idx].mean(1)


def _size(stat: Statistic, n: int | None) -> int:
    if callable(stat):
        if n is None:
            raise ValueError("a callable statistic needs n (the number of prompts)")
        return n
    return len(stat)


def bootstrap_ci(stat: Statistic, n: int | None = None, resamples: int = RESAMPLES, confidence: float = CONFIDENCE,
                 seed: int = 0, center: float | None = None) -> tuple[float, float]:
    """Percentile interval of a statistic over prompts: per-prompt values (of their mean) or a
    function of an index tensor (then `n`, the number of prompts, is required).

    `center` (the statistic on the full sample) removes the resampling bias: the interval is shifted
    so the resampled median sits on it. FID needs this: a resample repeats images, its covariance has
    lower rank and the distance grows (measured: resampled FIDs 1.1-2.7x the full sample's, whose
    percentile interval then excludes the estimate itself)."""
    stats = _stats(stat, resample_indices(_size(stat, n), resamples, seed))
    lo, hi = percentile_interval(stats, confidence)
    if center is None:
        return lo, hi
    shift = center - float(stats.median())
    return max(lo + shift, 0.0), hi + shift


def paired_ci(a: Statistic, b: Statistic, n: int | None = None, resamples: int = RESAMPLES,
              confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """Interval of stat(a) - stat(b) with the same prompt resample applied to both (paired)."""
    size = _size(a, n)
    if _size(b, size) != size:
        raise ValueError(f"paired statistics need the same prompts: {size} vs {_size(b, size)}")
    idx = resample_indices(size, resamples, seed)
    return percentile_interval(_stats(a, idx) - _stats(b, idx), confidence)


def runs_interval(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Welch t-interval of mean(a) - mean(b), where a and b are one value per calibration run (each run's
    mean over the same prompts). Few runs give wide intervals, as they should: with two runs each the t
    quantile on ~1-2 degrees of freedom is 4-13."""
    from scipy.stats import t  # the eval extra

    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"an interval over calibration runs needs at least 2 runs of each, got {len(a)} and {len(b)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x, y = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    va, vb = x.var() / len(x), y.var() / len(y)
    diff, se = float(x.mean() - y.mean()), float((va + vb).sqrt())
    if se == 0:
        return diff, diff
    dof = float((va + vb) ** 2 / (va ** 2 / (len(x) - 1) + vb ** 2 / (len(y) - 1)))
    half = float(t.ppf((1 + confidence) / 2, dof)) * se
    return diff - half, diff + half


def separated(interval: tuple[float, float]) -> bool:
    """True where an interval of a difference excludes 0: only then is the difference stated."""
    return interval[0] > 0 or interval[1] < 0
