#!/usr/bin/env python
"""Deployment benchmark: every deployable recipe on PixArt-alpha-sized and SD1.5-sized denoisers
(random weights from their configs, CPU), against fp32 and bf16, measured side by side.

For each model and recipe, in fresh processes:
1. quantize (calibrating on random inputs at 5 timesteps where the recipe needs data): peak RSS of the
   process over the fp32 model's own RSS, then `save_quantized`: size on disk;
2. `load_quantized(backend="auto")` in a new process: resident memory added by the load and one
   forward (RSS; float rows likewise, after one forward so memory-mapped weights count), the
   kernel each layer runs (`report`), then forward latency with fp32, bf16 and the quantized model
   interleaved in one loop (their ratios share the machine's load), and SQNR against fp32.
The fp32 / fp16 rows load the diffusers checkpoint the same way.

    python scripts/benchmark.py                          # both models, all recipes (~1 h on 2 cores)
    python scripts/benchmark.py --model pixart --recipes w8a8,w4a16
    python scripts/benchmark.py --small                  # tiny configs: a smoke run in seconds
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RECIPES = ["w8a8", "w4a8-cpu", "w4a16", "svdquant-w4a4", "w8a8-static", "nvfp4", "fp8", "smoothquant-w8a8", "w4a8",
           "w8a8-tsa"]
CALIB_TIMESTEPS = (999, 750, 500, 250, 1)


# -- models and inputs --------------------------------------------------------------------------
def build(model: str, small: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if model == "pixart":
        from diffusers import PixArtTransformer2DModel

        return PixArtTransformer2DModel(
            sample_size=64, num_layers=2 if small else 28, attention_head_dim=72 if not small else 16,
            num_attention_heads=16 if not small else 2, in_channels=4, out_channels=8,
            cross_attention_dim=1152 if not small else 32, caption_channels=4096 if not small else 64, patch_size=2,
            norm_type="ada_norm_single", num_embeds_ada_norm=1000).eval()
    from diffusers import UNet2DConditionModel

    if small:
        return UNet2DConditionModel(
            sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=8, norm_num_groups=8).eval()
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768).eval()  # SD1.5's shape: 860 M


def inputs(model: torch.nn.Module, latent: int, timestep: int = 500) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(1)
    cfg = model.config
    x = torch.randn(1, cfg.in_channels, latent, latent, generator=g)
    if hasattr(cfg, "caption_channels"):
        text = torch.randn(1, 120, cfg.caption_channels, generator=g)
        return (x,), dict(encoder_hidden_states=text, timestep=torch.tensor([timestep]),
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    text = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    return (x,), dict(encoder_hidden_states=text, timestep=torch.tensor([timestep]), return_dict=False)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- the measurements, each run in its own process -----------------------------------------------
def _cast(args: tuple, kw: dict, dtype: torch.dtype) -> tuple[tuple, dict]:
    """Floating inputs in `dtype` (integer ones, such as timesteps, as they are)."""
    def c(v):  # noqa: ANN001, ANN202
        return v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
    return tuple(c(x) for x in args), {k: c(v) for k, v in kw.items()}


def job_baseline(a: argparse.Namespace) -> dict:
    model = build(a.model, a.small)
    model.save_pretrained(Path(a.work) / "fp32")
    model.half().save_pretrained(Path(a.work) / "fp16")
    return {"params": sum(p.numel() for p in model.parameters()),
            "fp32_disk": dir_bytes(Path(a.work) / "fp32"), "fp16_disk": dir_bytes(Path(a.work) / "fp16")}


def job_load_float(a: argparse.Namespace) -> dict:
    from diffusers import DiffusionPipeline  # noqa: F401 - import cost outside the measured RSS

    cls = type(build(a.model, True))
    before = rss_bytes()
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[a.dtype]
    model = cls.from_pretrained(Path(a.work) / a.dtype, torch_dtype=dtype).eval()
    args, kw = inputs(model, a.latent)
    with torch.no_grad():  # resident = after one forward, as for the quantized models (weights paged in)
        args, kw = _cast(args, kw, dtype)
        model(*args, **kw)
    return {"rss": rss_bytes() - before, "params": sum(p.numel() for p in model.parameters())}


def job_quantize(a: argparse.Namespace) -> dict:
    import dmquant

    cls = type(build(a.model, True))
    before = rss_bytes()
    model = cls.from_pretrained(Path(a.work) / "fp32").eval()  # as users do: quantize a loaded float model
    torch.stack([p.detach().sum() for p in model.parameters()])  # page the (memory-mapped) weights in
    model_rss = rss_bytes() - before
    recipe = dmquant.get_recipe(a.recipe)

    def calibrate(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for t in CALIB_TIMESTEPS:
                args, kw = inputs(m, a.latent, t)
                m(*args, **kw)

    t0 = time.perf_counter()
    dmquant.quantize(model, recipe, calibration=calibrate if recipe.needs_calibration else None)
    seconds = time.perf_counter() - t0
    quantize_peak = peak_rss_bytes() - before  # the process peak so far: quantize alone (saving comes next)
    out = Path(a.work) / a.recipe
    dmquant.save_quantized(model, out)
    return {"model_rss": model_rss, "peak_over_base": quantize_peak, "save_peak_over_base": peak_rss_bytes() - before,
            "quantize_s": seconds, "disk": dir_bytes(out)}


def _time_interleaved(runs: dict, repeats: int, warm: tuple[str, ...]) -> dict[str, list[float]]:
    """Seconds per call, one list per model: each repeat runs every model once, back to back."""
    for name in warm:
        runs[name]()  # warm-up: builds packed kernel weights
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def job_serve(a: argparse.Namespace) -> dict:
    import dmquant
    from dmquant.primitives import sqnr_db

    cls = type(build(a.model, True))
    act = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype or "fp32"]
    before = rss_bytes()
    q = dmquant.load_quantized(Path(a.work) / a.recipe, backend="auto", torch_dtype=act)
    args, kw = inputs(q, a.latent)
    args_q, kw_q = _cast(args, kw, act)
    with torch.no_grad():
        q(*args_q, **kw_q)  # resident after one forward: what the kernels hold (codes, prepacked weights)
    resident = rss_bytes() - before
    kernels = dmquant.report(q).kernels()  # per layer, for its weight dtype (the activation dtype here)
    fp32 = cls.from_pretrained(Path(a.work) / "fp32").eval()
    bf16 = cls.from_pretrained(Path(a.work) / "fp32", torch_dtype=torch.bfloat16).eval()
    args16, kw16 = _cast(args, kw, torch.bfloat16)
    with torch.no_grad():
        ref = fp32(*args, **kw)[0]
        quality = {"sqnr_q": sqnr_db(ref, q(*args_q, **kw_q)[0].float()),
                   "sqnr_bf16": sqnr_db(ref, bf16(*args16, **kw16)[0].float())}
        times = _time_interleaved({"fp32": lambda: fp32(*args, **kw), "bf16": lambda: bf16(*args16, **kw16),
                                   "q": lambda: q(*args_q, **kw_q)}, a.repeats, warm=("fp32", "q"))
    return {"resident": resident, "kernels": kernels, **quality, **{f"t_{k}": v for k, v in times.items()}}


JOBS = {"baseline": job_baseline, "load_float": job_load_float, "quantize": job_quantize, "serve": job_serve}


# -- orchestration ------------------------------------------------------------------------------
def run_job(job: str, a: argparse.Namespace, **extra: str) -> dict:
    cmd = [sys.executable, __file__, "--job", job, "--model", a.model, "--work", a.work, "--latent", str(a.latent),
           "--repeats", str(a.repeats), "--threads", str(a.threads), *(["--small"] if a.small else [])]
    for k, v in extra.items():
        cmd += [f"--{k}", v]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{job} {extra} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def speedup(r: dict, base: str, of: str = "q") -> str:
    """Median of the per-repeat ratios, with their range: each repeat timed both models back to back,
    so a ratio shares that moment's machine load; the range is how far the repeats disagree."""
    ratios = sorted(b / q for b, q in zip(r[f"t_{base}"], r[f"t_{of}"]))
    mid = statistics.median(ratios)
    return f"{mid:.2f}" if len(ratios) < 2 else f"{mid:.2f} [{ratios[0]:.2f}, {ratios[-1]:.2f}]"


def kernel_summary(kernels: dict[str, int]) -> str:
    total = sum(kernels.values())
    on = sum(n for k, n in kernels.items() if not k.startswith("simulated"))
    return f"{on}/{total} on kernels"


def table(model: str, base: dict, rows: dict[str, dict]) -> str:
    fp32, fp16 = base["fp32"], base["fp16"]
    lines = [f"### {model}: {base['params'] / 1e6:.0f} M params, latent {base['latent']}x{base['latent']}",
             "",
             "| model | layers on kernels | speed vs fp32 | speed vs bf16 | resident MiB | vs fp32 | vs fp16 | "
             "disk MiB | quantize peak / fp32 model | + save peak | SQNR vs fp32 dB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| fp32 | - | 1.00 | - | {mib(fp32['rss'])} | 1.00 | {fp32['rss'] / fp16['rss']:.2f} | "
             f"{mib(base['fp32_disk'])} | - | - | - |",
             f"| fp16 (storage) | - | - | - | {mib(fp16['rss'])} | {fp16['rss'] / fp32['rss']:.2f} | 1.00 | "
             f"{mib(base['fp16_disk'])} | - | - | - |"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:80]} |")
            continue
        lines.append(
            f"| {name} | {kernel_summary(r['kernels'])} | {speedup(r, 'fp32')} | {speedup(r, 'bf16')} | "
            f"{mib(r['resident'])} | {r['resident'] / fp32['rss']:.2f} | {r['resident'] / fp16['rss']:.2f} | "
            f"{mib(r['disk'])} | {r['peak_over_base'] / r['model_rss']:.2f} | "
            f"{r['save_peak_over_base'] / r['model_rss']:.2f} | {r['sqnr_q']:.1f} |")
    bf = next((r for r in rows.values() if "t_bf16" in r), None)
    if bf is not None:
        lines.append(f"\nbf16 in the same loops: {speedup(bf, 'fp32', 'bf16')}x the speed of fp32 "
                     f"(SQNR {bf['sqnr_bf16']:.1f} dB). Speeds: median over the repeats of the ratio "
                     "timed back to back, [lowest, highest].")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="both", choices=("pixart", "sd", "both"))
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--small", action="store_true", help="tiny configs (smoke run)")
    p.add_argument("--latent", type=int, default=32, help="latent side (PixArt: 32 -> 256 tokens)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--activations", default="fp32",
                   help="serve each quantized model with these activation dtypes (fp32,bf16): a row each")
    p.add_argument("--threads", type=int, default=1,
                   help="1 by default: on a shared 2-core machine OpenMP threads stall when a core is busy")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown tables here")
    p.add_argument("--job", choices=list(JOBS), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--recipe", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.job:
        print(json.dumps(JOBS[a.job](a)))
        return
    models = ["pixart", "sd"] if a.model == "both" else [a.model]
    out = [f"`python scripts/benchmark.py {' '.join(sys.argv[1:])}` ({torch.__version__}, "
           f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {a.threads} threads)"]
    for model in models:
        with tempfile.TemporaryDirectory() as work:
            sub = argparse.Namespace(**{**vars(a), "model": model, "work": work})
            base = {**run_job("baseline", sub), "latent": a.latent,
                    "fp32": run_job("load_float", sub, dtype="fp32"), "fp16": run_job("load_float", sub, dtype="fp16")}
            rows: dict[str, dict] = {}
            for recipe in a.recipes.split(","):
                print(f"[{model}] {recipe} ...", file=sys.stderr, flush=True)
                try:
                    made = run_job("quantize", sub, recipe=recipe)
                    for act in a.activations.split(","):
                        name = recipe if act == "fp32" else f"{recipe}, {act} activations"
                        rows[name] = {**made, **run_job("serve", sub, recipe=recipe, dtype=act)}
                except RuntimeError as err:
                    rows[recipe] = {"error": str(err).splitlines()[-1]}
                if a.out is not None:  # partial tables survive an interrupted run
                    a.out.mkdir(parents=True, exist_ok=True)
                    (a.out / f"{model}.md").write_text(table(model, base, rows) + "\n")
            out.append(table(model, base, rows))
            print(out[-1], flush=True)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "benchmark.md").write_text("\n\n".join(out) + "\n")


if __name__ == "__main__":
    main()
