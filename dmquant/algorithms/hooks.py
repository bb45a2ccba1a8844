"""The one way recipe steps watch a calibration run: forward hooks that exist only during the run."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


def hooked_run(run: Callable[[], Any], hooks: list[tuple[nn.Module, Callable]]) -> None:
    """run() under no_grad with forward hooks (module, args, kwargs, output) removed afterwards."""
    handles = [m.register_forward_hook(h, with_kwargs=True) for m, h in hooks]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()


def output_tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors of a module output (tensor, tuple, or diffusers output dict), in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    return [t for v in values for t in output_tensors(v)]
