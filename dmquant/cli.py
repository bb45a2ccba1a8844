"""The `dmquant` command line: quantize, calibrate, mixed, info, recipes, eval, compare, grid, regress, demo."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import MANIFEST
from .config import BACKENDS
from .recipes import recipes as builtin_recipes

if TYPE_CHECKING:
    import torch

log = logging.getLogger("dmquant")


def cmd_quantize(args: argparse.Namespace) -> int:
    """quantize / calibrate: quantize (calibrating on the float trajectory when the recipe needs it),
    print the layer report and, for calibrate, time and peak memory; save atomically."""
    import resource
    import time

    from . import quantize, report, save_quantized
    from .pipelines import load
    from .state import quantized_components

    device, dtype = _runtime(args)
    pipe = load(args.pipeline, dtype=dtype, device=device)
    t0 = time.perf_counter()
    quantize(pipe, args.recipe, backend=args.backend, calibration=_calibration(args))
    seconds = time.perf_counter() - t0
    print(report(pipe))
    if args.command == "calibrate":
        state = next(iter(quantized_components(pipe).values())).dmquant_state
        calib = state.provenance.get("calibration") or {}
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        print(f"calibration: {calib.get('recorded_calls', '-')} denoiser calls at steps "
              f"{calib.get('recorded_steps', '-')}, steps {calib.get('step_seconds', {})}")
        print(f"quantize + calibrate: {seconds:.1f} s, peak memory {peak:.2f} GiB")
    save_quantized(pipe, args.out)
    print(f"saved to {args.out}")
    return 0


def _calibration(args: argparse.Namespace) -> dict:
    """CalibrationSet settings from the flags; unset flags keep the recipe's defaults."""
    settings: dict = {"num_prompts": args.num_prompts, "steps": args.steps, "timesteps": args.timesteps,
                      "samples": args.samples, "guidance_scale": args.guidance_scale}
    if args.samples is not None:
        settings["batch_size"] = 1  # a sample is one prompt at one step (EDA-DM's unit)
    if args.calibration_prompts:
        settings["prompts"] = [p.strip() for p in Path(args.calibration_prompts).read_text().splitlines() if p.strip()]
    return {k: v for k, v in settings.items() if v is not None}


def _runtime(args: argparse.Namespace) -> tuple[str, "torch.dtype"]:
    """(device, dtype) from --device / --dtype, checked before any loading."""
    import torch

    from .eval.runner import DTYPES

    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype {args.dtype}: use one of {', '.join(DTYPES)}")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise ValueError(f"--device {args.device}: {err}") from err
    if device.type != "cpu" and not getattr(torch, device.type).is_available():
        raise ValueError(f"--device {args.device}: no {device.type} device is available here")
    return args.device, DTYPES[args.dtype]


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="where the pipeline runs: cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", default="float32", help="float dtype of the pipeline: float32, bfloat16, float16")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance of every sampling run (default: 4.0)")


def cmd_mixed(args: argparse.Namespace) -> int:
    """mixed: measure per-layer sensitivity on the float trajectory, allocate formats under a budget
    by integer programming, write the recipe (and a sensitivity heatmap)."""
    from .mixed import search
    from .pipelines import load

    calibration = {k: v for k, v in {"num_prompts": args.num_prompts, "batch_size": args.num_prompts,
                                     "steps": args.steps, "timesteps": args.timesteps}.items() if v is not None}
    result = search(load(args.pipeline), args.budget, base=args.base, candidates=args.candidates, name=args.name,
                    calibration=calibration, seed=args.seed, groups=args.groups, content=args.content,
                    content_weight=args.content_weight, cache_dir=args.cache_dir, latency=args.latency)
    heatmap = args.heatmap or (str(Path(args.report).with_suffix(".png")) if args.report else None)
    result.write(args.out, heatmap=heatmap)
    print(result.summary())
    if args.report:
        from .eval.grid import html_report

        rows = result.layer_table()
        table = "\n".join(" | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values())
                          for row in [dict(zip(rows[0], rows[0])), *rows])
        html_report(args.report, f"dmquant mixed: {args.pipeline} under {args.budget}", table, [heatmap],
                    notes=result.summary())
    print(f"wrote {args.out}" + "".join(f" and {p}" for p in (heatmap, args.report) if p))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    path = Path(args.dir) / MANIFEST
    if not path.is_file():
        print(f"error: {args.dir} is not a dmquant checkpoint (no {MANIFEST})", file=sys.stderr)
        return 2
    manifest = json.loads(path.read_text())
    total = sum((Path(args.dir) / f).stat().st_size for f in manifest.get("files", {}))
    print(f"dmquant checkpoint ({manifest['kind']}), format v{manifest['format_version']}, "
          f"{total / 2**20:.2f} MB on disk")
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
    if args.kernels:  # which kernel each layer runs on this machine: needs loading the packed model
        from . import load_quantized, report

        rep = report(load_quantized(args.dir, backend=args.kernels))
        print(rep if args.layers else rep.summary())
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


def _eval_config(args: argparse.Namespace, metrics: tuple[str, ...] | None):
    from .eval import EvalConfig, load_prompts

    if args.backend:
        raise ValueError("eval and grid take other libraries as --peer (e.g. --peer quanto:int8); --backend "
                         "names dmquant's kernel backend (quantize, calibrate, info --kernels)")
    models = [m for m in (args.recipe or "").split(",") if m] + (args.quantized or []) + (args.peer or [])
    if not models:
        raise ValueError("nothing to compare with FP: give --recipe, --quantized or --peer")
    device, _ = _runtime(args)
    prompts = load_prompts(args.prompts or args.pipeline, args.num_prompts)
    return EvalConfig(pipeline=args.pipeline, models=models, prompts=prompts, seed=args.seed, steps=args.steps,
                      metrics=metrics, out=Path(args.out), batch_size=args.batch_size, device=device,
                      dtype=args.dtype, guidance_scale=args.guidance_scale,
                      extra={"clip_checkpoint": args.clip_checkpoint, "lpips_backbone": args.lpips_backbone,
                             "fid_extractor": args.fid_extractor, "inception_weights": args.inception_weights,
                             "calib_prompts": args.calib_prompts, "calib_timesteps": args.calib_timesteps})


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval import evaluate

    evaluate(_eval_config(args, tuple(args.metrics.split(",")) if args.metrics else None))
    print(f"\nwrote {args.out}/metrics.json, results.md, grid, report.html")
    return 0


def _metrics_rows(results: str) -> tuple[list, list[dict]]:
    """(prompts, rows) of an eval output directory or its metrics.json."""
    path = Path(results)
    path = path / "metrics.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.json (write one with `dmquant eval --out DIR`)")
    data = json.loads(path.read_text())
    if not isinstance(data.get("rows"), list):
        raise ValueError(f"{path} has no 'rows' list: not a metrics.json written by `dmquant eval`")
    return data.get("prompts", []), data["rows"]


def cmd_compare(args: argparse.Namespace) -> int:
    """Rows of several evaluations pool when they scored the same prompts; a name in two of them must
    carry the same per-prompt values (evaluations are deterministic), so it is one row."""
    from .eval.table import compare_rows

    prompts, rows = _metrics_rows(args.results)
    for other in args.also or []:
        more_prompts, more = _metrics_rows(other)
        if more_prompts != prompts:
            raise ValueError(f"{other} scored other prompts than {args.results}: its rows cannot be paired")
        known = {r.get("name"): r for r in rows}
        for row in more:
            seen = known.get(row.get("name"))
            if seen is None:
                rows.append(row)
            elif seen.get("per_prompt") != row.get("per_prompt"):
                raise ValueError(f"{row.get('name')}: different per-prompt values in {other}: rename one of the rows "
                                 "or compare evaluations made with the same settings")
    print(compare_rows(rows, args.a, args.b, args.metrics.split(",") if args.metrics else None), end="")
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from .eval import evaluate

    evaluate(_eval_config(args, ("psnr",)))
    return 0


def cmd_regress(args: argparse.Namespace) -> int:
    from .eval import check_baseline

    checks = check_baseline(args.baseline, update=args.update)
    print("\n".join(map(str, checks)))
    if args.update:
        print(f"baseline {args.baseline} rewritten")
        return 0
    return 0 if all(c.ok for c in checks) else 1


def _add_eval_args(p: argparse.ArgumentParser, metrics: bool) -> None:
    p.add_argument("--pipeline", required=True)
    p.add_argument("--recipe", help="comma-separated recipe names or YAML paths")
    p.add_argument("--quantized", action="append", help="a saved dmquant directory (repeatable)")
    p.add_argument("--peer", action="append", help="another library to compare, e.g. quanto:int8, torchao:int8dq "
                   "(optionally @<recipe>: its layer set; repeatable)")
    p.add_argument("--backend", action="append", help=argparse.SUPPRESS)  # old spelling of --peer: refused clearly
    _add_runtime_args(p)
    p.add_argument("--prompts", help="prompt file (.txt/.json/.csv); default: the miniature's prompts")
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default="outputs/eval")
    p.add_argument("--clip-checkpoint", default=None, help="open_clip checkpoint file for the CLIP score")
    p.add_argument("--lpips-backbone", default=None, help="torchvision backbone weights for LPIPS")
    p.add_argument("--fid-extractor", choices=("judge", "inception", "clean-fid"), default=None,
                   help="features for FID (default: the judge for miniatures)")
    p.add_argument("--inception-weights", default=None, help="local Inception weights file for FID")
    p.add_argument("--calib-prompts", type=int, default=None, help="held-out calibration prompts for every recipe "
                   "(default: each recipe's calibration.num_prompts, else 16)")
    p.add_argument("--calib-timesteps", default=None, help="recorded steps for every recipe (default: each recipe's)")
    if metrics:
        p.add_argument("--metrics", default=None, help="comma-separated; default: every metric that applies "
                       "(psnr, ssim; adherence and FID (n >= 50) on miniatures; vbench on video)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmquant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for verb, text in (("quantize", "quantize a pipeline with a recipe and save it"),
                       ("calibrate", "quantize with calibration on the float trajectory; report time and memory")):
        q = sub.add_parser(verb, help=text)
        q.add_argument("--pipeline", required=True, help="miniature/tiny name, local diffusers folder or cached hub id")
        q.add_argument("--recipe", required=True, help="built-in recipe name or YAML path")
        q.add_argument("--out", required=True, help="output directory (written atomically)")
        q.add_argument("--backend", choices=BACKENDS, default=None,
                       help="kernel backend of the quantized layers (default: the recipe's)")
        _add_runtime_args(q)
        q.add_argument("--calibration-prompts", help="text file, one prompt per line (default: held-out captions)")
        q.add_argument("--num-prompts", type=int, default=None, help="calibration prompts (recipe default: 16)")
        q.add_argument("--steps", type=int, default=None, help="sampler steps of the calibration runs")
        q.add_argument("--timesteps", default=None, help="steps to record: K, uniform:K, eda:K or all")
        q.add_argument("--samples", type=int, default=None,
                       help="single-prompt denoiser calls to keep, shared out over the recorded steps (by "
                            "EDA-DM's step weights with eda:K, evenly otherwise)")
        q.set_defaults(func=cmd_quantize)
    m = sub.add_parser("mixed", help="search per-layer formats under a budget from measured sensitivity; "
                                     "write a recipe")
    m.add_argument("--pipeline", required=True)
    m.add_argument("--budget", required=True,
                   help="average weight bits (4.5bits), bytes (1.2MiB) or a recipe's bytes (w4a8)")
    m.add_argument("--out", required=True, help="recipe YAML to write")
    m.add_argument("--base", default="w4a8", help="recipe whose activations, steps and attention are kept")
    m.add_argument("--candidates", default="int3:group:64,int4:group:64,int8:channel,fp")
    m.add_argument("--name", default=None, help="recipe name (default: <base>-mixed-<budget>)")
    m.add_argument("--heatmap", default=None, help="PNG of sensitivity (layer x timestep group) and the allocation")
    m.add_argument("--latency", default=None, help="also limit the searched layers' measured time: 0.8x of FP, 12ms")
    m.add_argument("--report", default=None, help="HTML page: summary, per-layer choices and errors, the heatmap")
    m.add_argument("--num-prompts", type=int, default=None, help="calibration prompts (default 4)")
    m.add_argument("--steps", type=int, default=None, help="sampler steps of the calibration runs")
    m.add_argument("--timesteps", default=None, help="steps to record (default uniform:8)")
    m.add_argument("--groups", type=int, default=4, help="timestep groups of the measurement")
    m.add_argument("--content", default="auto", choices=("auto", "judge", "latent", "none"))
    m.add_argument("--content-weight", type=float, default=1.0, help="weight of the content metric vs quality")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--cache-dir", default="outputs/mixed-cache")
    m.set_defaults(func=cmd_mixed)
    i = sub.add_parser("info", help="describe a saved quantized model")
    i.add_argument("dir")
    i.add_argument("--kernels", nargs="?", const="auto", default=None, metavar="BACKEND",
                   help="load it and say which kernel each layer runs here (default backend: auto)")
    i.add_argument("--layers", action="store_true", help="with --kernels: the whole per-layer table")
    i.set_defaults(func=cmd_info)
    r = sub.add_parser("recipes", help="list built-in recipes")
    r.set_defaults(func=cmd_recipes)
    e = sub.add_parser("eval", help="FP vs quantized on identical seeds: metrics, table, grid, HTML")
    _add_eval_args(e, metrics=True)
    e.set_defaults(func=cmd_eval)
    c = sub.add_parser("compare", help="paired bootstrap interval of one recipe minus another, per metric, "
                                       "from an eval's metrics.json")
    c.add_argument("results", help="an eval output directory or its metrics.json")
    c.add_argument("a", help="row name, e.g. svdquant-w4a4, or comma-separated rows of one recipe's calibration "
                             "runs (seeds): then also an interval over runs")
    c.add_argument("b", help="row name(s) to subtract, e.g. w4a8")
    c.add_argument("--also", action="append", help="another eval output of the same prompts whose rows join "
                                                   "(repeatable)")
    c.add_argument("--metrics", default=None, help="comma-separated metric keys (default: all with per-prompt values)")
    c.set_defaults(func=cmd_compare)
    g = sub.add_parser("grid", help="comparison grid (PNG/GIF + HTML) of FP and recipes")
    _add_eval_args(g, metrics=False)
    g.set_defaults(func=cmd_grid)
    rg = sub.add_parser("regress", help="re-run a recorded evaluation; exit 1 if a metric regressed")
    rg.add_argument("--baseline", required=True)
    rg.add_argument("--update", action="store_true", help="rewrite the baseline with the new values")
    rg.set_defaults(func=cmd_regress)
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
