"""Per-channel activation statistics of quantized layers, collected by hooks in bounded memory.

For each layer: the running absmax of every input channel, and a uniform random sample of about
`samples` input positions (token rows; for convolutions, random spatial windows of their inputs) kept
as the bottom-k of random keys, so memory does not grow with the calibration set or the latent size.
With `buckets` > 1 both are kept per noise-level bucket (`dmquant.timestep.current_noise_level()`),
for timestep-aware smoothing.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..memory import release_freed_memory
from ..nn.qmodule import QuantModule
from ..timestep import current_noise_level


class ActivationStats:
    """Context manager: forward pre-hooks record each layer's input statistics, per noise bucket."""

    def __init__(self, layers: dict[str, QuantModule], samples: int = 256, buckets: int = 1, seed: int = 0) -> None:
        if buckets < 1 or samples < 1:
            raise ValueError(f"buckets and samples must be positive, got {buckets}, {samples}")
        self.layers, self.samples, self.buckets = layers, samples, buckets
        self.absmax: dict[str, dict[int, torch.Tensor]] = {n: {} for n in layers}
        self._kept: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {n: {} for n in layers}
        self._gen = torch.Generator().manual_seed(seed)
        self._handles: list[Any] = []

    def _bucket(self) -> int:
        if self.buckets == 1:
            return 0
        level = current_noise_level()
        if level is None:
            raise RuntimeError("timestep-aware statistics need the noise level of each denoiser call: "
                               "attach dmquant.timestep.attach_timestep_hook(denoiser) first")
        if math.isnan(level):
            raise ValueError("timestep-aware statistics need one timestep per denoiser call (got a mixed batch)")
        return min(max(int(level * self.buckets), 0), self.buckets - 1)

    def _hook(self, name: str) -> Callable:
        def hook(layer: QuantModule, args: tuple) -> None:
            x = args[0].detach()
            axis = layer.INPUT_AXIS % x.dim()
            b = self._bucket()
            amax = x.abs().amax(dim=[d for d in range(x.dim()) if d != axis]).float()
            old = self.absmax[name].get(b)
            self.absmax[name][b] = amax if old is None else torch.maximum(old, amax)
            units = x.reshape(-1, x.shape[-1]) if axis == x.dim() - 1 else self._crop(layer, x)
            cap = self.samples if units.dim() == 2 else max(1, math.ceil(self.samples / math.prod(units.shape[2:])))
            keys = torch.rand(units.shape[0], generator=self._gen)
            if b in self._kept[name]:
                old_keys, old_units = self._kept[name][b]
                keys, units = torch.cat([old_keys, keys]), torch.cat([old_units, units])
            keep = keys.topk(min(cap, keys.numel()), largest=False).indices
            self._kept[name][b] = (keys[keep], units[keep])
            del keys, units
            release_freed_memory()  # the concatenation, which would stay on the heap (dmquant.memory)

        return hook

    def _crop(self, layer: QuantModule, x: torch.Tensor) -> torch.Tensor:
        """A random spatial window of about `samples` output positions (plus the kernel's reach), so
        convolution samples stay small on large latents; the search compares the layer with itself on it."""
        nd = x.dim() - 2
        side = math.ceil(self.samples ** (1 / nd))
        for d, k in enumerate(layer.kernel_size):
            size = min(x.shape[2 + d], side + k - 1)
            start = int(torch.randint(x.shape[2 + d] - size + 1, (1,), generator=self._gen))
            x = x.narrow(2 + d, start, size)
        return x.contiguous()

    def sample(self, name: str) -> dict[int, torch.Tensor]:
        """{bucket: kept inputs} of a layer."""
        return {b: units for b, (_, units) in sorted(self._kept[name].items())}

    def __enter__(self) -> "ActivationStats":
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.layers.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
