"""Granularity: which elements share one scale. Tiny value objects, with a string form for configs.

Quantizers see every tensor as a 2-D view (rows, cols): a weight as (out, in * kernel), an activation
as (tokens, channels). Per-channel (weights) and per-token (activations) both mean one scale per row.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PerTensor:
    def __str__(self) -> str:
        return "tensor"


@dataclass(frozen=True)
class PerChannel:
    """One scale per output channel of a weight (row of the 2-D view)."""

    def __str__(self) -> str:
        return "channel"


@dataclass(frozen=True)
class PerToken:
    """One scale per token of an activation (row of the 2-D view), computed at run time."""

    def __str__(self) -> str:
        return "token"


@dataclass(frozen=True)
class PerGroup:
    """One scale per `size` consecutive elements of a row (the last group may be shorter)."""

    size: int

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"group size must be positive, got {self.size}")

    def __str__(self) -> str:
        return f"group:{self.size}"


Granularity = PerTensor | PerChannel | PerToken | PerGroup


def parse_granularity(text: str | Granularity) -> Granularity:
    """'tensor' | 'channel' | 'token' | 'group:<n>' (also 'group<n>') -> value object."""
    if not isinstance(text, str):
        return text
    t = text.strip().lower()
    simple = {"tensor": PerTensor(), "channel": PerChannel(), "token": PerToken()}
    if t in simple:
        return simple[t]
    if t.startswith("group"):
        size = t[5:].lstrip(":")
        if size.isdigit():
            return PerGroup(int(size))
    raise ValueError(f"unknown granularity {text!r}; use 'tensor', 'channel', 'token' or 'group:<n>'")


def is_per_row(g: Granularity) -> bool:
    return isinstance(g, (PerChannel, PerToken))
