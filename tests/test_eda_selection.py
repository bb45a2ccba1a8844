"""EDA-DM's calibration samples (TDAC): step weights against a loop-by-loop float64 computation, the
apportionment against every allocation of a small budget, and the sample budget on a tiny pipeline."""
import itertools
import math

import pytest
import torch

from dmquant.calibration import CalibrationSet, DenoiserCall, apportion, step_weights
from dmquant.calibration.dataset import _sampled


def _brute_weights(features: torch.Tensor, diversity: float) -> list[float]:
    """Density (Gaussian kernel on standardised features, bandwidth the lower median of the positive
    pairwise distances) plus diversity x mean cosine distance to the others, both min-max normalised;
    one pair at a time in float64."""
    raw = features.double()
    f = (raw - raw.mean(0)) / raw.std(0)
    n = len(f)
    d = [[float((f[i] - f[j]).norm()) for j in range(n)] for i in range(n)]
    positive = sorted(x for row in d for x in row if x > 0)
    h = positive[(len(positive) - 1) // 2]
    density = [sum(math.exp(-((x / h) ** 2) / 2) for x in row) / n for row in d]
    cos = lambda a, b: float(a @ b) / float(a.norm() * b.norm())  # noqa: E731
    spread = [sum(1 - cos(raw[i], raw[j]) for j in range(n) if j != i) / (n - 1) for i in range(n)]
    unit = lambda xs: [(x - min(xs)) / (max(xs) - min(xs)) for x in xs]  # noqa: E731
    return [a + diversity * b for a, b in zip(unit(density), unit(spread))]


@pytest.mark.parametrize("diversity", [0.0, 1.0, 2.5])
def test_step_weights_match_a_loop_by_loop_computation(diversity):
    g = torch.Generator().manual_seed(0)
    features = torch.cat([torch.randn(4, 6, generator=g), 5 + torch.randn(3, 6, generator=g)])
    features[5] = 3 * features[4]  # far apart in value, the same direction: no cosine diversity
    assert step_weights(features, diversity).tolist() == pytest.approx(_brute_weights(features, diversity), abs=1e-12)
    assert torch.equal(step_weights(torch.ones(5, 3)), torch.full((5,), 2.0, dtype=torch.float64))  # all alike


@pytest.mark.parametrize("seed", range(6))
def test_apportion_is_the_closest_allocation(seed):
    """Every allocation of `total` over 5 steps within the cap: none is nearer the proportional shares."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(5, generator=g) ** 3  # skewed, so the cap binds
    total, cap = 7 + seed % 3, 3
    counts = apportion(weights, total, cap)
    share = (total * weights.double() / weights.double().sum()).tolist()
    cost = lambda c: sum((a - s) ** 2 for a, s in zip(c, share))  # noqa: E731
    best = min(cost(c) for c in itertools.product(range(cap + 1), repeat=5) if sum(c) == total)
    assert sum(counts) == total and max(counts) <= cap and cost(counts) == pytest.approx(best, abs=1e-12)
    assert apportion(torch.ones(4), 8, 5) == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="do not fit"):
        apportion(weights, 16, 3)


def test_sampled_calls_spread_runs_over_steps():
    """3 steps x 4 runs, recorded run by run: 4 samples evenly take each run once, in recording order."""
    calls = [DenoiserCall({"run": r}, s, 1 - s / 3) for r in range(4) for s in range(3)]
    picked = _sampled(calls, 4, None)
    assert [c.step for c in picked].count(0) == 2 and sorted(c.kwargs["run"] for c in picked) == [0, 1, 2, 3]
    assert picked == sorted(picked, key=calls.index)
    features = torch.tensor([[0.0], [0.1], [3.0]])  # steps 0 and 1 alike, step 2 apart
    counts = apportion(step_weights(features), 9, 4)
    picked = _sampled(calls, 9, features)
    assert [sum(c.step == s for c in picked) for s in range(3)] == counts


@pytest.mark.slow
def test_sample_budget_on_a_pipeline():
    from dmquant.pipelines import load

    torch.manual_seed(0)
    pipe = load("tiny-sd")
    prompts = ["a red circle", "a blue square", "a cat", "a dog"]
    uniform = CalibrationSet(prompts=prompts, batch_size=1, steps=4, timesteps="all", samples=8).prepare(pipe)
    assert uniform.description["calls_per_step"] == [2, 2, 2, 2] and len(uniform.trajectory.calls) == 8
    runner = CalibrationSet(prompts=prompts, batch_size=1, steps=6, timesteps="eda:6", samples=4).prepare(pipe)
    calls = runner.trajectory.calls
    assert len(calls) == 4 and sum(runner.description["calls_per_step"]) == 4
    texts = [c.kwargs["encoder_hidden_states"] for c in calls]
    assert not any(torch.equal(a, b) for a, b in itertools.combinations(texts, 2))  # four prompts, once each
    assert len(runner.trajectory.visited) == 6  # the temporal steps still see every visited timestep
    again = runner.record()
    assert [c.step for c in again.calls] == [c.step for c in calls]
