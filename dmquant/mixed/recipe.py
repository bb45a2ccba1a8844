"""An allocation as an ordinary recipe: the base recipe's specs and steps, every layer the search left
in full precision excluded by exact name, every other candidate an exact-name weight override.

Nothing here is dmquant-specific beyond the recipe schema: the YAML lists `^name$` patterns, so any
tool reading the file sees which layer gets which format.
"""
from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import QuantSpec, Recipe
from .allocate import Allocation
from .candidates import FP, Candidate
from .sensitivity import Sensitivity


def exact(name: str) -> str:
    return f"^{re.escape(name)}$"


def build_recipe(base: Recipe, allocation: Allocation, candidates: list[Candidate], all_layers: list[str],
                 name: str, description: str = "") -> Recipe:
    """`base` with the allocation applied. Layers of the model that were not searched stay FP."""
    specs = {c.name: c.weight for c in candidates}
    excluded = [n for n in all_layers if allocation.choice.get(n, FP) == FP]
    overrides = [{"pattern": exact(n), "weight": _spec_dict(specs[c])}
                 for n, c in allocation.choice.items() if c != FP and specs[c] != base.weight]
    data = base.to_dict()
    data.update(name=name, description=description or base.description, exclude=[exact(n) for n in excluded],
                include_roles=[], overrides=[*data.get("overrides", []), *overrides])  # exact names replace roles
    return Recipe.from_dict(data)


def _spec_dict(spec: QuantSpec) -> dict[str, Any]:
    """Only the fields that differ from QuantSpec's defaults (short, readable YAML)."""
    out = {"format": spec.format}
    for f in fields(QuantSpec):
        value = getattr(spec, f.name)
        if f.name != "format" and value != f.default:
            out[f.name] = value
    return out


def recipe_yaml(recipe: Recipe, header: str = "") -> str:
    """YAML text of a recipe that `dmquant.recipes.load_recipe_file` reads back to an equal Recipe."""
    data = recipe.to_dict()
    for key in ("weight", "input"):
        if data.get(key) is not None:
            data[key] = _spec_dict(getattr(recipe, key))
    data["overrides"] = [{k: (_spec_dict(getattr(o, k)) if k in ("weight", "input") else v)
                          for k, v in d.items() if v is not None and not (k == "skip" and v is False)}
                         for o, d in zip(recipe.overrides, data["overrides"])]
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + yaml.safe_dump(data, sort_keys=False, width=120)


def write_recipe(recipe: Recipe, path: str | Path, header: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(recipe_yaml(recipe, header))
    return path


def suggest_exclude(sens: Sensitivity, candidate: str, factor: float = 10.0) -> list[str]:
    """Layers whose sensitivity to `candidate` is at least `factor` x the median layer's: what a
    default skip list for this model should hold (the measurement's answer, not a hand-written one)."""
    if candidate not in sens.candidates:
        raise ValueError(f"candidate {candidate!r} was not measured; measured: {sens.candidates}")
    per_layer = sens.cost()[:, sens.candidates.index(candidate)]
    median = per_layer.median()
    if median <= 0:
        return []
    return [n for n, v in zip(sens.layers, per_layer) if v >= factor * median]


def save_heatmap(sens: Sensitivity, path: str | Path, candidate: str, allocation: Allocation | None = None) -> Path:
    """PNG: log10 relative output error of each layer (rows) per timestep group (columns) when only
    it is quantized to `candidate`, the content metric beside it, and the chosen format per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ci = sens.candidates.index(candidate)
    panels = [("quality: rel. eps MSE", sens.quality[:, ci])]
    if sens.content is not None:
        panels.append(("content: rel. feature change", sens.content[:, ci]))
    height = max(4.0, 0.16 * len(sens.layers) + 1.5)
    width_ratios = [len(sens.groups)] * len(panels) + ([1.2] if allocation else [])
    fig, axes = plt.subplots(1, len(width_ratios), figsize=(3.2 * len(width_ratios) + 3, height),
                             gridspec_kw={"width_ratios": width_ratios}, squeeze=False)
    labels = [f"{lo:.2f}-{hi:.2f}" for lo, hi in sens.groups]
    for ax, (title, values) in zip(axes[0], panels):
        image = ax.imshow(torch.log10(values.clamp_min(1e-12)).numpy(), aspect="auto", cmap="magma")
        ax.set_title(f"{title}\n({candidate}, log10)", fontsize=8)
        ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize=6)
        ax.set_xlabel("noise level t/T", fontsize=7)
        ax.set_yticks(range(len(sens.layers)), sens.layers if ax is axes[0][0] else [], fontsize=5)
        fig.colorbar(image, ax=ax, fraction=0.05)
    if allocation is not None:
        ax = axes[0][-1]
        order = {c: i for i, c in enumerate(sens.candidates)}
        picks = torch.tensor([[order[allocation.choice[n]]] for n in sens.layers], dtype=torch.float32)
        ax.imshow(picks.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=len(sens.candidates) - 1)
        for i, n in enumerate(sens.layers):
            ax.text(0, i, allocation.choice[n], ha="center", va="center", fontsize=4, color="white")
        ax.set_title(f"chosen\n{allocation.average_bits:.2f} bits", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
