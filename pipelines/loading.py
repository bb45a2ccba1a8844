"""`load(name_or_path)`: miniatures, tiny test pipelines, saved dmquant checkpoints, local diffusers
folders and hub ids already in the user's cache. Never downloads: missing weights are a clear error."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from dmquant.families import family_of

from .generate import with_call_defaults
from .miniature import NAMES, WEIGHTS
from .tiny import BUILDERS, build_tiny_pipeline

TINY_PREFIX = "tiny-"


def available() -> list[str]:
    """Names `load` understands without a path."""
    return [*NAMES, *(TINY_PREFIX + f for f in BUILDERS)]


def load(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32,
         device: str | torch.device = "cpu") -> Any:
    """A diffusers pipeline by miniature/tiny name or from disk/cache (local files only)."""
    from diffusers import DiffusionPipeline

    key = str(name_or_path)
    if key in NAMES:
        folder = WEIGHTS / key
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"weights of {key} are missing in {folder}: "
                                    "run `python scripts/train_miniatures.py --only " + key + "`")
        pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    elif key.startswith(TINY_PREFIX):
        pipe = build_tiny_pipeline(key[len(TINY_PREFIX):])
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    elif (Path(key) / "quantization.json").is_file():
        from dmquant.serialization import load_quantized

        return with_call_defaults(load_quantized(key, device=device))
    elif Path(key).is_dir():
        index = Path(key) / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{key} is not a diffusers pipeline folder (no model_index.json)")
        family_of(json.loads(index.read_text())["_class_name"])  # unsupported families fail early, clearly
        pipe = DiffusionPipeline.from_pretrained(key, torch_dtype=dtype, local_files_only=True)
    else:
        pipe = _from_cache(key, dtype)
    family_of(pipe)
    pipe.set_progress_bar_config(disable=True)
    return with_call_defaults(pipe.to(device))  # pipe("a prompt") at the model's own sizes


def _from_cache(repo_id: str, dtype: torch.dtype) -> Any:
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(repo_id, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"{repo_id!r} is not a built-in name ({', '.join(available())}), a local folder, or a pipeline "
            "in the Hugging Face cache (HF_HOME / HF_HUB_CACHE); dmquant never downloads weights: "
            "download them yourself or pass a local path"
        ) from err
