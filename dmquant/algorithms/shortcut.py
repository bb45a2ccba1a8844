"""Shortcut splitting (Q-Diffusion): a UNet up-block resnet reads `cat([hidden, skip], dim=1)`, two
tensors with very different ranges; one activation scale for both wastes most of the grid on one
half. The step finds each concatenation's split point from the data (the up block's
`res_hidden_states_tuple`) and gives the resnet's conv1 / conv_shortcut input two static scales.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any, Callable

from torch import nn

from ..nn.qmodule import QuantModule

log = logging.getLogger(__name__)


class _Seen(Exception):
    """Stops the calibration run once one denoiser call has shown every split."""


def _skip_channels(block: nn.Module, args: tuple, kwargs: dict) -> list[int]:
    """Channels of the skip tensor each resnet of `block` concatenates, in resnet order."""
    params = list(inspect.signature(block.forward).parameters)
    skips = kwargs.get("res_hidden_states_tuple")
    if skips is None:
        skips = args[params.index("res_hidden_states_tuple")]
    return [skips[-(j + 1)].shape[1] for j in range(len(block.resnets))]


def split_shortcuts(modules: list[nn.Module], run: Callable[[], Any]) -> dict[str, int]:
    """Recipe step `split_shortcut`: {layer name: split channel} for every split static input."""
    splits: dict[str, int] = {}
    blocks = [(f"{i}.{n}", b) for i, m in enumerate(modules) for n, b in m.named_modules()
              if hasattr(b, "resnets") and "res_hidden_states_tuple" in inspect.signature(b.forward).parameters]
    if not blocks:
        log.warning("split_shortcut: no UNet up blocks with skip concatenations found")
        return splits

    def hook(name: str) -> Callable:
        def pre(block: nn.Module, args: tuple, kwargs: dict) -> None:
            for j, skip in enumerate(_skip_channels(block, args, kwargs)):
                resnet = block.resnets[j]
                for attr in ("conv1", "conv_shortcut"):
                    layer = getattr(resnet, attr, None)
                    q = getattr(layer, "input_quantizer", None) if isinstance(layer, QuantModule) else None
                    if q is not None and not q.spec.dynamic:
                        split = layer.in_channels - skip
                        q.set_split(split)
                        splits[f"{name}.resnets.{j}.{attr}"] = split
        return pre

    def stop(*_: Any) -> None:
        raise _Seen

    handles = [b.register_forward_pre_hook(hook(n), with_kwargs=True) for n, b in blocks]
    handles += [m.register_forward_hook(stop) for m in modules]
    try:
        with contextlib.suppress(_Seen):  # one denoiser call shows every split
            run()
    finally:
        for h in handles:
            h.remove()
    if not splits:
        log.warning("split_shortcut: skip concatenations found, but none feeds a static input quantizer")
    return splits
