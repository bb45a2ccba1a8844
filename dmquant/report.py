"""`report(obj)`: per-layer formats, the kernel each layer runs, and the model's bytes, as a table."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .observe import activation_quantizers
from .payload import extra_nbytes, weight_nbytes
from .state import quant_layers, quantized_components


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
    kernel: str = ""


@dataclass
class QuantReport:
    rows: list[LayerRow] = field(default_factory=list)
    fp_bytes: int = 0  # every parameter and buffer of the quantized components, unquantized
    quant_bytes: int = 0  # the same with quantized weights at their stored size

    @property
    def compression(self) -> float:
        return self.fp_bytes / max(self.quant_bytes, 1)

    def kernels(self) -> dict[str, int]:
        """How many layers run on each kernel (or simulated, with the reason)."""
        counts: dict[str, int] = {}
        for r in self.rows:
            counts[r.kernel] = counts.get(r.kernel, 0) + 1
        return counts

    def summary(self) -> str:
        """Totals and the kernel count lines (the table's footer)."""
        out = [f"{len(self.rows)} quantized layers; model {_mb(self.fp_bytes)} -> {_mb(self.quant_bytes)} "
               f"({self.compression:.2f}x smaller)"]
        out += [f"  {n:4d} x {k}" for k, n in self.kernels().items()]
        if any(k.startswith("simulated") for k in self.kernels()):
            out.append("simulated layers decode their packed weights on every call: slower than the float model "
                       "(memory is saved, speed is not); dmquant.kernels lists what runs on a kernel")
        return "\n".join(out)

    def __str__(self) -> str:
        head = ("component", "layer", "type", "weight", "input", "params", "bytes fp", "bytes q", "kernel")
        body = [(r.component, r.name, r.kind, r.weight, r.input, f"{r.params:,}", _mb(r.fp_bytes), _mb(r.quant_bytes),
                 r.kernel) for r in self.rows]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        return "\n".join([line(head), line("-" * w for w in widths), *map(line, body), "", self.summary()])


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _held_bytes(module: nn.Module) -> tuple[int, int]:
    """Bytes the component holds outside its quantized weights (weight masters or packed codes and
    weight-quantizer scales excluded), and of those the activation-quantizer buffers."""
    skip = set()
    for layer in quant_layers(module).values():
        if layer.weight_quantizer is not None or layer.is_vq:
            skip |= {id(t) for t in layer.weight_quantizer.buffers()} if layer.weight_quantizer is not None else set()
            held = (layer._parameters.get("weight"), *(layer._buffers.get(b) for b in
                                                        ("weight_packed", "vq_codebook", "vq_packed")))
            skip |= {id(t) for t in held if t is not None}
    act = sum(_nbytes(q.buffers()) for q in activation_quantizers(module))
    held = _nbytes(t for t in (*module.parameters(), *module.buffers()) if id(t) not in skip)
    return held, act


def report(obj: Any) -> QuantReport:
    """Per-layer formats, sizes and kernels of every quantized component of `obj`."""
    rep = QuantReport()
    for path, module in quantized_components(obj).items():
        held, act_bytes = _held_bytes(module)
        quantized_fp = quantized_q = extras = 0  # transform extras are counted in each layer's payload
        for name, layer in quant_layers(module).items():
            numel = math.prod(layer.weight_shape)
            fp_row, q_row = numel * layer.weight_dtype.itemsize, weight_nbytes(layer)
            extras += extra_nbytes(layer)
            if layer.weight_quantizer is None and not layer.is_vq:  # input-only: its float weight is in `held`
                quantized_q += extra_nbytes(layer)
            else:
                quantized_fp += fp_row
                quantized_q += q_row
            spec = lambda s: s.short() if s is not None else "-"  # noqa: E731
            wq, iq = layer.weight_quantizer, layer.input_quantizer
            weight = f"vq{layer.vq_bits}x{layer.vq_dim}" if layer.is_vq else spec(wq and wq.spec)
            rep.rows.append(LayerRow(path, name, type(layer).__name__, weight, spec(iq and iq.spec),
                                     numel, fp_row, q_row, layer.kernel_name()))
        att = module.dmquant_state.recipe.attention
        for name, plan in module.dmquant_state.plan.items():
            if plan.kind == "attention":
                quantizers = getattr(module.get_submodule(name), "dmquant_attention", None)
                qk = quantizers.kernel_name() if quantizers is not None else "simulated (attention internals)"
                kernel = qk if qk.startswith("simulated") else f"{qk}, softmax and P V simulated"
                rep.rows.append(LayerRow(path, name, "attention", "-", _attention_specs(att), 0, 0, 0, kernel))
        rep.fp_bytes += held - act_bytes - extras + quantized_fp
        rep.quant_bytes += held - extras + quantized_q
    if not rep.rows:
        raise ValueError("nothing quantized: call dmquant.quantize first")
    return rep


def _attention_specs(att: Any) -> str:
    parts = {"qkv": att.qkv, "v": att.v, "p": att.probs}
    return " ".join(f"{k} {s.short()}" for k, s in parts.items() if s is not None) or "-"
