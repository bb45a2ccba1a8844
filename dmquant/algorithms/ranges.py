"""The recipe step `ranges`: freeze static activation scales at a chosen point of a recipe."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..observe import observing


def calibrate_ranges(modules: list[nn.Module], run: Callable[[], Any]) -> dict[str, int]:
    """Freeze the static activation scales still missing now (e.g. before a step that trains them);
    scales an earlier step set (temporal layers) are kept."""
    with observing(*modules, uncalibrated_only=True) as quantizers:
        run()
    return {"calibrated": len(quantizers)}
