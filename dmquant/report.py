"""`report(obj)`: per-layer formats and the model's bytes, as a readable table."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .api import quant_layers, quantized_components
from .nn.quantizer import TensorQuantizer
from .payload import extra_nbytes, weight_nbytes


@dataclass
class LayerRow:
    component: str
    name: str
    kind: str
    weight: str
    input: str
    params: int
    fp_bytes: int
    quant_bytes: int


@dataclass
class QuantReport:
    rows: list[LayerRow] = field(default_factory=list)
    fp_bytes: int = 0  # every parameter and buffer of the quantized components, unquantized
    quant_bytes: int = 0  # the same with quantized weights at their stored size

    @property
    def compression(self) -> float:
        return self.fp_bytes / max(self.quant_bytes, 1)

    def __str__(self) -> str:
        head = ("component", "layer", "type", "weight", "input", "params", "bytes fp", "bytes q")
        body = [(r.component, r.name, r.kind, r.weight, r.input, f"{r.params:,}", _mb(r.fp_bytes), _mb(r.quant_bytes))
                for r in self.rows]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
        out = [line(head), line("-" * w for w in widths), *map(line, body)]
        out.append(f"\n{len(self.rows)} quantized layers; model {_mb(self.fp_bytes)} -> {_mb(self.quant_bytes)} "
                   f"({self.compression:.2f}x smaller)")
        return "\n".join(out)


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _float_and_quantizer_bytes(module: nn.Module) -> tuple[int, int]:
    """Bytes of the float model (quantizer buffers excluded), and of activation-quantizer buffers
    (weight-quantizer scales are counted in each layer's stored payload instead)."""
    act = sum(_nbytes(q.buffers()) for n, q in module.named_modules()
              if isinstance(q, TensorQuantizer) and q.channel_axis is not None)
    weights = sum(_nbytes(q.buffers()) for q in module.modules()
                  if isinstance(q, TensorQuantizer) and q.channel_axis is None)
    return _nbytes(module.parameters()) + _nbytes(module.buffers()) - act - weights, act


def report(obj: Any) -> QuantReport:
    """Per-layer formats and sizes of every quantized component of `obj`."""
    rep = QuantReport()
    for path, module in quantized_components(obj).items():
        total, act_bytes = _float_and_quantizer_bytes(module)
        saved = extras = 0  # transform extras are counted in each layer's payload, not in the float model
        for name, layer in quant_layers(module).items():
            extras += extra_nbytes(layer)
            w = layer.weight
            fp, q = w.numel() * w.element_size(), weight_nbytes(layer)
            saved += fp - q
            spec = lambda s: s.short() if s is not None else "-"  # noqa: E731
            wq, iq = layer.weight_quantizer, layer.input_quantizer
            rep.rows.append(LayerRow(path, name, type(layer).__name__, spec(wq and wq.spec), spec(iq and iq.spec),
                                     w.numel(), fp, q))
        rep.fp_bytes += total - extras
        rep.quant_bytes += total - extras - saved + act_bytes
    if not rep.rows:
        raise ValueError("nothing quantized: call dmquant.quantize first")
    return rep
