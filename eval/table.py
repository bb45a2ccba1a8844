"""Readable tables of results, keeping the two metric families apart:
vs prompts/dataset (FID vs real, CLIP, adherence) and vs FP on the same seeds (PSNR, SSIM, LPIPS, FID vs FP)."""
from __future__ import annotations

from typing import Any

# metric key -> (column title, "higher"/"lower" is better, family)
METRICS: dict[str, tuple[str, str, str]] = {
    "fid_real": ("FID vs real", "lower", "prompts"),
    "clip": ("CLIP", "higher", "prompts"),
    "adherence": ("adherence", "higher", "prompts"),
    "psnr": ("PSNR dB", "higher", "fp"),
    "ssim": ("SSIM", "higher", "fp"),
    "lpips": ("LPIPS", "lower", "fp"),
    "fid_fp": ("FID vs FP", "lower", "fp"),
    "subject_consistency": ("subj.cons", "higher", "video"),
    "background_consistency": ("bg.cons", "higher", "video"),
    "temporal_flickering": ("flicker", "higher", "video"),
    "motion_smoothness": ("smooth", "higher", "video"),
    "dynamic_degree": ("dynamic", "compare", "video"),
    "model_mb": ("denoiser MB", "lower", "cost"),
    "latency_ratio": ("time/FP", "lower", "cost"),
}
FAMILY_TITLES = {"prompts": "vs prompts/dataset", "fp": "vs FP (same seeds)", "video": "video (VBench-style)",
                 "cost": "cost"}
ARROW = {"higher": "↑", "lower": "↓", "compare": "~FP"}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def format_table(rows: list[dict[str, Any]], n_samples: int | None = None) -> str:
    """Markdown table: one row per model ("name" key), columns grouped by metric family."""
    present = [k for k in METRICS if any(k in r for r in rows)]
    head = ["model"] + [f"{METRICS[k][0]} {ARROW[METRICS[k][1]]} ({FAMILY_TITLES[METRICS[k][2]]})" for k in present]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([str(r.get("name", "?")), *(_fmt(r.get(k)) for k in present)]) + " |")
    if n_samples is not None and any(k.startswith("fid") for k in present):
        lines.append(f"\nFID from {n_samples} samples per model (judge features): compare only at equal sample counts.")
    return "\n".join(lines)
