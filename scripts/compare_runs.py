"""`dmquant compare` over calibration runs whose row names collide between evaluations (one recipe
calibrated on 16 prompts in one file and on 64 in another): each run is named FILE:ROW and pooled
under that name, then compared like `dmquant compare` (paired over prompts and Welch over runs).

    python scripts/compare_runs.py A.json:row,B.json:row C.json:row,D.json:row

With one row on the second side (`... C.json:row`), that row is a fixed baseline: a recipe with no
random draw (a PTQ recipe on fixed prompts), so its one evaluation is its value. The gain of the runs
over it is then stated with the paired interval of the run-averaged per-prompt values and the
one-sample t-interval of the runs' gains (the Welch interval with a zero-variance baseline).

    python scripts/compare_runs.py --paired A.json:row,B.json:row C.json:row,D.json:row

pairs run i with baseline i (the same code path or CPU measured twice: a fine-tuned model and its own
PTQ start), and states the mean of the per-pair gains the same way.
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


def gain_over(runs: list[dict], bases: list[dict], metric: str = "psnr") -> str:
    """Mean gain of each run over its own baseline row, the paired interval over prompts of the
    run-averaged per-prompt values and the one-sample t-interval of the per-run gains."""
    pa = torch.tensor([r["per_prompt"][metric] for r in runs], dtype=torch.float64)  # (runs, prompts)
    pb = torch.tensor([b["per_prompt"][metric] for b in bases], dtype=torch.float64)
    gains = (pa.mean(1) - pb.mean(1)).tolist()
    # Welch's interval with a zero-variance side is the one-sample t-interval of the runs' gains
    rlo, rhi = runs_interval(gains, [0.0, 0.0])
    lo, hi = paired_ci(pa.mean(0), pb.mean(0))
    values, base_values = (" / ".join(f"{float(v):.2f}" for v in t.mean(1)) for t in (pa, pb))
    return (f"{metric}: runs {values}, mean {float(pa.mean()):.2f}; baseline {base_values}, mean "
            f"{float(pb.mean()):.2f}\ngain {sum(gains) / len(gains):+.2f}, paired 95 % interval [{lo:+.2f}, {hi:+.2f}], "
            f"over runs (t, {len(runs) - 1} dof) [{rlo:+.2f}, {rhi:+.2f}]\n")


paired = sys.argv[1] == "--paired"
sides = [[run(s) for s in side.split(",")] for side in sys.argv[1 + paired:3 + paired]]
if len({tuple(p) for side in sides for _, p in side}) != 1:
    raise SystemExit("the evaluations scored different prompts: their rows cannot be paired")
runs, bases = ([r for r, _ in side] for side in sides)
if paired and len(runs) != len(bases):
    raise SystemExit(f"--paired pairs run i with baseline i: got {len(runs)} runs and {len(bases)} baselines")
if paired or len(runs) > 1 and len(bases) == 1:
    print(gain_over(runs, bases if paired else bases * len(runs)), end="")
else:
    print(compare_rows(runs + bases, sys.argv[1], sys.argv[2], None), end="")
