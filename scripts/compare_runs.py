"""`dmquant compare` over calibration runs whose row names collide between evaluations (one recipe
calibrated on 16 prompts in one file and on 64 in another): each run is named FILE:ROW and pooled
under that name, then compared like `dmquant compare` (paired over prompts and Welch over runs).

    python scripts/compare_runs.py A.json:row,B.json:row C.json:row,D.json:row
"""
import sys

from dmquant.cli import _metrics_rows
from dmquant.eval.table import compare_rows


def run(spec: str) -> tuple[dict, list[str]]:
    """The row ROW of FILE, renamed FILE:ROW, and the prompts that FILE scored."""
    path, _, name = spec.partition(":")
    prompts, rows = _metrics_rows(path)  # the reader `dmquant compare` uses, with its checks
    chosen = [r for r in rows if r.get("name") == name]
    if not chosen:
        raise SystemExit(f"{path} has no row {name!r} (rows: {[r.get('name') for r in rows]})")
    return {**chosen[0], "name": spec}, prompts


sides = [[run(s) for s in side.split(",")] for side in sys.argv[1:3]]
if len({tuple(p) for side in sides for _, p in side}) != 1:
    raise SystemExit("the evaluations scored different prompts: their rows cannot be paired")
rows = [r for side in sides for r, _ in side]
print(compare_rows(rows, sys.argv[1], sys.argv[2], None), end="")
