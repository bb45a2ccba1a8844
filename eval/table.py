"""Readable results tables that keep the metric families apart: against the prompts/dataset (FID vs
real, CLIP score, adherence) and against the FP model's own samples on the same seeds (PSNR, SSIM,
LPIPS, FID vs FP), plus video and cost. Every column carries its direction (↑ higher is better).

>>> print(format_table([{"name": "FP", "adherence": 0.91}, {"name": "w8a8", "adherence": 0.9, "psnr": 31.2}], 64))
"""
from __future__ import annotations

from typing import Any

import torch

from .bootstrap import RESAMPLES, paired_ci, runs_interval, separated

# metric key -> (column title, "higher" / "lower" is better or "compare" with FP, family, decimals)
METRICS: dict[str, tuple[str, str, str, int]] = {
    "fid_real": ("FID vs real", "lower", "prompts", 3),
    "clip": ("CLIP score", "higher", "prompts", 2),
    "adherence": ("adherence", "higher", "prompts", 3),
    "psnr": ("PSNR dB", "higher", "fp", 2),
    "ssim": ("SSIM", "higher", "fp", 4),
    "lpips": ("LPIPS", "lower", "fp", 4),
    "fid_fp": ("FID vs FP", "lower", "fp", 3),
    "frame_psnr": ("frame PSNR dB", "higher", "fp", 2),
    "frame_ssim": ("frame SSIM", "higher", "fp", 4),
    "subject_consistency": ("subject cons.", "higher", "video", 4),
    "background_consistency": ("background cons.", "higher", "video", 4),
    "temporal_flickering": ("flicker score", "higher", "video", 4),
    "motion_smoothness": ("smoothness", "higher", "video", 4),
    "dynamic_degree": ("dynamic px/frame", "compare", "video", 3),
    "model_mb": ("denoiser MiB", "lower", "cost", 2),
    "layers": ("quantized layers", "info", "cost", 0),
    "latency_ratio": ("time / FP", "lower", "cost", 2),
    "calib_seconds": ("calibration s", "lower", "cost", 1),
}
FAMILY_TITLES = {"prompts": "vs prompts / dataset", "fp": "vs FP on the same seeds",
                 "video": "video (VBench-style, no reference)", "cost": "cost"}
ARROW = {"higher": "↑", "lower": "↓", "compare": "≈FP", "info": ""}


def _fmt(value: Any, decimals: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{decimals}f}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


def _cell(row: dict[str, Any], key: str, n_samples: int | None, lead: bool = False) -> str:
    """A value with its column's decimals, in bold when it leads its column, then its 95 % interval
    (`<key>_ci`); FID also shows its sample count (`<key>_n`, else n_samples)."""
    decimals = METRICS[key][3]
    text = _fmt(row.get(key), decimals)
    if lead and key in row:
        text = f"**{text}**"
    ci = row.get(f"{key}_ci")
    if ci is not None:
        text += f" [{_fmt(ci[0], decimals)}, {_fmt(ci[1], decimals)}]"
    n = row.get(f"{key}_n", n_samples)
    return f"{text} (n={n})" if key.startswith("fid") and key in row and n is not None else text


def leaders(rows: list[dict[str, Any]], key: str) -> set[int]:
    """Rows that lead a column: the best mean, and every row whose paired bootstrap interval of the
    difference to it contains 0 (not separable on these prompts). Empty without per-prompt values."""
    direction = METRICS[key][1]
    scored = [i for i, r in enumerate(rows) if key in r.get("per_prompt", {})]
    if direction not in ("higher", "lower") or len(scored) < 2:
        return set()
    sign = 1 if direction == "higher" else -1
    best = max(scored, key=lambda i: sign * rows[i][key])
    top = rows[best]["per_prompt"][key]
    return {best} | {i for i in scored if i != best and len(rows[i]["per_prompt"][key]) == len(top)
                     and not separated(paired_ci(rows[i]["per_prompt"][key], top))}


def table_sections(rows: list[dict[str, Any]], n_samples: int | None = None
                   ) -> list[tuple[str, list[str], list[list[str]]]]:
    """(family title, header, body) per metric family present; a model with no value in a family
    (FP in "vs FP") is left out of that family's table."""
    sections = []
    for family, title in FAMILY_TITLES.items():
        keys = [k for k, (_, _, fam, _) in METRICS.items() if fam == family and any(k in r for r in rows)]
        if not keys:
            continue
        lead = {k: leaders(rows, k) for k in keys}
        head = ["model"] + [f"{METRICS[k][0]} {ARROW[METRICS[k][1]]}".rstrip() for k in keys]
        body = [[str(r.get("name", "?"))] + [_cell(r, k, n_samples, i in lead[k]) for k in keys]
                for i, r in enumerate(rows) if any(k in r for k in keys)]
        sections.append((title, head, body))
    return sections


def _markdown(head: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(  # noqa: E731  (model column left, numbers right-aligned)
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    rule = "|" + "|".join(":" + "-" * (w + 1) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return [line(head), rule, *map(line, body)]


def format_table(rows: list[dict[str, Any]], n_samples: int | None = None) -> str:
    """Markdown, one aligned table per metric family (rows: dicts with "name" and metric keys)."""
    out: list[str] = []
    for title, head, body in table_sections(rows, n_samples):
        out += [f"**{title}**", "", *_markdown(head, body), ""]
    if any(k.endswith("_ci") for r in rows for k in r):
        out.append(f"[lo, hi]: 95 % percentile bootstrap interval over prompts ({RESAMPLES} resamples). **Bold**: "
                   "the best value of a column and every value whose paired interval of the difference to it "
                   "contains 0: not separable on these prompts.")
    if any(k.startswith("fid") for r in rows for k in r):
        out.append("FID needs many samples: compare values only at equal n (and with the same extractor).")
    return "\n".join(out).rstrip() + "\n"


def compare_rows(rows: list[dict[str, Any]], a: str, b: str, keys: list[str] | None = None) -> str:
    """Markdown table of `a` minus `b` per metric, with the paired bootstrap interval over prompts and
    whether it separates them: the evidence behind a sentence like "a beats b" (or "cannot tell").

    `a` and `b` may each name several rows ("x,x-seed1,x-seed2"), one per calibration run of a recipe:
    the prompt-paired interval is then that of the run-averaged per-prompt values, a second interval
    treats each run as one observation (`runs_interval`), and a difference is stated only where both
    separate it the same way."""
    names = [str(r.get("name")) for r in rows]
    by_name = dict(zip(names, rows))
    runs_a, runs_b = ([n.strip() for n in x.split(",") if n.strip()] for x in (a, b))
    missing = [n for n in (*runs_a, *runs_b) if n not in by_name]
    if missing:
        raise ValueError(f"no row named {', '.join(missing)}; rows: {', '.join(by_name)}")
    twice = [n for n in (*runs_a, *runs_b) if names.count(n) > 1]
    if twice:
        raise ValueError(f"{', '.join(twice)} names more than one row: compare results of one evaluation")
    runs = len(runs_a) > 1
    if runs != (len(runs_b) > 1):
        raise ValueError("give one row of each side, or at least 2 calibration runs of each: an interval over "
                         f"runs cannot be formed from {len(runs_a)} and {len(runs_b)}")
    per_prompt = [by_name[n].get("per_prompt", {}) for n in (*runs_a, *runs_b)]
    shared = [k for k in METRICS if all(k in p for p in per_prompt)]
    keys = [k.strip() for k in keys] if keys else shared
    if not keys:
        raise ValueError(f"{a} and {b} share no metric with per-prompt values: nothing to compare")
    unknown = [k for k in keys if k not in shared]
    if unknown:
        have = ", ".join(shared) or "none"
        raise ValueError(f"{', '.join(unknown)}: no per-prompt values in every row (have: {have})")
    body = []
    for k in keys:
        decimals = METRICS[k][3] + 1
        va, vb = ([by_name[n]["per_prompt"][k] for n in side] for side in (runs_a, runs_b))
        if len({len(v) for v in (*va, *vb)}) > 1:
            raise ValueError(f"{k}: the rows score different numbers of prompts: compare evaluations of the same "
                             "prompts")
        pa, pb = (torch.tensor(v, dtype=torch.float64) for v in (va, vb))  # (runs, prompts)
        intervals = [paired_ci(pa.mean(0), pb.mean(0))]
        if runs:
            intervals.append(runs_interval(pa.mean(1).tolist(), pb.mean(1).tolist()))
        signs = {lo > 0 for lo, _ in intervals}  # all positive or all negative, once all separate
        direction = METRICS[k][1]
        if not all(map(separated, intervals)) or len(signs) > 1:
            verdict = "not separable"
        elif direction in ("higher", "lower"):
            verdict = f"{a if signs.pop() == (direction == 'higher') else b} better"
        else:
            verdict = "different"
        mean_a = sum(by_name[n][k] for n in runs_a) / len(runs_a)
        mean_b = sum(by_name[n][k] for n in runs_b) / len(runs_b)
        body.append([METRICS[k][0], _fmt(mean_a, decimals), _fmt(mean_b, decimals), _fmt(mean_a - mean_b, decimals),
                     *(f"[{_fmt(lo, decimals)}, {_fmt(hi, decimals)}]" for lo, hi in intervals), verdict])
    head = ["metric", a, b, f"{a} - {b}", "paired 95 % interval",
            *([f"95 % over runs ({len(runs_a)} vs {len(runs_b)}, Welch)"] if runs else []), "verdict"]
    return "\n".join(_markdown(head, body)) + "\n"
