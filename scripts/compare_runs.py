"""`dmquant compare` over calibration runs whose row names collide between evaluations (one recipe
calibrated on 16 prompts in one file and on 64 in another): each run is named FILE:ROW and pooled
under that name, then compared like `dmquant compare` (paired over prompts and Welch over runs).

    python scripts/compare_runs.py A.json:row,B.json:row C.json:row,D.json:row

With one row on the second side (`... C.json:row`), that row is a fixed baseline: a recipe with no
random draw (a PTQ recipe on fixed prompts), so its one evaluation is its value. The gain of the runs
over it is then stated with the paired interval of the run-averaged per-prompt values and the
one-sample t-interval of the runs' gains (the Welch interval with a zero-variance baseline).
"""
import sys

import torch

from dmquant.cli import _metrics_rows
from dmquant.eval.bootstrap import paired_ci, runs_interval
from dmquant.eval.table import compare_rows


def run(spec: str) -> tuple[dict, list[str]]:
    """The row ROW of FILE, renamed FILE:ROW, and the prompts that FILE scored."""
    path, _, name = spec.partition(":")
    prompts, rows = _metrics_rows(path)  # the reader `dmquant compare` uses, with its checks
    chosen = [r for r in rows if r.get("name") == name]
    if not chosen:
        raise SystemExit(f"{path} has no row {name!r} (rows: {[r.get('name') for r in rows]})")
    return {**chosen[0], "name": spec}, prompts


def gain_over_fixed(runs: list[dict], base: dict, metric: str = "psnr") -> str:
    """Mean gain of the runs over a fixed baseline, its paired interval over prompts and its t-interval
    over runs."""
    pa = torch.tensor([r["per_prompt"][metric] for r in runs], dtype=torch.float64)  # (runs, prompts)
    pb = torch.tensor(base["per_prompt"][metric], dtype=torch.float64)
    base_mean = float(pb.mean())
    # Welch's interval with a zero-variance side is the one-sample t-interval of the runs' gains
    rlo, rhi = runs_interval(pa.mean(1).tolist(), [base_mean, base_mean])
    lo, hi = paired_ci(pa.mean(0), pb)
    values = " / ".join(f"{float(v):.2f}" for v in pa.mean(1))
    return (f"{metric}: runs {values}, mean {float(pa.mean()):.2f}; fixed baseline {base_mean:.2f}\n"
            f"gain {float(pa.mean()) - base_mean:+.2f}, paired 95 % interval [{lo:+.2f}, {hi:+.2f}], "
            f"over runs (t, {len(runs) - 1} dof) [{rlo:+.2f}, {rhi:+.2f}]\n")


sides = [[run(s) for s in side.split(",")] for side in sys.argv[1:3]]
if len({tuple(p) for side in sides for _, p in side}) != 1:
    raise SystemExit("the evaluations scored different prompts: their rows cannot be paired")
if len(sides[0]) > 1 and len(sides[1]) == 1:
    print(gain_over_fixed([r for r, _ in sides[0]], sides[1][0][0]), end="")
else:
    rows = [r for side in sides for r, _ in side]
    print(compare_rows(rows, sys.argv[1], sys.argv[2], None), end="")
