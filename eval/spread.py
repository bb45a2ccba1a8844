"""How far a regression gate's metrics move when the method does not change, so tolerances come from
measurement instead of a guess.

Quantized sampling is chaotic: one float32 ulp of difference flips a rounding decision, and the flip
propagates through the remaining denoising steps. Another CPU (AVX-512 instead of AVX2, other
oneDNN kernels, another thread count) changes many ulps, so a near-lossless PSNR can move by dB
between machines. We re-run each baseline (a) on every float code path this CPU offers, each in a
fresh process because ATen and oneDNN read their ISA variables once, and (b) with ~1-ulp random
perturbations of the denoiser input at every step (`runner.perturb_denoiser`), which stand in for
the code paths we cannot run here. The baseline then keeps the worst value seen as its reference,
every path's value, and a tolerance of `max(floor, FACTOR x (max - min))`.

    python -m dmquant.eval.spread baselines/*.json --perturbations 3 --write
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# ATen's vector ISA and oneDNN's ISA are read once per process; OMP_NUM_THREADS changes reductions.
CODE_PATHS: dict[str, dict[str, str]] = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "OMP_NUM_THREADS": "1"},
    "avx2-2threads": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "2"},
}
# Gate tolerance = max(floor, FACTOR x observed range): a run on an unseen path lands outside the
# observed [min, max] with probability ~2/(runs+1); one more full range below the worst covers it.
FACTOR = 1.0


def _native_path() -> dict[str, dict[str, str]]:
    """This CPU's own best ISA where it is above AVX2 (AVX-512 machines record that path too)."""
    import torch

    cap = torch.backends.cpu.get_cpu_capability().lower()
    if cap.startswith("avx512"):
        return {cap: {"ATEN_CPU_CAPABILITY": cap, "OMP_NUM_THREADS": "1"}}
    return {}


RESUME_DIR = Path(os.environ.get("DMQUANT_SPREAD_RESUME", Path(tempfile.gettempdir()) / "dmquant-spread-resume"))


def _resume_file(path: Path, seed: int | None) -> Path:
    """Where a finished run is kept when RESUME_DIR exists (create it to make a long measurement
    resumable or to run code paths in parallel; empty it after changing code: runs are keyed only by
    baseline, seed and the code-path variables)."""
    env = [os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS")]
    key = hashlib.sha256(json.dumps([path.read_text(), seed, env]).encode()).hexdigest()[:16]
    return RESUME_DIR / f"{path.stem}-{key}.json"


def run_worker(baselines: list[Path], perturbations: list[int | None]) -> list[dict[str, Any]]:
    """Evaluate each baseline once per perturbation seed (None: unperturbed) in this process."""
    from .regression import evaluate_baseline

    out = []
    for path in baselines:
        for seed in perturbations:
            done = _resume_file(path, seed)
            if RESUME_DIR.is_dir() and done.is_file():
                row = json.loads(done.read_text())
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    row = evaluate_baseline(json.loads(path.read_text()), Path(tmp), perturb=seed)
                if RESUME_DIR.is_dir():
                    done.write_text(json.dumps(row))
            out.append({"baseline": path.name, "perturb": seed, "metrics": row})
    return out


def _spawn(env: dict[str, str], baselines: list[Path], perturbations: list[int | None]) -> list[dict[str, Any]]:
    args = [sys.executable, "-m", "dmquant.eval.spread", "--worker", *map(str, baselines),
            "--perturb", ",".join("none" if p is None else str(p) for p in perturbations)]
    done = subprocess.run(args, env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"spread worker failed ({env}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(baselines: list[Path], perturbations: int = 3) -> dict[str, list[dict[str, Any]]]:
    """{baseline file name: runs}; each run {"variant", "metrics"}: every code path unperturbed, and
    the first path again under `perturbations` ulp-perturbation seeds."""
    from tqdm.auto import tqdm

    runs: dict[str, list[dict[str, Any]]] = {p.name: [] for p in baselines}
    paths = {**CODE_PATHS, **_native_path()}
    for i, (name, env) in enumerate(tqdm(list(paths.items()), desc="code paths", unit="path")):
        seeds: list[int | None] = [None] + (list(range(perturbations)) if i == 0 else [])
        for r in _spawn(env, baselines, seeds):
            variant = name if r["perturb"] is None else f"{name}+ulp{r['perturb']}"
            runs[r["baseline"]].append({"variant": variant, "metrics": r["metrics"]})
    return runs


def gate_from_runs(runs: list[dict[str, Any]], metrics: dict[str, Any], floors: dict[str, float],
                   directions: dict[str, str]) -> dict[str, Any]:
    """A baseline's "metrics" block from its runs: the worst value as reference, every unperturbed
    path's value, the observed range and the tolerance it implies (rounded up to 3 decimals)."""
    gated = {}
    for key in metrics:
        if key == "per_prompt":
            continue
        values = [r["metrics"][key] for r in runs]
        worst = min(values) if directions[key] == "higher" else max(values)
        spread = max(values) - min(values)
        tolerance = math.ceil(round(max(floors[key], FACTOR * spread) * 1000, 6)) / 1000  # up, to 1e-3
        gated[key] = {"value": worst, "tolerance": tolerance,
                      "paths": {r["variant"]: r["metrics"][key] for r in runs if "+ulp" not in r["variant"]},
                      "spread": {"min": min(values), "max": max(values), "runs": len(values)},
                      "per_prompt": runs[0]["metrics"]["per_prompt"][key]}  # paired intervals in `regress`
    return gated


def write_spread(path: Path, runs: list[dict[str, Any]], command: str, perturbations: int) -> None:
    """Rewrite a baseline's metrics from measured runs, recording how they were measured."""
    import torch

    from .regression import DEFAULT_TOLERANCE
    from .table import METRICS

    base = json.loads(path.read_text())
    base["metrics"] = gate_from_runs(runs, base["metrics"], DEFAULT_TOLERANCE,
                                     {k: METRICS[k][1] for k in base["metrics"]})
    base["spread_measured"] = {
        "command": command, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "cpu": f"{platform.processor() or platform.machine()}, best ISA "
               f"{torch.backends.cpu.get_cpu_capability()}",
        "variants": {name: env for name, env in {**CODE_PATHS, **_native_path()}.items()},
        "perturbation": f"denoiser input x (1 +- 2^-23) at every call, seeds 0..{perturbations - 1}, first path",
        "rule": f"value = worst run; tolerance = max(floor, {FACTOR} x (max - min)); floors {DEFAULT_TOLERANCE}"}
    path.write_text(json.dumps(base, indent=1) + "\n")


def spread_table(baselines: list[Path]) -> str:
    """Markdown: per baseline and metric, each code path's value, the range over all runs, and the
    gate (reference = worst run, tolerance) as recorded by --write."""
    from .table import _markdown

    paths = list({**CODE_PATHS, **_native_path()})
    head = ["baseline", "metric", *paths, "all runs min..max (n)", "reference", "tolerance"]
    body = []
    for path in baselines:
        for key, gate in json.loads(path.read_text())["metrics"].items():
            if "spread" not in gate:
                continue
            s = gate["spread"]
            values = [f"{gate['paths'][p]:.4f}" if p in gate["paths"] else "-" for p in paths]
            body.append([path.stem, key, *values, f"{s['min']:.4f}..{s['max']:.4f} ({s['runs']})",
                         f"{gate['value']:.4f}", f"{gate['tolerance']}"])
    return "\n".join(_markdown(head, body)) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dmquant.eval.spread", description=__doc__.split("\n\n")[0])
    p.add_argument("baselines", nargs="+", type=Path)
    p.add_argument("--perturbations", type=int, default=3, help="ulp-perturbed runs on the first code path")
    p.add_argument("--write", action="store_true", help="rewrite the baselines' references and tolerances")
    p.add_argument("--table", action="store_true", help="print the recorded spreads as markdown; run nothing")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--perturb", default="none", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    missing = [str(b) for b in args.baselines if not b.is_file()]
    if missing:
        raise FileNotFoundError(f"baseline file(s) not found: {', '.join(missing)}")
    if args.table:
        print(spread_table(args.baselines))
        return 0
    if args.worker:
        seeds = [None if s == "none" else int(s) for s in args.perturb.split(",")]
        print(json.dumps(run_worker(args.baselines, seeds)))
        return 0
    runs = measure(args.baselines, args.perturbations)
    command = "python -m dmquant.eval.spread " + " ".join(sys.argv[1:] if argv is None else argv)
    for path in args.baselines:
        table = {r["variant"]: {k: round(v, 4) for k, v in r["metrics"].items() if k != "per_prompt"}
                 for r in runs[path.name]}
        log.info("%s: %s", path.name, json.dumps(table))
        print(path.name, json.dumps(table, indent=1))
        if args.write:
            write_spread(path, runs[path.name], command, args.perturbations)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    raise SystemExit(main())
