"""Where a smoothing scale or a rotation can live in the previous op instead of running online: data.

Each entry names, relative to a module of a diffusers class, an op whose output feeds only the listed
consumers, and how that output is divided by s: an affine norm (weight and bias / s), a linear's
output rows (value projection -> attention output; GEGLU's value half -> the FFN output projection),
or adaLN-zero's shift and scale chunks ((1 + scale) / s = 1 + scale', so b' = (b + 1) / s - 1). Each
fold is exact in float; PixArt's shared adaLN-single modulation cannot take a per-block scale, so its
blocks smooth online.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..nn.qmodule import QuantModule
from .layer import set_weight, transform_of

_QKV1 = ("attn1.to_q", "attn1.to_k", "attn1.to_v")
_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
_ADD_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
# owner class[/norm_type] -> (previous op, how it divides, consumers)
FOLDS: dict[str, tuple[tuple[str, str, tuple[str, ...]], ...]] = {
    "BasicTransformerBlock/layer_norm": (("norm1", "norm", _QKV1), ("norm2", "norm", ("attn2.to_q",)),
                                         ("norm3", "norm", ("ff.net.0.proj",))),
    "BasicTransformerBlock/ada_norm_zero": (("norm1", "adaln-msa", _QKV1), ("norm1", "adaln-mlp", ("ff.net.0.proj",)),
                                            ("norm2", "norm", ("attn2.to_q",))),
    "JointTransformerBlock": (("norm1", "adaln-msa", _QKV), ("norm1", "adaln-mlp", ("ff.net.0.proj",)),
                              ("norm1_context", "adaln-msa", _ADD_QKV),
                              ("norm1_context", "adaln-mlp", ("ff_context.net.0.proj",))),
    "Transformer2DModel": (("norm", "norm", ("proj_in",)),),
    "FeedForward": (("net.0.proj", "geglu", ("net.2",)),),
    "Attention": (("to_v", "rows", ("to_out.0",)),),
}
_PLAIN_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "AttnProcessorNPU")


@dataclass(frozen=True)
class Fold:
    """`prev` (a full module name) feeds exactly `consumers`; `divide` makes its output y / s."""

    prev: str
    kind: str  # "norm" | "rows" | "geglu" | "adaln-msa" | "adaln-mlp"
    consumers: tuple[str, ...]

    def target(self, component: nn.Module) -> nn.Module:
        """The module whose parameters change (adaLN: its modulation linear)."""
        m = component.get_submodule(self.prev)
        return m.linear if self.kind.startswith("adaln") else m

    def divide(self, component: nn.Module, s: torch.Tensor) -> None:
        m = self.target(component)
        if self.kind == "norm":
            with torch.no_grad():
                for p in (m.weight, m.bias):
                    if p is not None:
                        p.copy_(p.double() / s)
            return
        d = s.numel()
        if self.kind in ("rows", "geglu"):  # GEGLU: the first half of proj is the value, the rest the gate
            _divide_rows(m, 0, s)
        else:  # adaLN-zero chunks: shift, scale, gate for attention (0..2) then for the MLP (3..5)
            k = 0 if self.kind == "adaln-msa" else 3
            _divide_rows(m, k * d, s)
            _divide_rows(m, (k + 1) * d, s, offset=1.0)


def _divide_rows(linear: nn.Linear, start: int, s: torch.Tensor, offset: float = 0.0) -> None:
    """Rows start..start+len(s) of a linear's output become (y + offset) / s - offset."""
    rows = slice(start, start + s.numel())
    w = linear.weight.detach().double().clone()
    w[rows] /= s[:, None]
    set_weight(linear, w)
    with torch.no_grad():
        if linear.bias is not None:
            b = linear.bias.double()
            linear.bias[rows] = (b[rows] + offset) / s - offset
    if isinstance(linear, QuantModule):
        t = torch.ones(linear.weight.shape[0], dtype=torch.float64)
        t[rows] = s
        transform_of(linear).scale_outputs(t.to(linear.weight))


def _owner_key(m: nn.Module) -> str:
    name = type(m).__name__
    return f"{name}/{m.norm_type}" if name == "BasicTransformerBlock" else name


def plain_attention(attn: nn.Module) -> bool:
    """Attention whose output projection sees exactly softmax(QK^T) V of its own value projection."""
    proc = getattr(attn, "processor", None)
    proc = getattr(proc, "inner", proc)  # dmquant's attention quantization wraps the processor
    return (type(proc).__name__ in _PLAIN_PROCESSORS and getattr(attn, "add_v_proj", None) is None
            and not getattr(attn, "fused_projections", False) and isinstance(getattr(attn, "to_v", None), nn.Linear))


def _valid(owner: nn.Module, prev: nn.Module, kind: str, first_consumer: str) -> bool:
    if kind == "norm":
        ok = isinstance(prev, (nn.LayerNorm, nn.GroupNorm)) and prev.weight is not None
    elif kind == "rows":
        ok = plain_attention(owner)
    elif kind == "geglu":
        ok = type(owner.net[0]).__name__ == "GEGLU" and isinstance(prev, nn.Linear)
    else:
        ok = type(prev).__name__ == "AdaLayerNormZero" and not isinstance(prev.linear, QuantModule)
    if type(owner).__name__ == "BasicTransformerBlock":  # a positional embedding would sit in between;
        ok = ok and owner.pos_embed is None  # with only_cross_attention attn1's keys and values read the text
        ok = ok and not (owner.only_cross_attention and first_consumer.startswith("attn1"))
    return ok


def smoothing_folds(component: nn.Module) -> list[Fold]:
    """Every fold the table finds in `component` whose modules all exist."""
    found = []
    for name, owner in component.named_modules():
        for prev, kind, consumers in FOLDS.get(_owner_key(owner), ()):
            try:
                prev_mod = owner.get_submodule(prev)
                mods = [owner.get_submodule(c) for c in consumers]
            except AttributeError:
                continue
            if all(isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) for m in mods) \
                    and _valid(owner, prev_mod, kind, consumers[0]):
                full = lambda p: f"{name}.{p}" if name else p  # noqa: E731
                found.append(Fold(full(prev), kind, tuple(full(c) for c in consumers)))
    return found


def attention_pairs(component: nn.Module) -> list[tuple[str, str, int]]:
    """(value projection, output projection, head size) of every plain attention in `component`."""
    pairs = []
    for name, attn in component.named_modules():
        if type(attn).__name__ == "Attention" and plain_attention(attn) and isinstance(attn.to_out[0], nn.Linear):
            prefix = f"{name}." if name else ""
            pairs.append((f"{prefix}to_v", f"{prefix}to_out.0", attn.to_v.out_features // attn.heads))
    return pairs
