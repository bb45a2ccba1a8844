"""Paired 95 % bootstrap intervals of the PSNR difference of each row to BASE, over the prompts of
`dmquant eval` outputs run with the same prompts, seeds and steps. Rows of several outputs pool
(`metrics.json:NAME,NAME` takes only those rows); a name seen twice must give the same per-prompt
values up to float noise, as the evals here are deterministic.

    python docs/results/methods-tfmq/paired.py BASE /tmp/a/metrics.json [/tmp/b/metrics.json:x.yaml ...]
"""
import json
import sys

import torch

from dmquant.eval.bootstrap import paired_ci

rows: dict[str, list[float]] = {}
for arg in sys.argv[2:]:
    path, _, names = arg.partition(":")
    for row in json.load(open(path))["rows"]:
        psnr = row.get("per_prompt", {}).get("psnr")
        if psnr is None or names and row["name"] not in names.split(","):
            continue
        if max(abs(a - b) for a, b in zip(rows.setdefault(row["name"], psnr), psnr)) > 1e-3:
            raise SystemExit(f"{row['name']}: different per-prompt PSNR in {path}: not the same eval setting")
base = torch.tensor(rows[sys.argv[1]], dtype=torch.float64)
for name, psnr in rows.items():
    if name != sys.argv[1]:
        a = torch.tensor(psnr, dtype=torch.float64)
        lo, hi = paired_ci(a, base)
        print(f"| {name} - {sys.argv[1]} | {float((a - base).mean()):+.2f} [{lo:+.2f}, {hi:+.2f}] |")
