"""Built-in prompt lists: every shape, colour and position (or direction) appears, in a fixed order."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .data import COLOURS, DIRECTIONS, POSITIONS, SHAPES, make_images, make_videos
from .miniature import NAMES, WEIGHTS

# Generic captions for pipelines without procedural data: varied subjects, styles, layouts.
GENERIC_PROMPTS = (
    "a photo of a cat sitting on a windowsill", "a red sports car on a mountain road", "a bowl of fruit on a table",
    "an astronaut riding a horse, digital art", "a watercolor painting of a lighthouse at dusk",
    "a close-up portrait of an old man with a beard", "a city street at night in the rain, neon lights",
    "a snowy forest with a wooden cabin", "a plate of sushi, studio lighting", "a golden retriever running on a beach",
    "an oil painting of sunflowers in a vase", "a futuristic robot in a factory", "a bird's eye view of a river delta",
    "a medieval castle on a hill, fantasy illustration", "a cup of coffee with latte art",
    "a field of tulips in spring",
)
HELD_OUT_SEED = 4242  # procedural captions for calibration, disjoint from evaluation prompt lists


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


def miniature_name(pipe: Any) -> str | None:
    """The miniature a pipeline was loaded from (by its folder), or None."""
    source = getattr(pipe, "name_or_path", None)
    if not source:
        return None
    path = Path(str(source))
    return path.name if path.name in NAMES and path.parent.resolve() == WEIGHTS.resolve() else None


def calibration_prompts(pipe_or_name: Any, n: int = 16, exclude: Sequence[str] | None = None) -> list[str]:
    """Default calibration prompts: held-out procedural captions for a miniature (never its evaluation
    prompts), otherwise generic captions. With `exclude` (the prompts an evaluation scores), `n` prompts
    none of which is excluded: calibrating on scored prompts would flatter every calibrated recipe, so
    an overlap that cannot be avoided is an error."""
    if exclude is not None:
        scored = set(exclude)
        # Procedural captions repeat evaluation ones by chance: top up from a larger draw.
        pool = calibration_prompts(pipe_or_name, n) + calibration_prompts(pipe_or_name, 4 * n)
        chosen = [p for p in dict.fromkeys(pool) if p not in scored][:n]
        if len(chosen) < n:
            raise ValueError(f"only {len(chosen)} calibration prompts are disjoint from the {len(scored)} "
                             f"evaluation prompts (need {n})")
        return chosen
    name = pipe_or_name if isinstance(pipe_or_name, str) else miniature_name(pipe_or_name)
    if name in NAMES:
        return (make_videos if name == "miniature-latte" else make_images)(n, seed=HELD_OUT_SEED).prompts
    return [GENERIC_PROMPTS[i % len(GENERIC_PROMPTS)] for i in range(n)]
