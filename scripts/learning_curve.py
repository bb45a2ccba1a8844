#!/usr/bin/env python
"""Learning curve of a fine-tuning recipe: PSNR against the FP model over optimizer steps.

One training run, sampled at each requested step count: the recipe's fine-tuning step runs to the
first count with a checkpoint, each later count resumes from the previous one (batches depend on the
seed and the step only, so this is the uninterrupted run stopped at each count; schedules that depend
on the total, QVGen's rank decay, are not), and every stop is merged and evaluated on the same prompts
and seeds as FP. Writes learning_curve.png (mean PSNR with its 95 % bootstrap interval over prompts),
curve.md and the eval outputs.

    python scripts/learning_curve.py --pipeline miniature-pixart --recipe efficientdm-w4a4 \\
        --iters 0,100,200,400,800 --num-prompts 16 --out outputs/learning-curve
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import yaml

import dmquant
from dmquant.config import Step
from dmquant.eval import EvalConfig, evaluate, load_prompts

FINE_TUNERS = ("efficientdm", "quest", "qvgen")


def stopped_at(recipe: dmquant.Recipe, iters: int, checkpoint: Path) -> dmquant.Recipe:
    """The recipe with its fine-tuning step stopped at `iters`, resuming from `checkpoint`."""
    steps = list(recipe.steps)
    where = [i for i, s in enumerate(steps) if s.name in FINE_TUNERS]
    if not where:
        raise ValueError(f"recipe {recipe.name!r} has no fine-tuning step ({', '.join(FINE_TUNERS)})")
    i = where[-1]
    steps[i] = Step(steps[i].name, {**steps[i].args, "iters": iters, "checkpoint": str(checkpoint), "resume": True})
    return recipe.replace(name=f"{recipe.name}@{iters}", steps=tuple(steps))


def plot(rows: list[dict], counts: list[int], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = [r["psnr"] for r in rows]
    lo, hi = zip(*(r["psnr_ci"] for r in rows))
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    ax.fill_between(counts, lo, hi, alpha=0.25, label="95 % interval over prompts")
    ax.plot(counts, mean, "o-", label="mean PSNR vs FP")
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("PSNR vs FP (dB)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default="miniature-pixart")
    ap.add_argument("--recipe", default="efficientdm-w4a4")
    ap.add_argument("--iters", default="0,50,100,200,400", help="comma-separated, increasing step counts")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="sampler steps")
    ap.add_argument("--out", default="outputs/learning-curve")
    args = ap.parse_args()
    counts = [int(c) for c in args.iters.split(",")]
    if counts != sorted(set(counts)) or counts[0] < 0:
        raise SystemExit(f"--iters must increase and be >= 0, got {args.iters}")
    out = Path(args.out)
    checkpoint, recipes = out / "checkpoint", out / "recipes"
    shutil.rmtree(checkpoint, ignore_errors=True)  # one fresh run: an old checkpoint would be resumed
    recipes.mkdir(parents=True, exist_ok=True)
    base = dmquant.get_recipe(args.recipe)
    paths = []
    for n in counts:
        path = recipes / f"{base.name}@{n}.yaml"
        path.write_text(yaml.safe_dump(stopped_at(base, n, checkpoint).to_dict(), sort_keys=False))
        paths.append(str(path))
    cfg = EvalConfig(pipeline=args.pipeline, models=paths, prompts=load_prompts(args.pipeline, args.num_prompts),
                     steps=args.steps, metrics=("psnr",), out=out)
    rows = evaluate(cfg)[1:]  # FP first
    title = f"{base.name} on {args.pipeline} ({args.num_prompts} prompts, {args.steps} steps)"
    plot(rows, counts, title, out / "learning_curve.png")
    lines = ["| optimizer steps | PSNR dB vs FP | 95 % interval |", "|---:|---:|---|"]
    lines += [f"| {n} | {r['psnr']:.2f} | [{r['psnr_ci'][0]:.2f}, {r['psnr_ci'][1]:.2f}] |" for n, r in zip(counts, rows)]
    (out / "curve.md").write_text(f"# {title}\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}/learning_curve.png, curve.md")


if __name__ == "__main__":
    main()
