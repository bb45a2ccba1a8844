"""Which denoising steps to calibrate on: uniform over the trajectory (Q-Diffusion), all of them, or
chosen for density and diversity of the model's behaviour (EDA-DM).

A selection is written `uniform:K`, `all`, or `eda:K` and resolves to step indices of the sampler's
schedule; the trajectory then keeps only those steps' denoiser inputs (bounded memory).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TimestepSelection:
    kind: str  # "uniform" | "all" | "eda"
    count: int | None = None

    def __str__(self) -> str:
        return self.kind if self.count is None else f"{self.kind}:{self.count}"

    @property
    def needs_features(self) -> bool:
        return self.kind == "eda"


def parse_selection(text: str | int | TimestepSelection) -> TimestepSelection:
    """'uniform:K' | 'all' | 'eda:K' (a bare integer K means uniform:K)."""
    if isinstance(text, TimestepSelection):
        return text
    if isinstance(text, int) or str(text).isdigit():
        text = f"uniform:{int(text)}"
    kind, _, arg = str(text).strip().lower().partition(":")
    if kind == "all" and not arg:
        return TimestepSelection("all")
    if kind in ("uniform", "eda") and arg.isdigit() and int(arg) > 0:
        return TimestepSelection(kind, int(arg))
    raise ValueError(f"unknown timestep selection {text!r}; use 'uniform:K', 'eda:K' or 'all' (K > 0)")


def uniform_steps(n_steps: int, k: int) -> list[int]:
    """k step indices spread evenly over 0..n_steps-1, both ends included (k >= n_steps: all)."""
    if k >= n_steps:
        return list(range(n_steps))
    if k == 1:
        return [n_steps // 2]
    return sorted({round(i * (n_steps - 1) / (k - 1)) for i in range(k)})


def eda_steps(features: torch.Tensor, k: int) -> list[int]:
    """k steps whose features are representative (high kernel density) and diverse (far from the
    steps already chosen): greedy argmax of density x distance to the chosen set.

    `features` is (n_steps, d), one summary vector of the model's activations per step."""
    n = features.shape[0]
    if k >= n:
        return list(range(n))
    f = features.double()
    f = (f - f.mean(0)) / f.std(0).clamp_min(1e-12)
    dist = torch.cdist(f, f)
    h = dist[dist > 0].median() if (dist > 0).any() else torch.tensor(1.0, dtype=f.dtype)
    density = torch.exp(-(dist / h) ** 2 / 2).mean(1)
    chosen = [int(density.argmax())]
    while len(chosen) < k:
        spread = dist[:, chosen].min(1).values
        score = density * spread
        score[chosen] = -1
        chosen.append(int(score.argmax()))
    return sorted(chosen)


def select_steps(selection: TimestepSelection, n_steps: int, features: torch.Tensor | None = None) -> list[int]:
    if selection.kind == "all":
        return list(range(n_steps))
    if selection.kind == "uniform":
        return uniform_steps(n_steps, selection.count)
    if features is None or features.shape[0] != n_steps:
        raise ValueError("eda selection needs one feature vector per step")
    return eda_steps(features, selection.count)
