"""TFMQ-DM's temporal information aware reconstruction (TIAR): adaround's argument `temporal`.

The temporal layers (time-embedding MLP, every block's time_emb_proj: `dmquant.families` role
`temporal`) see the timestep alone, so over a sampling run their outputs form a finite set, one per
visited timestep. TIAR rounds all their weights together (AdaRound) so that the quantized temporal
features, the outputs of every outermost temporal module (what the blocks consume), match the float
ones at every visited timestep (`Trajectory.timestep_calls`, one row each). Block reconstruction
cannot do this: it splits the path (a time_emb_proj sits inside its resnet block, rounded against that
block's output on the kept steps only, the time embedding alone against its own output).

The optimisation is BRECQ's (`reconstruction.reconstruct_units`) on one unit, the denoiser run up to
its last temporal module, before the blocks and in the same step: the blocks' quantized passes see the
quantized temporal features, their float references the float ones (the one write-back comes last).
A step of its own would write its weights back first, and the blocks would then be matched to a
reference already carrying the temporal rounding error.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .hooks import output_tensors
from .temporal import temporal_layers
from .units import Unit

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised once every temporal module has run: the rest of the denoiser does not change them."""


class TemporalFeatures(nn.Module):
    """A denoiser call -> its temporal features: the outputs of `heads` (the outermost temporal modules)
    in the order they run. The forward stops as soon as each head has run once."""

    def __init__(self, denoiser: nn.Module, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        self.denoiser, self.heads = denoiser, list(heads)  # a plain list: the heads are the denoiser's
        self.train(denoiser.training)  # reconstruction restores this mode on the denoiser afterwards

    def forward(self, **kwargs: Any) -> list[torch.Tensor]:
        outputs: list[torch.Tensor] = []
        pending = set(map(id, self.heads))

        def hook(module: nn.Module, _args: tuple, output: Any) -> None:
            outputs.extend(output_tensors(output))
            pending.discard(id(module))
            if not pending:
                raise _Stop

        handles = [h.register_forward_hook(hook) for h in self.heads]
        try:
            self.denoiser(**kwargs)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return outputs


def temporal_heads(denoiser: nn.Module, pattern: str) -> dict[str, nn.Module]:
    """{name: module} of the outermost modules whose name matches `pattern` (pre-order, so an ancestor
    such as `time_embedding` hides its `linear_1`)."""
    rx, heads = re.compile(pattern), {}
    for name, module in denoiser.named_modules():
        if name and rx.search(name) and not any(name.startswith(h + ".") for h in heads):
            heads[name] = module
    return heads


def _first_row(kwargs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The call cut to its first batch row, on `device` (the batch size: the leading dim of the first
    tensor of 3 or more dims, latents or text embeddings): every row has the same temporal features."""
    batch = next(v.shape[0] for v in kwargs.values() if isinstance(v, torch.Tensor) and v.dim() >= 3)

    def cut(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return (obj[:1] if obj.dim() and obj.shape[0] == batch else obj).to(device)
        return {k: cut(v) for k, v in obj.items()} if isinstance(obj, dict) else obj

    return cut(kwargs)


def temporal_group(denoiser: nn.Module, trajectory: Any, pattern: str) -> tuple[list[Unit], Callable[[], None]]:
    """TIAR's group for `reconstruct_units`: one unit, the temporal path with its weight-quantized layers
    matching `pattern`, fed one row per timestep the sampler visits (`trajectory`: the recorded one)."""
    if trajectory is None or not trajectory.calls:
        raise ValueError("TIAR (adaround's `temporal`) needs the recorded denoiser trajectory: quantize a pipeline "
                         "(calibration=None, a dict or a CalibrationSet), not a plain callable")
    layers = {f"0.{n}": m for n, m in temporal_layers(denoiser, pattern).items()
              if m.weight_quantizer is not None and m.weight_quantizer.enabled}
    if not layers:
        log.warning("TIAR: no weight-quantized temporal layer matches %r", pattern)
    features = TemporalFeatures(denoiser, list(temporal_heads(denoiser, pattern).values()))
    device = next(denoiser.parameters()).device
    calls = [_first_row(c.kwargs, device) for c in trajectory.timestep_calls()]

    def replay() -> None:
        for kwargs in calls:
            features(**kwargs)

    return ([Unit("0.temporal", features, layers)] if layers else []), replay
