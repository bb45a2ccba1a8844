"""The `dmquant` command line: quantize, info, recipes, demo."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .atomic import MANIFEST
from .recipes import recipes as builtin_recipes

log = logging.getLogger("dmquant")


def cmd_quantize(args: argparse.Namespace) -> int:
    from . import quantize, report, save_quantized
    from .pipelines import load

    pipe = load(args.pipeline)
    quantize(pipe, args.recipe, backend=args.backend, calibration=_calibration(args, pipe))
    print(report(pipe))
    save_quantized(pipe, args.out)
    print(f"saved to {args.out}")
    return 0


def _calibration(args: argparse.Namespace, pipe):
    """Static-scale recipes observe the pipeline on prompts: the miniature's own, or a file."""
    from .pipelines import generate, miniature_prompts

    if args.calibration_prompts:
        prompts = [p.strip() for p in Path(args.calibration_prompts).read_text().splitlines() if p.strip()]
    else:
        try:
            prompts = miniature_prompts(args.pipeline)[: args.num_prompts]
        except (KeyError, ValueError):
            prompts = ["a photo"] * args.num_prompts

    def run(p) -> None:
        generate(p, prompts, seed=0, steps=args.steps)

    run.description = {"prompts": prompts, "steps": args.steps, "seed": 0}
    return run


def cmd_info(args: argparse.Namespace) -> int:
    path = Path(args.dir) / MANIFEST
    if not path.is_file():
        print(f"error: {args.dir} is not a dmquant checkpoint (no {MANIFEST})", file=sys.stderr)
        return 2
    manifest = json.loads(path.read_text())
    total = sum((Path(args.dir) / f).stat().st_size for f in manifest.get("files", {}))
    print(f"dmquant checkpoint ({manifest['kind']}), format v{manifest['format_version']}, {total / 2**20:.2f} MB on disk")
    for top, entry in manifest["components"].items():
        for sub, part in entry["parts"].items():
            kinds: dict[str, int] = {}
            for p in part["plan"].values():
                key = p["kind"] if p["kind"] == "attention" else \
                    f"W {(p['weight'] or {}).get('format', '-')} / A {(p['input'] or {}).get('format', '-')}"
                kinds[key] = kinds.get(key, 0) + 1
            name = ".".join(x for x in (top, sub) if x)
            print(f"\n[{name}] {entry['class']}  recipe={part['recipe']['name']}")
            for k, n in kinds.items():
                print(f"  {n:4d} x {k}")
            for k, v in part.get("provenance", {}).items():
                print(f"  {k}: {v}")
    return 0


def cmd_recipes(_: argparse.Namespace) -> int:
    items = builtin_recipes()
    width = max(map(len, items))
    for name, desc in items.items():
        print(f"{name.ljust(width)}  {desc}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), pipeline=args.pipeline, recipe_names=args.recipes.split(","))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmquant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a pipeline with a recipe and save it")
    q.add_argument("--pipeline", required=True, help="miniature/tiny name, local diffusers folder or cached hub id")
    q.add_argument("--recipe", required=True, help="built-in recipe name or YAML path")
    q.add_argument("--out", required=True, help="output directory (written atomically)")
    q.add_argument("--backend", choices=("fake", "fbgemm", "cuda"), default=None)
    q.add_argument("--calibration-prompts", help="text file, one prompt per line (static-scale recipes)")
    q.add_argument("--num-prompts", type=int, default=8)
    q.add_argument("--steps", type=int, default=None, help="denoising steps during calibration")
    q.set_defaults(func=cmd_quantize)
    i = sub.add_parser("info", help="describe a saved quantized model")
    i.add_argument("dir")
    i.set_defaults(func=cmd_info)
    r = sub.add_parser("recipes", help="list built-in recipes")
    r.set_defaults(func=cmd_recipes)
    d = sub.add_parser("demo", help="quantize the built-in model, compare with FP, write a PNG grid")
    d.add_argument("--out", default="outputs/demo")
    d.add_argument("--pipeline", default=None, help="default: miniature-pixart")
    d.add_argument("--recipes", default="w8a8,w4a8,nvfp4,w4a4")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
