"""QDrop (Wei et al. 2022) for the fine-tuning loop: while the student trains, each activation element
(layer inputs, and attention Q/K/V/probabilities where those are quantized) skips its quantizer with
probability `p`, so the weights and step sizes are fitted to a mix of
quantized and float inputs.

Why: fitting the recorded calls with every activation quantized lets the adapters and step sizes
specialise to the exact rounding noise of those calls; the paper shows that randomly dropping the
activation quantization trains towards a flatter optimum that holds on inputs the calibration never
saw (here: the quantized model's own trajectory). Evaluation and the merged model always quantize.
The mask of call `i` at step `step` depends on (seed, step, i) alone, so a resumed run, or a batch
split over processes, draws the same masks.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..nn.quantizer import TensorQuantizer


class QDrop:
    """Forward hooks on activation quantizers mixing their output with their input while `call` is open."""

    def __init__(self, quantizers: list[TensorQuantizer], p: float, seed: int) -> None:
        self.p, self.seed = p, seed
        self._call_seed: int | None = None
        self._gens: dict[torch.device, torch.Generator] = {}
        self._handles = [q.register_forward_hook(self._mix) for q in quantizers] if p > 0 else []

    def _mix(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if self._call_seed is None or not isinstance(out, torch.Tensor) or out is args[0]:
            return None  # outside a training call, or the quantizer passed its input through
        x = args[0]
        if x.device not in self._gens:  # one generator per device, seeded when the call first uses it
            self._gens[x.device] = torch.Generator(device=x.device).manual_seed(self._call_seed)
        keep_float = torch.rand(x.shape, generator=self._gens[x.device], device=x.device) < self.p
        return torch.where(keep_float, x, out)

    @contextlib.contextmanager
    def call(self, step: int, index: int) -> Iterator[None]:
        """Inside: the student's forward on call `index` of optimizer step `step` drops quantization."""
        if not self._handles:
            yield
            return
        self._call_seed = (self.seed * 1_000_003 + step) * 1_000_003 + index
        try:
            yield
        finally:
            self._call_seed, self._gens = None, {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
