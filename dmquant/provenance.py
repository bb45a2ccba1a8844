"""Provenance: everything needed to reproduce a quantized model's numbers."""
from __future__ import annotations

import datetime as _dt
import importlib.metadata as md
import platform
from typing import Any

import torch

from .config import Recipe

_PACKAGES = ("dmquant", "torch", "diffusers", "transformers", "safetensors")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def provenance(recipe: Recipe, calibration: Any = None, seed: int | None = None) -> dict[str, Any]:
    return {
        "recipe": recipe.name,
        "config_hash": recipe.config_hash(),
        "seed": torch.initial_seed() if seed is None else seed,
        "calibration": calibration,
        "versions": library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
