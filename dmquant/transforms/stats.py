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
        # layer's kept rows instead of a copy of their own (`_shares`)
        self._alias: dict[str, str] = {}  # layer -> the layer whose rows it shares
        self._snap: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}  # its rows as of its last call
        self._calls: dict[str, int] = {}  # calls of each layer that keeps its own rows
        self._synced: dict[str, int] = {}  # the owner's call count at a sharer's last call
        self._last: tuple[weakref.ref, int, str, int] | None = None  # (input, its version, owner, bucket)

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
            keys = torch.rand(units.shape[0], generator=self._gen)  # drawn even when shared: the other
            # layers' samples then do not depend on which layers share
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
        """Whether `name` takes the rows the layer hooked just before kept of this very input (same tensor,
        unmodified, same bucket), recording nothing of its own. Decided at a layer's first call, and kept
        only while every call of that owner is followed by one of this layer on the same input; once
        they part, the layer goes on with its own rows, starting from those of the calls it shared."""
        last, owner = self._last, self._alias.get(name)
        same = last is not None and last[0]() is src and last[1] == src._version and last[3] == bucket
        if owner is None and same and not self._kept[name] and last[2] != name:
            owner = self._alias[name] = last[2]
            self._synced[name] = self._calls[owner] - 1
        if owner is not None:
            if same and last[2] == owner and self._calls[owner] == self._synced[name] + 1:
                self._synced[name] = self._calls[owner]
                self._snap[name] = dict(self._kept[owner])  # the same tensors, no copy
            else:
                self._kept[name] = self._snap.pop(name, {})
                del self._alias[name], self._synced[name]
                owner = None
        if owner is None:
            self._calls[name] = self._calls.get(name, 0) + 1
        self._last = (weakref.ref(src), src._version, owner or name, bucket)
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
        kept = self._snap[name] if name in self._alias else self._kept[name]
        return {b: units for b, (_, units) in sorted(kept.items())}

    def release(self, name: str) -> None:
        """Drop a layer's kept inputs (its absmax stays): a search frees each group's once it is done,
        so the largest later transients do not sit on top of every layer's samples. Rows another layer
        shares stay until that layer is released too."""
        self._kept[name], self._snap[name] = {}, {}

    def __enter__(self) -> "ActivationStats":
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.layers.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
