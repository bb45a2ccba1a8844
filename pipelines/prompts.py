"""Built-in prompt lists: every shape, colour and position (or direction) appears, in a fixed order."""
from __future__ import annotations

from .data import COLOURS, DIRECTIONS, POSITIONS, SHAPES
from .miniature import NAMES


def miniature_prompts(name: str, n: int = 24) -> list[str]:
    """A fixed, balanced prompt list for a miniature (video prompts for miniature-latte)."""
    if name not in NAMES:
        raise ValueError(f"no built-in prompts for {name!r}; miniatures: {', '.join(NAMES)}")
    colours = list(COLOURS)
    out = []
    for i in range(n):
        shape, colour = SHAPES[i % len(SHAPES)], colours[i % len(colours)]
        if name == "miniature-latte":
            out.append(f"a {colour} {shape} moving {DIRECTIONS[(i // 2) % len(DIRECTIONS)]}")
        else:
            where = POSITIONS[(i * 5) % len(POSITIONS)]
            out.append(f"a {colour} {shape} " + ("in the center" if where == "center" else f"at the {where}"))
    return out
