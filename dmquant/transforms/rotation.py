"""Rotating a layer's input space (QuaRot, LRQ-DiT, FlatQuant, ViDiT-Q): x W^T = (x Q)(W Q)^T for Q^T Q = I.

A rotation spreads the few large activation channels over all channels, so per-token scales stop being
set by outliers (and weight outliers are spread the same way). Q is a block-diagonal Hadamard matrix
(entries +-1/sqrt(b), rebuilt from its name, never stored), a random orthogonal matrix (stored: n^2
numbers), or the full rotation kron(R, H) ("kron": every channel mixes, R is (n / b)^2 numbers).
Where the graph allows (a value projection feeding attention's output projection) a head-sized
Hadamard is folded into both weights and costs nothing at run time; elsewhere the layer rotates its
input online, before its input quantizer.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..nn.qlinear import QuantLinear
from ..orthogonal import KINDS, hadamard, hadamard_block, kron_factor, kron_rotate, random_orthogonal, rotate
from .folds import attention_pairs
from .layer import quantized_layers, set_weight, transform_of


def apply_rotation(modules: list[nn.Module], run: Callable[[], Any], kind: str = "hadamard", seed: int = 0,
                   fold: bool = True) -> dict[str, str]:
    """Rotate the input space of every quantized Linear (data-free: `run` is not called).

    With `fold` (Hadamard only), attention's value -> output projection pairs take a head-sized block
    Hadamard in their weights; every other quantized Linear rotates its input online. Returns
    {layer: rotation spec}."""
    if kind not in KINDS:
        raise ValueError(f"unknown rotation kind {kind!r}; use one of {KINDS}")
    done: dict[str, str] = {}
    with torch.no_grad():
        for module in modules:
            layers = {name: layer for _, name, layer in quantized_layers([module])
                      if isinstance(layer, QuantLinear)}
            for name, layer in layers.items():
                if layer.lowrank is not None or (layer.transform is not None and layer.transform.rotation is not None):
                    raise ValueError(f"{name} already has a low-rank branch or a rotation: run rotate before svd")
                if layer.input_quantizer is not None and layer.input_quantizer.calibrated:
                    raise ValueError(f"{name} has calibrated input scales already: rotate before ranges, temporal "
                                     "or any step that calibrates activations")
            folded = _fold_attention(module, layers) if fold and kind == "hadamard" else {}
            for i, (name, layer) in enumerate(layers.items()):
                if name in folded:
                    done[name] = folded[name]
                    continue
                n = layer.in_features
                if kind == "hadamard" and hadamard_block(n) == 1:
                    continue  # odd width: the only Hadamard block is 1 x 1, the identity
                if kind == "kron":  # the full rotation kron(R, H): R small and stored, H rebuilt
                    r = kron_factor(n, seed + i, torch.float64)
                    set_weight(layer, kron_rotate(layer.weight.double(), r, hadamard(hadamard_block(n), torch.float64)))
                    transform_of(layer).set_rotation(kind, r.to(layer.weight))
                    done[name] = kind
                    continue
                q = hadamard(hadamard_block(n)) if kind == "hadamard" else random_orthogonal(n, seed + i)
                set_weight(layer, rotate(layer.weight.double(), q.double()))
                transform_of(layer).set_rotation(kind, q.to(layer.weight) if kind == "random" else None)
                done[name] = kind
    return done


def _fold_attention(module: nn.Module, layers: dict[str, QuantLinear]) -> dict[str, str]:
    """Fold per-head Hadamards into value rows and output-projection columns: attention mixes tokens,
    never channels within a head, so P (V Q) = (P V) Q."""
    folded = {}
    for v_name, out_name, head_dim in attention_pairs(module):
        b = hadamard_block(head_dim)
        if out_name not in layers or b == 1:
            continue
        q = hadamard(b, torch.float64)
        v, out = module.get_submodule(v_name), layers[out_name]
        set_weight(v, rotate(v.weight.double().T, q).T)
        if v.bias is not None:
            v.bias.copy_(rotate(v.bias.double(), q))
        set_weight(out, rotate(out.weight.double(), q))
        transform_of(out).set_rotation(f"folded:hadamard:{b}")
        if v_name in layers:
            transform_of(v).output_rotation = f"hadamard:{b}"
        folded[out_name] = f"folded:hadamard:{b}"
    return folded
