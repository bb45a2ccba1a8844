"""Run an evaluation: FP and quantized samples on identical seeds, both metric families, pictures.

FP samples are cached per (pipeline and its weight files, prompts, seed, steps), so a second recipe
does not regenerate them and retrained weights do. Prompts are sharded across processes when launched
with accelerate; results are gathered on the main process and equal a single-process run (each
prompt's seed depends only on its index).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import dmquant
from dmquant.api import AUTO_PREFIX
from dmquant.calibration import CalibrationSet
from dmquant.components import denoiser_path, get_path
from dmquant.pipelines import generate, load
from dmquant.pipelines.miniature import NAMES, WEIGHTS
from dmquant.state import quantized_components

from .backends import apply_backend, module_bytes
from .bootstrap import bootstrap_ci
from .checks import check_checkpoint, check_metrics, default_metrics
from .grid import html_report, save_grid
from .metrics import psnr, ssim, video_scores
from .metrics.fid import frechet_distance as fid_from_features
from .metrics.fid import resolve_extractor
from .table import format_table

log = logging.getLogger(__name__)
FID_RESAMPLES = 200


@dataclass
class EvalConfig:
    pipeline: str
    models: list[str]  # recipe names / YAML paths, saved quantized dirs, or "tool:config" backends
    prompts: list[str]
    seed: int = 0
    steps: int | None = None
    metrics: tuple[str, ...] | None = None  # None: every metric that applies (checks.default_metrics)
    out: Path = Path("outputs/eval")
    batch_size: int = 8
    extra: dict[str, Any] = field(default_factory=dict)  # clip_checkpoint, lpips_backbone, perturb, ...
    device: str = "cpu"  # every pipeline (FP, recipes, saved checkpoints, peers) runs here
    dtype: str = "float32"  # float32, bfloat16 or float16: the pipelines' float dtype
    guidance_scale: float | None = None  # None: generate's default (also for calibration runs)

    def key(self) -> str:
        run = [self.device, self.dtype, self.guidance_scale]
        blob = json.dumps([self.pipeline, _weights_stamp(self.pipeline), self.prompts, self.seed, self.steps,
                           self.extra.get("perturb"), *([run] if run != ["cpu", "float32", None] else [])])
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; use one of {sorted(DTYPES)}")
        return DTYPES[self.dtype]


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def _weights_stamp(pipeline: str) -> list[tuple[str, int, int]]:
    """(file, size, mtime) of a local pipeline's weights: retraining or replacing them must not reuse
    FP samples of the old ones. Names without a folder (tiny-*, cached hub ids) stamp as []."""
    folder = WEIGHTS / pipeline if pipeline in NAMES else Path(pipeline)
    if not folder.is_dir():
        return []
    return [(str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns)
            for f in sorted(folder.rglob("*.safetensors"))]


def perturb_denoiser(pipe: Any, seed: int, relative: float = 2.0**-23) -> Any:
    """Multiply the denoiser's latent input by (1 +- `relative`) at every call (random signs from
    `seed`): about one float32 ulp, what another CPU's float code path changes. Used to measure how
    far chaotic quantized sampling moves a metric when the method does not change
    (dmquant.eval.spread)."""
    from dmquant.components import denoiser_path, get_path

    gen = torch.Generator().manual_seed(seed)

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        sign = torch.randint(0, 2, x.shape, generator=gen).to(x) * 2 - 1
        x = x * (1 + relative * sign)
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, ("hidden_states" if "hidden_states" in kwargs else "sample"): x}

    get_path(pipe, denoiser_path(pipe)).register_forward_pre_hook(hook, with_kwargs=True)
    return pipe


def _load(cfg: EvalConfig) -> Any:
    runtime = {k: v for k, v in (("dtype", cfg.torch_dtype), ("device", cfg.device))
               if v not in (torch.float32, "cpu")}  # defaults left to load's own
    pipe = load(cfg.pipeline, **runtime)
    return pipe if cfg.extra.get("perturb") is None else perturb_denoiser(pipe, cfg.extra["perturb"])


def _state():
    from accelerate import PartialState

    return PartialState()


def _generate_sharded(pipe: Any, cfg: EvalConfig, tag: str) -> torch.Tensor:
    """Batches are dealt round-robin to processes and reassembled in order on the main process.
    Every batch holds the same prompts as in a single-process run, so results are bitwise equal."""
    state = _state()
    n, bs = len(cfg.prompts), cfg.batch_size
    starts = list(range(0, n, bs))
    mine = starts[state.process_index::state.num_processes]
    shard_dir = cfg.out / "shards" / tag
    shard_dir.mkdir(parents=True, exist_ok=True)
    done = {str(s): generate(pipe, cfg.prompts[s:s + bs], seed=cfg.seed, steps=cfg.steps, batch_size=bs,
                             start_index=s, progress=False, guidance_scale=cfg.guidance_scale).contiguous()
            for s in tqdm(mine, desc=f"generate {tag.split('-')[0]}", unit="batch", disable=not state.is_main_process)}
    if done:
        save_file(done, str(shard_dir / f"{state.process_index}.safetensors"))
    state.wait_for_everyone()
    files = [shard_dir / f"{i}.safetensors" for i in range(state.num_processes)]
    batches = {int(k): v for f in files if f.is_file() for k, v in load_file(str(f)).items()}
    samples = torch.cat([batches[s] for s in starts])
    state.wait_for_everyone()
    if state.is_main_process:  # shards are only a hand-over between processes
        for f in files:
            f.unlink(missing_ok=True)
        shard_dir.rmdir()
    return samples


def _fp_samples(cfg: EvalConfig) -> tuple[torch.Tensor, float, int]:
    """FP samples, the seconds they took and the FP denoiser's bytes (cached together)."""
    cache = cfg.out / "cache" / f"fp-{cfg.key()}.safetensors"
    if cache.is_file():
        data = load_file(str(cache))
        return data["samples"], float(data["seconds"]), int(data["bytes"])
    pipe = _load(cfg)
    t0 = time.perf_counter()
    samples = _generate_sharded(pipe, cfg, f"fp-{cfg.key()}")
    seconds = time.perf_counter() - t0
    size = module_bytes(get_path(pipe, denoiser_path(pipe)))
    if _state().is_main_process:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({"samples": samples, "seconds": torch.tensor(seconds), "bytes": torch.tensor(size)}, str(cache))
    return samples, seconds, size


def calibration_prompts(pipeline: str, eval_prompts: list[str], n: int = CalibrationSet.num_prompts) -> list[str]:
    """`n` calibration prompts of `pipeline` disjoint from the evaluation prompts (see
    `dmquant.pipelines.calibration_prompts`), with the flag that fixes a shortfall."""
    from dmquant.pipelines import calibration_prompts as held_out

    try:
        return held_out(pipeline, n, exclude=eval_prompts)
    except ValueError as e:
        raise ValueError(f"{pipeline!r}: {e}: evaluate on other prompts or fewer calibration prompts "
                         "(--calib-prompts)") from None


def _calib_count(cfg: EvalConfig, model: str) -> int:
    """How many prompts calibrate `model`: --calib-prompts, else the recipe's own `calibration.num_prompts`
    (a recipe tuned on more prompts is measured as shipped), else CalibrationSet's default."""
    if cfg.extra.get("calib_prompts"):
        return cfg.extra["calib_prompts"]
    if ":" in model or model.lower().startswith(AUTO_PREFIX):
        return CalibrationSet.num_prompts
    return int(dmquant.get_recipe(model).calibration.get("num_prompts", CalibrationSet.num_prompts))


def _quantized_pipe(cfg: EvalConfig, model: str) -> Any:
    if Path(model).is_dir():
        return dmquant.load_quantized(model, device=cfg.device, torch_dtype=cfg.torch_dtype)
    pipe = _load(cfg)
    n, seed = _calib_count(cfg, model), cfg.seed + 10**6
    if ":" in model:  # other libraries calibrate by running the pipeline
        prompts = calibration_prompts(cfg.pipeline, cfg.prompts, n)

        def calibrate(p: Any = pipe) -> None:
            generate(p, prompts, seed=seed, steps=cfg.steps, progress=False, guidance_scale=cfg.guidance_scale)

        calibrate.description = {"prompts": prompts, "steps": cfg.steps, "seed": seed,
                                  "guidance_scale": cfg.guidance_scale}
        return apply_backend(pipe, model, calibrate)
    # dmquant records the float trajectory on held-out prompts (recipe timestep selection kept); drawn
    # by the calibration set, so a fine-tuning step's own larger set is disjoint from the scored ones too
    settings = {"num_prompts": n, "exclude": cfg.prompts, "steps": cfg.steps, "seed": seed,
                "timesteps": cfg.extra.get("calib_timesteps"),
                "guidance_scale": cfg.guidance_scale}
    return dmquant.quantize(pipe, model, calibration={k: v for k, v in settings.items() if v is not None})


def _adherence(referee: Any, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, float]]:
    """Per prompt: the fraction of its attributes the judge recognises; plus the per-attribute rates."""
    from dmquant.pipelines import parse_prompt

    pred = referee.predict(images)
    labels = [parse_prompt(p) for p in prompts]
    per = [sum(int(pred[a][i]) == v for a, v in lab.items() if a in pred) / max(sum(a in pred for a in lab), 1)
           for i, lab in enumerate(labels)]
    return torch.tensor(per, dtype=torch.float64), referee.adherence(images, prompts)


def _fid(images: torch.Tensor, other: torch.Tensor, cfg: EvalConfig, extractor: Any) -> dict[str, Any]:
    """FID with its bootstrap interval (both sets resampled with one index draw; fewer resamples than
    the per-prompt metrics, since each refits two Gaussians)."""
    fn, name = resolve_extractor(extractor, cfg.extra.get("inception_weights"))
    flat = isinstance(extractor, str) and images.dim() == 5  # named Inceptions see frames as images
    feats = [torch.cat([fn(c) for c in (x.flatten(0, 1) if flat else x).split(64)]).double() for x in (images, other)]
    n = min(f.shape[0] for f in feats)
    value = fid_from_features(*feats)
    ci = bootstrap_ci(lambda idx: fid_from_features(feats[0][idx], feats[1][idx]), n, resamples=FID_RESAMPLES,
                      center=value)  # resampling inflates FID: the interval is centred on the estimate
    return {"value": value, "ci": list(ci), "n": n, "extractor": name}


def _metrics(cfg: EvalConfig, images: torch.Tensor, fp: torch.Tensor | None, pipe: Any) -> dict[str, Any]:
    """One results row: every requested metric (validated in `check_metrics`), with a 95 % bootstrap
    interval over prompts (`<key>_ci`) and the per-prompt values for paired comparisons."""
    from dmquant.pipelines import judge

    per: dict[str, torch.Tensor] = {}
    m: dict[str, Any] = {}
    referee = judge(cfg.pipeline) if cfg.pipeline in NAMES else None
    if "adherence" in cfg.metrics:
        per["adherence"], by_attribute = _adherence(referee, images, cfg.prompts)
        m.update({f"adherence_{k}": v for k, v in by_attribute.items()})
    if "clip" in cfg.metrics:
        from .metrics.clip import clip_score

        per["clip"] = clip_score(images, cfg.prompts, checkpoint=cfg.extra.get("clip_checkpoint"))
    if "vbench" in cfg.metrics:  # per-frame features from the image judge
        per.update(video_scores(images, judge("image").features if referee is not None else None))
    extractor = _fid_extractor(cfg, referee)
    if "fid" in cfg.metrics and referee is not None:
        fid_real = _fid(images, _real_samples(cfg.pipeline, images.shape[0]), cfg, extractor)
        m.update(fid_real=fid_real["value"], fid_real_ci=fid_real["ci"], fid_real_n=fid_real["n"])
    if fp is not None:
        if "psnr" in cfg.metrics:
            per["psnr"] = psnr(images, fp)
        if "ssim" in cfg.metrics:
            per["ssim"] = ssim(images, fp)
        if "lpips" in cfg.metrics:
            from .metrics.similarity import lpips

            per["lpips"] = lpips(images, fp, backbone=cfg.extra.get("lpips_backbone"))
        if "fid" in cfg.metrics:
            fid_fp = _fid(images, fp, cfg, extractor)
            m.update(fid_fp=fid_fp["value"], fid_fp_ci=fid_fp["ci"], fid_fp_n=fid_fp["n"])
    for key, values in per.items():
        m[key] = float(values.double().mean())
        m[f"{key}_ci"] = list(bootstrap_ci(values))
    m["per_prompt"] = {k: [float(x) for x in v] for k, v in per.items()}
    return m


def _cost(pipe: Any) -> dict[str, Any]:
    """Denoiser bytes and quantized layer count of a dmquant or other-library model."""
    info = getattr(pipe, "backend_info", None)
    if info is not None:
        return {"model_mb": info["bytes"] / 2**20, "layers": info["layers"]}
    states = {path: module.dmquant_state for path, module in quantized_components(pipe).items()}
    m: dict[str, Any] = {"model_mb": dmquant.report(pipe).quant_bytes / 2**20,
                         "layers": str(sum(s.plan[n].kind == "layer" for s in states.values() for n in s.plan))}
    calib = next(iter(states.values())).provenance.get("calibration") if states else None
    if isinstance(calib, dict) and "seconds" in calib:
        m["calib_seconds"] = calib["seconds"]
    return m


def _fid_extractor(cfg: EvalConfig, referee: Any) -> Any:
    """The judge for miniatures unless an Inception extractor is asked for (local weights only)."""
    name = cfg.extra.get("fid_extractor") or ("judge" if referee is not None else None)
    return referee if name == "judge" else name


def _real_samples(pipeline: str, n: int) -> torch.Tensor:
    """Procedural 'real' data of the miniature's kind (held-out seed), for FID vs real."""
    from dmquant.pipelines import make_images, make_videos

    return (make_videos if pipeline == "miniature-latte" else make_images)(n, seed=10**7).pixels


def evaluate(cfg: EvalConfig) -> list[dict[str, Any]]:
    """Metrics rows (FP first), plus metrics.json, results.md, grid and report.html under cfg.out."""
    if cfg.metrics is None:
        cfg.metrics = default_metrics(cfg.pipeline, len(cfg.prompts))
    check_metrics(cfg.metrics, cfg.pipeline, len(cfg.prompts), cfg.extra)
    for model in cfg.models:
        if Path(model).is_dir():
            check_checkpoint(cfg.pipeline, model)
            continue
        # a bad recipe or step argument, or too few disjoint calibration prompts, fails now, not after
        # the rows before it ran
        calibration_prompts(cfg.pipeline, cfg.prompts, _calib_count(cfg, model))
    cfg.out.mkdir(parents=True, exist_ok=True)
    fp, fp_seconds, fp_bytes = _fp_samples(cfg)
    rows = [{"name": "FP", **_metrics(cfg, fp, None, None), "model_mb": fp_bytes / 2**20}]
    columns = {"FP": fp}
    for model in cfg.models:
        pipe = _quantized_pipe(cfg, model)
        t0 = time.perf_counter()
        images = _generate_sharded(pipe, cfg, f"{Path(model).name}-{cfg.key()}")
        row = {"name": Path(model).name, **_metrics(cfg, images, fp, pipe), **_cost(pipe),
               "latency_ratio": (time.perf_counter() - t0) / max(fp_seconds, 1e-9)}
        rows.append(row)
        columns[row["name"]] = images
    if _state().is_main_process:
        _write(cfg, rows, columns)
    return rows


def _write(cfg: EvalConfig, rows: list[dict[str, Any]], columns: dict[str, torch.Tensor]) -> None:
    meta = {"pipeline": cfg.pipeline, "seed": cfg.seed, "steps": cfg.steps, "num_samples": len(cfg.prompts),
            "device": cfg.device, "dtype": cfg.dtype, "guidance_scale": cfg.guidance_scale, "prompts": cfg.prompts}
    (cfg.out / "metrics.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    table = format_table(rows, n_samples=len(cfg.prompts))
    shown = min(len(cfg.prompts), 8)
    grid = save_grid(cfg.out / "grid", cfg.prompts[:shown], {k: v[:shown] for k, v in columns.items()})
    (cfg.out / "results.md").write_text(f"# {cfg.pipeline}: {len(cfg.prompts)} prompts, seed {cfg.seed}\n\n{table}\n")
    html_report(cfg.out / "report.html", f"dmquant eval: {cfg.pipeline}", rows, [grid], n_samples=len(cfg.prompts))
    print(table)
