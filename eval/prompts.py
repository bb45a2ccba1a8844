"""Prompt sets: a miniature's built-in list, or a user's file (TXT one per line; JSON list of
strings or of records; CSV with a caption column, e.g. COCO or PartiPrompts exports)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

CAPTION_KEYS = ("caption", "prompt", "text", "Prompt")


def _from_record(rec: object, where: str) -> str:
    if isinstance(rec, str):
        return rec
    if isinstance(rec, dict):
        for k in CAPTION_KEYS:
            if k in rec:
                return str(rec[k])
    raise ValueError(f"{where}: cannot find a caption (keys {CAPTION_KEYS}) in {rec!r:.80}")


def load_prompts(source: str | Path, limit: int | None = None) -> list[str]:
    """Prompts from a miniature name or a .txt/.json/.csv file."""
    from dmquant.pipelines.miniature import NAMES
    from dmquant.pipelines.prompts import miniature_prompts

    if str(source) in NAMES:
        return miniature_prompts(str(source), limit or 24)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        records = data.get("annotations", data.get("prompts", [])) if isinstance(data, dict) else data
        prompts = [_from_record(r, str(path)) for r in records]
    elif path.suffix == ".csv":
        with open(path, newline="") as f:
            prompts = [_from_record(r, str(path)) for r in csv.DictReader(f)]
    else:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts[:limit] if limit else prompts
