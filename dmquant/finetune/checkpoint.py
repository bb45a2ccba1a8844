"""Atomic safetensors training checkpoints (nothing executes on load): trainable tensors, Adam
moments, the step and the seed.

Batches are a function of (seed, step), so the step, the trainables and the optimizer state are all a
resumed run needs to continue exactly as the uninterrupted one. Written as one safetensors file to a
temporary sibling, then `os.replace`d: a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _layout(tensors: dict[str, torch.Tensor]) -> str:
    return json.dumps({k: list(v.shape) for k, v in sorted(tensors.items())})


def save_checkpoint(path: Path, step: int, seed: int, params: dict[str, torch.Tensor],
                    buffers: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    """Write the state after `step` optimizer steps (atomically)."""
    tensors = {f"param/{k}": v.detach().contiguous() for k, v in params.items()}
    tensors.update({f"buffer/{k}": v.detach().contiguous() for k, v in buffers.items()})
    for name, p in params.items():
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"adam/{name}/{key}"] = torch.as_tensor(value).detach().contiguous()
    meta = {"step": str(step), "seed": str(seed), "layout": _layout({**params, **buffers})}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path, seed: int, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer) -> int:
    """Restore the tensors and Adam state in place; returns the number of steps already taken.
    Refuses a checkpoint of another seed or another set of trainables (a resumed run would diverge)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("seed") != str(seed) or meta.get("layout") != _layout({**params, **buffers}):
        raise ValueError(f"checkpoint {path} belongs to another run (seed or trainable tensors differ); "
                         "delete it or pass resume=False")
    data = load_file(str(path))
    with torch.no_grad():
        for k, v in {**params, **buffers}.items():
            v.copy_(data[f"{'param' if k in params else 'buffer'}/{k}"])
    for name, p in params.items():
        state = {key.rsplit("/", 1)[1]: value for key, value in data.items() if key.startswith(f"adam/{name}/")}
        if state:
            optimizer.state[p] = state
    return int(meta["step"])
