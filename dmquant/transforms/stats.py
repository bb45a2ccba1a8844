"""Per-channel activation statistics of quantized layers, collected by hooks in bounded memory.

For each layer: the running absmax of every input channel, and a uniform random sample of about
`samples` input positions (token rows; for convolutions, random spatial windows of their inputs) kept
as the bottom-k of random keys, so memory does not grow with the calibration set or the latent size.
With `buckets` > 1 both are kept per noise-level bucket (`dmquant.timestep.current_noise_level()`),
for timestep-aware smoothing.
"""
from __future__ import annotations

import math
import weakref
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
        # linears fed the very same tensor as the linear hooked just before (q, k and v) share that
        # layer's kept rows instead of a copy of their own: (input, owner, bucket) of the last hook
        self._alias: dict[str, str] = {}
        self._last: tuple[weakref.ref, str, int] | None = None

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
            if units.dim() == 2 and self._shares(name, args[0], b):
                return
            if b in self._kept[name]:
                old_keys, old_units = self._kept[name][b]
                keys, units = torch.cat([old_keys, keys]), torch.cat([old_units, units])
            keep = keys.topk(min(cap, keys.numel()), largest=False).indices
            self._kept[name][b] = (keys[keep], units[keep])
            del keys, units
            release_freed_memory()  # the concatenation, which would stay on the heap (dmquant.memory)

        return hook

    def _shares(self, name: str, src: torch.Tensor, bucket: int) -> bool:
        """Whether `name` reads its rows from the layer whose input `src` also was (recording nothing of
        its own). Decided at a layer's first call; a later call with another input ends the sharing
        (the layer then keeps a copy of the rows so far, a valid sample of its own inputs, and goes on)."""
        last, owner = self._last, self._alias.get(name)
        same = last is not None and last[0]() is src and last[2] == bucket
        if owner is None and same and not self._kept[name] and last[1] != name:
            owner = self._alias[name] = last[1]
        elif owner is not None and not (same and last[1] == owner):
            self._kept[name] = dict(self._kept[owner])
            del self._alias[name]
            owner = None
        self._last = (weakref.ref(src), owner or name, bucket)
        return owner is not None

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
        kept = self._kept[self._alias.get(name, name)]
        return {b: units for b, (_, units) in sorted(kept.items())}

    def release(self, name: str) -> None:
        """Drop a layer's kept inputs (its absmax stays): a search frees each group's once it is done,
        so the largest later transients do not sit on top of every layer's samples. Rows another layer
        shares stay until that layer is released too."""
        owner = self._alias.pop(name, None)
        if owner is None and name in self._alias.values():  # hand the rows to one of the sharers
            heir = next(n for n, o in self._alias.items() if o == name)
            self._kept[heir] = self._kept[name]
            for n, o in list(self._alias.items()):
                if o == name:
                    self._alias[n] = heir
            del self._alias[heir]
        self._kept[name] = {}

    def __enter__(self) -> "ActivationStats":
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.layers.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
