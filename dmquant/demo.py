"""`make demo`: quantize the built-in miniature with several recipes, compare with FP on the same
seeds, write a side-by-side grid (PNG), a results table, and a saved + reloaded quantized model."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .api import quantize
from .report import report
from .serialization import load_quantized, save_quantized

log = logging.getLogger(__name__)
DEFAULT_PIPELINE, FALLBACK_PIPELINE = "miniature-pixart", "tiny-pixart"


def run_demo(out: Path, pipeline: str | None = None, recipe_names: list[str] = ("w8a8", "w4a8", "nvfp4", "w4a4"),
             num_prompts: int = 8) -> str:
    from .eval import format_table, psnr, save_grid, ssim
    from .pipelines import generate, judge, load, miniature_prompts
    from .pipelines.miniature import NAMES, WEIGHTS

    name = pipeline or (DEFAULT_PIPELINE if (WEIGHTS / DEFAULT_PIPELINE).is_dir() else FALLBACK_PIPELINE)
    miniature = name in NAMES
    prompts = miniature_prompts(name, num_prompts) if miniature else [f"a red circle {i}" for i in range(num_prompts)]
    referee = judge(name) if miniature else None
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    def row(label: str, images: torch.Tensor, ref: torch.Tensor | None, pipe) -> dict:
        r = {"name": label}
        if referee is not None:
            scores = referee.adherence(images, prompts)
            r["adherence"] = sum(scores.values()) / len(scores)
        if ref is not None:
            r["psnr"], r["ssim"] = float(psnr(images, ref).mean()), float(ssim(images, ref).mean())
            r["model_mb"] = report(pipe).quant_bytes / 2**20
        return r

    fp_images = generate(load(name), prompts, seed=0)
    columns, rows = {"FP": fp_images}, [row("FP", fp_images, None, None)]
    for recipe in recipe_names:
        pipe = quantize(load(name), recipe)
        images = generate(pipe, prompts, seed=0)
        columns[recipe], rows = images, [*rows, row(recipe, images, fp_images, pipe)]
        if recipe == recipe_names[0]:  # show the packed round trip on the first recipe
            save_quantized(pipe, out / recipe)
            again = generate(load_quantized(out / recipe), prompts, seed=0)
            log.info("saved %s to %s; reloaded samples bitwise identical: %s", recipe, out / recipe,
                     torch.equal(again, images))
            print(str(report(pipe)).splitlines()[-1].strip())  # `dmquant.report(pipe)` has the per-layer table
    grid = save_grid(out / "grid", prompts, columns)
    table = format_table(rows)
    (out / "results.md").write_text(f"# dmquant demo: {name}\n\n{table}\n\n![grid]({grid.name})\n")
    print(f"\n{name}: FP vs {', '.join(recipe_names)} on {len(prompts)} prompts, seed 0\n\n{table}\n\ngrid: {grid}")
    return table
