"""Built-in recipes (one YAML file each) and recipe resolution from a name, a path or a Recipe."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from ..config import Recipe


def _builtin_files() -> dict[str, Path]:
    root = resources.files(__name__)
    return {p.name[: -len(".yaml")]: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def load_recipe_file(path: str | Path) -> Recipe:
    """A recipe from a YAML or JSON file (safe loading only)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML/JSON: {err}") from err
    return Recipe.from_dict(data)


def recipes() -> dict[str, str]:
    """Built-in recipe names with their one-line descriptions."""
    return {name: load_recipe_file(p).description for name, p in sorted(_builtin_files().items())}


AUTO_PREFIX, AUTO_BASE = "auto-", "gptq-w4a8"


def get_recipe(recipe: str | Path | Recipe) -> Recipe:
    """Resolve a built-in name, a YAML/JSON path, or a Recipe into a Recipe.

    `auto-<budget>` recipes (e.g. auto-4.5bits) are searched per model: `dmquant.quantize(pipe,
    "auto-4.5bits")` or `dmquant mixed` resolve them."""
    if isinstance(recipe, Recipe):
        return recipe
    builtins = _builtin_files()
    key = str(recipe)
    if key.lower().startswith(AUTO_PREFIX):
        budget = key[len(AUTO_PREFIX):]
        raise ValueError(f"{key} is searched per model: dmquant.quantize(pipe, {key!r}), or run `dmquant mixed "
                         f"--pipeline P --budget {budget} --base {AUTO_BASE} --out recipe.yaml`")
    if key.lower() in builtins:
        return load_recipe_file(builtins[key.lower()])
    if key.endswith((".yaml", ".yml", ".json")) or Path(key).is_file():
        if not Path(key).is_file():
            raise FileNotFoundError(f"recipe file not found: {key}")
        return load_recipe_file(key)
    raise ValueError(f"unknown recipe {key!r}; built-in recipes: {', '.join(sorted(builtins))} "
                     "(or give a path to a YAML recipe)")
