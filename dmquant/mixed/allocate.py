"""Bit allocation as a 0/1 integer program: one candidate per layer, the summed sensitivity minimal,
the stored bytes within a budget (scipy's `milp`, HiGHS branch and bound: an exact optimum).

Budgets: `4.5bits` (average stored weight bits over the searched layers, scales included), `1.2MiB`
/ `900KB` / `123456B` (the whole denoiser's bytes, the layers outside the search included), or the
name of a recipe (`w4a8`: the bytes that recipe's uniform plan stores, i.e. "at equal model bytes").
A latency budget (`dmquant.mixed.latency`: measured time of each layer under each candidate on this
machine's kernels) can be added as a second constraint.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp

from .sensitivity import Sensitivity

_BUDGET = re.compile(r"([0-9]*\.?[0-9]+)(bits?|b|kb|mb|gb|kib|mib|gib)?")
_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class Allocation:
    """The chosen candidate per layer, what it stores and what the measurement predicts it costs."""

    choice: dict[str, str]  # layer -> candidate name
    layer_bytes: int  # stored bytes of the searched layers' weights
    total_bytes: int  # plus everything else in the model
    average_bits: float  # layer_bytes * 8 / searched weight parameters
    cost: float  # summed normalised sensitivity (the objective)
    budget_bytes: int  # the layer-bytes limit it was solved under
    seconds: float | None = None  # measured time of the searched layers as chosen (with a latency budget)


def parse_budget(budget: str | float, sens: Sensitivity, recipe_bytes: int | None = None) -> int:
    """The budget as a limit on the searched layers' bytes. `recipe_bytes` is the total of a named
    recipe's plan when the budget is a recipe name (resolved by the caller, who has the model)."""
    if recipe_bytes is not None:
        return recipe_bytes - sens.fixed_bytes
    m = _BUDGET.fullmatch(str(budget).strip().lower().replace(" ", ""))
    if m is None:
        raise ValueError(f"budget {budget!r}: give average bits ('4.5bits'), bytes ('1.2MiB', '900KB', '123456B') "
                         "or a recipe name ('w4a8') for its bytes")
    value, unit = float(m.group(1)), m.group(2) or "bits"
    if unit in ("bit", "bits"):
        return int(value * sum(sens.params) / 8)
    return int(value * _UNITS[unit]) - sens.fixed_bytes


def is_numeric_budget(budget: str | float) -> bool:
    """True for bits / bytes budgets, False for a recipe name."""
    return _BUDGET.fullmatch(str(budget).strip().lower().replace(" ", "")) is not None


def allocate(cost: torch.Tensor, nbytes: torch.Tensor, limit: int, allowed: torch.Tensor | None = None,
             latency: torch.Tensor | None = None, latency_limit: float | None = None) -> list[int]:
    """Candidate index per layer minimising sum cost[l, c] subject to sum nbytes[l, c] <= limit (and
    sum latency[l, c] <= latency_limit when given).

    `allowed` (bool, same shape) forbids some choices. Raises when no allocation fits the limits."""
    L, C = cost.shape
    if nbytes.shape != cost.shape:
        raise ValueError(f"cost {tuple(cost.shape)} and bytes {tuple(nbytes.shape)} differ in shape")
    ok = torch.ones(L, C, dtype=torch.bool) if allowed is None else allowed
    cheapest = int(torch.where(ok, nbytes, torch.iinfo(torch.int64).max).min(1).values.sum())
    if cheapest > limit:
        raise ValueError(f"budget too small: the searched layers need at least {cheapest} bytes, "
                         f"the budget leaves {limit}")
    c = cost.double().flatten().numpy()
    one_each = np.kron(np.eye(L), np.ones((1, C)))
    size = nbytes.double().flatten().numpy()[None, :]
    upper = ok.flatten().double().numpy()
    constraints = [LinearConstraint(one_each, 1, 1), LinearConstraint(size, -np.inf, limit)]
    if latency_limit is not None:
        fastest = float(torch.where(ok, latency.double(), float("inf")).min(1).values.sum())
        if fastest > latency_limit:
            raise ValueError(f"latency budget too small: the searched layers take at least {fastest * 1e3:.3f} ms, "
                             f"the budget allows {latency_limit * 1e3:.3f} ms")
        constraints.append(LinearConstraint(latency.double().flatten().numpy()[None, :], -np.inf, latency_limit))
    res = milp(c, integrality=np.ones(L * C), bounds=Bounds(np.zeros(L * C), upper), constraints=constraints,
               options={"mip_rel_gap": 0.0})
    if res.x is None:
        raise ValueError(f"no allocation meets both budgets ({res.message})")
    return [int(i) for i in np.round(res.x).reshape(L, C).argmax(1)]


def solve(sens: Sensitivity, budget: str | float, *, content_weight: float = 1.0, recipe_bytes: int | None = None,
          allowed: torch.Tensor | None = None, latency: torch.Tensor | None = None,
          latency_limit: float | None = None) -> Allocation:
    """Allocate the measured layers under a budget (see the module docstring for its forms), and under
    `latency_limit` seconds of the searched layers' measured `latency` when given."""
    limit = parse_budget(budget, sens, recipe_bytes)
    cost = sens.cost(content_weight)
    picks = allocate(cost, sens.nbytes, limit, allowed, latency, latency_limit)
    layer_bytes = int(sum(int(sens.nbytes[li, c]) for li, c in enumerate(picks)))
    seconds = None if latency is None else float(sum(float(latency[li, c]) for li, c in enumerate(picks)))
    return Allocation({n: sens.candidates[c] for n, c in zip(sens.layers, picks)}, layer_bytes,
                      layer_bytes + sens.fixed_bytes, layer_bytes * 8 / max(sum(sens.params), 1),
                      float(sum(float(cost[li, c]) for li, c in enumerate(picks))), limit, seconds)
