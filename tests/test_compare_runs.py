"""scripts/compare_runs.py: gains of fine-tuning runs over a fixed PTQ start, or each over its own
start (--paired), against the textbook one-sample t-interval computed here in float64."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_runs.py"
PROMPTS = [f"prompt {i}" for i in range(6)]


def metrics(tmp_path, name, values):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"prompts": PROMPTS, "rows": [{"name": "r", "psnr": float(np.mean(values)),
                                                              "per_prompt": {"psnr": list(values)}}]}))
    return f"{path}:r"


def compare(*args):
    out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)
    if out.returncode:
        raise AssertionError(out.stderr[-2000:])
    gain, lo, hi = re.search(r"gain ([+-][\d.]+), .*over runs \(t, \d+ dof\) \[([+-][\d.]+), ([+-][\d.]+)\]",
                             out.stdout).groups()
    return float(gain), float(lo), float(hi)


def t_interval(gains):
    g = np.asarray(gains, dtype=np.float64)
    half = stats.t.ppf(0.975, len(g) - 1) * g.std(ddof=1) / np.sqrt(len(g))
    return g.mean(), g.mean() - half, g.mean() + half


def test_runs_over_a_fixed_start_and_each_over_its_own(tmp_path):
    rng = np.random.default_rng(0)
    runs = [30 + rng.normal(0, 1, len(PROMPTS)) + k for k in (0.0, 0.8, 1.7)]
    starts = [28 + rng.normal(0, 1, len(PROMPTS)) + k for k in (0.0, 1.5, 0.9)]
    a = ",".join(metrics(tmp_path, f"run{i}", v) for i, v in enumerate(runs))
    b = ",".join(metrics(tmp_path, f"start{i}", v) for i, v in enumerate(starts))
    fixed = compare(a, metrics(tmp_path, "start0", starts[0]))
    paired = compare("--paired", a, b)
    with pytest.raises(AssertionError, match="pairs run i with baseline i"):
        compare("--paired", a, b.rsplit(",", 1)[0])
    expect_fixed = t_interval([np.mean(r) - np.mean(starts[0]) for r in runs])
    expect_paired = t_interval([np.mean(r) - np.mean(s) for r, s in zip(runs, starts)])
    np.testing.assert_allclose(fixed, expect_fixed, atol=0.006)  # printed to 2 decimals
    np.testing.assert_allclose(paired, expect_paired, atol=0.006)
    assert abs(paired[0] - fixed[0]) > 0.1  # the pairing changes the answer here
