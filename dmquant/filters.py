"""Which layers get quantized: module types plus name patterns, with the papers' defaults.

Defaults keep in high precision what Q-Diffusion, PTQ4DiT, ViDiT-Q and SVDQuant keep there: time and
text embeddings, patch/position embeddings, adaLN modulation, norms, and the first and last layers
(the roles of `dmquant.families.ROLES`; for models outside the family table, all of them).
Patterns are regexes searched in the module's dotted name (relative to the quantized component).
"""
from __future__ import annotations

import re
from typing import Iterable

from .families import ROLES

DEFAULT_EXCLUDE: tuple[str, ...] = tuple(ROLES.values())  # every role of the family table (dmquant.families)


def _compile(patterns: Iterable[str], what: str) -> list[re.Pattern]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as err:
            raise ValueError(f"invalid {what} pattern {p!r}: {err}") from err
    return out


class LayerFilter:
    """`name -> bool`: selected when it matches an include (or includes are empty) and no exclude."""

    def __init__(self, include: Iterable[str] = (), exclude: Iterable[str] | None = None) -> None:
        self.include = _compile(include, "include")
        self.exclude = _compile(DEFAULT_EXCLUDE if exclude is None else exclude, "exclude")

    def __call__(self, name: str) -> bool:
        if self.include and not any(p.search(name) for p in self.include):
            return False
        return not any(p.search(name) for p in self.exclude)
