"""Per-layer sensitivity on the recorded float trajectory: the output change when only that layer is
quantized, per candidate weight format and per timestep group, in two decoupled metrics (MixDQ).

quality[l, c, g] = mean over the calls of group g of |eps_q - eps_fp|^2 / |eps_fp|^2 (the relative
MSE of the noise prediction, additive across layers to first order: what the allocation sums), and
content[l, c, g] the same relative change of content features (`dmquant.mixed.content`).

Memory stays bounded: one layer at a time is swapped for its quantized form, which shares the float
parameters (`from_float`), and swapped back; only the float outputs of the recorded calls are kept.
A `Sensitivity` saves to safetensors + JSON; `dmquant.mixed.search` (flow.py) caches it under a key of the
model's weights, the calibration settings, the candidates and the metrics, so a second budget costs
only the integer program.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..components import set_path
from ..config import QuantSpec
from ..nn import quant_class_for
from .candidates import Candidate, quantizable_layers, weight_nbytes
from .content import ContentFn

log = logging.getLogger(__name__)
FORMAT = 1


@dataclass
class Sensitivity:
    """Measured sensitivities (float64, shape (layers, candidates, timestep groups)) and sizes."""

    layers: list[str]
    candidates: list[str]
    groups: list[tuple[float, float]]  # noise-level range of each timestep group
    quality: torch.Tensor
    content: torch.Tensor | None
    nbytes: torch.Tensor  # (layers, candidates) stored weight bytes
    params: list[int]
    fixed_bytes: int = 0  # the rest of the model: parameters and buffers outside the candidate layers
    meta: dict[str, Any] = field(default_factory=dict)

    def cost(self, content_weight: float = 1.0) -> torch.Tensor:
        """(layers, candidates) objective for the allocation: each metric, averaged over timestep
        groups, in units of its total at the most aggressive candidate (so both count comparably)."""
        total = self._normalised(self.quality)
        if self.content is not None and content_weight:
            total = total + content_weight * self._normalised(self.content)
        return total

    def _normalised(self, metric: torch.Tensor) -> torch.Tensor:
        per_layer = metric.mean(-1)
        scale = per_layer.max(1).values.sum()
        return per_layer / scale if scale > 0 else per_layer

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"quality": self.quality, "nbytes": self.nbytes}
        if self.content is not None:
            tensors["content"] = self.content
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path.with_suffix(".safetensors")))
        info = {"format": FORMAT, "layers": self.layers, "candidates": self.candidates, "groups": self.groups,
                "params": self.params, "fixed_bytes": self.fixed_bytes, "meta": self.meta}
        path.with_suffix(".json").write_text(json.dumps(info, indent=1))

    @classmethod
    def load(cls, path: Path) -> Sensitivity:
        info = json.loads(path.with_suffix(".json").read_text())
        if info.get("format") != FORMAT:
            raise ValueError(f"{path}: sensitivity cache format {info.get('format')} is not {FORMAT}")
        t = load_file(str(path.with_suffix(".safetensors")))
        return cls(info["layers"], info["candidates"], [tuple(g) for g in info["groups"]], t["quality"],
                   t.get("content"), t["nbytes"], info["params"], info["fixed_bytes"], info["meta"])


def denoiser_output(output: Any, channels: int) -> torch.Tensor:
    """The noise prediction: first output, first `channels` channels (PixArt also predicts variance)."""
    out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
    return out[:, :channels]


def latent_input(kwargs: dict[str, Any]) -> torch.Tensor:
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.dim() >= 4)


def timestep_groups(levels: list[float], groups: int) -> list[list[float]]:
    """Distinct noise levels split into `groups` contiguous runs of (nearly) equal count."""
    distinct = sorted(set(levels))
    groups = max(1, min(groups, len(distinct)))
    size, extra = divmod(len(distinct), groups)
    out, start = [], 0
    for g in range(groups):
        end = start + size + (g < extra)
        out.append(distinct[start:end])
        start = end
    return out


def fingerprint(*parts: Any) -> str:
    """sha256 over tensors (their bytes) and JSON-able values, nested in lists/tuples/dicts."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            h.update(str((x.dtype, tuple(x.shape))).encode())
            h.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x):
                h.update(str(k).encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                feed(v)
        else:
            h.update(json.dumps(x, default=str).encode())

    for p in parts:
        feed(p)
    return h.hexdigest()[:16]


def measure(model: nn.Module, trajectory: Any, candidates: list[Candidate], input_spec: QuantSpec | None,
            *, layers: list[str] | None = None, groups: int = 4, content: ContentFn | None = None,
            content_name: str = "none", progress: bool = True) -> Sensitivity:
    """Sensitivity of every layer (default: all quantizable ones) of a float denoiser `model` to each
    candidate, replaying `trajectory` (a `dmquant.calibration.Trajectory`).

    `input_spec` quantizes the layer's input alongside its weight (dynamic specs only: a static scale
    would need its own calibration per candidate); FP candidates cost nothing and measure zero."""
    if input_spec is not None and not input_spec.dynamic:
        raise ValueError("sensitivity is measured with dynamic activation quantization; the base recipe's "
                         f"input spec {input_spec.short()} is static: use a dynamic spec for the search")
    if not trajectory.calls:
        raise ValueError("the trajectory has no recorded calls")
    found = quantizable_layers(model)
    names = list(found) if layers is None else layers
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"not quantizable layers of {type(model).__name__}: {missing[:5]}")
    runs = timestep_groups([c.noise_level for c in trajectory.calls], groups)
    group_of = {lvl: g for g, run in enumerate(runs) for lvl in run}
    call_groups = [group_of[c.noise_level] for c in trajectory.calls]
    counts = torch.bincount(torch.tensor(call_groups), minlength=len(runs)).double()
    refs = [_outputs(model, call, trajectory.timestep_kwarg, content) for call in trajectory.calls]

    quality = torch.zeros(len(names), len(candidates), len(runs), dtype=torch.float64)
    content_t = torch.zeros_like(quality) if content is not None else None
    for li, name in enumerate(tqdm(names, desc="sensitivity", unit="layer", disable=not progress)):
        layer = model.get_submodule(name)
        for ci, cand in enumerate(candidates):
            if cand.weight is None:
                continue
            quantized = quant_class_for(layer).from_float(layer, cand.weight, input_spec, "fake", name)
            set_path(model, name, quantized)
            try:
                for call, g, (eps_fp, feat_fp) in zip(trajectory.calls, call_groups, refs):
                    eps, feat = _outputs(model, call, trajectory.timestep_kwarg, content)
                    quality[li, ci, g] += _relative(eps, eps_fp) / counts[g]
                    if content_t is not None:
                        content_t[li, ci, g] += _relative(feat, feat_fp) / counts[g]
            finally:
                set_path(model, name, layer)
    nbytes = torch.tensor([[weight_nbytes(tuple(found[n].weight.shape), c.weight, found[n].weight.element_size())
                            for c in candidates] for n in names], dtype=torch.int64)
    layer_params = {id(p) for n in names for p in found[n].parameters()}
    fixed = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in layer_params)
    fixed += sum(b.numel() * b.element_size() for b in model.buffers())
    fixed += sum(b.numel() * b.element_size() for n in names if found[n].bias is not None for b in (found[n].bias,))
    result = Sensitivity(names, [c.name for c in candidates], [(r[0], r[-1]) for r in runs], quality, content_t,
                         nbytes, [found[n].weight.numel() for n in names], fixed,
                         {"calls": len(trajectory.calls), "content": content_name,
                          "input": input_spec and input_spec.short()})
    return result


@torch.no_grad()
def _outputs(model: nn.Module, call: Any, timestep_kwarg: str, content: ContentFn | None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = latent_input(call.kwargs)
    eps = denoiser_output(model(**call.kwargs), x.shape[1]).double()
    feat = content(x, eps, call.kwargs[timestep_kwarg]) if content is not None else None
    return eps, feat


def _relative(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-300))
