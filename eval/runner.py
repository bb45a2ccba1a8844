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
from dmquant.api import quantized_components
from dmquant.pipelines import generate, load
from dmquant.pipelines.miniature import NAMES, WEIGHTS

from .backends import apply_backend
from .grid import html_report, save_grid
from .metrics import fid, psnr, ssim, video_metrics
from .table import format_table

log = logging.getLogger(__name__)
ALL_METRICS = ("psnr", "ssim", "lpips", "fid", "adherence", "clip", "vbench")


@dataclass
class EvalConfig:
    pipeline: str
    models: list[str]  # recipe names / YAML paths, saved quantized dirs, or "tool:config" backends
    prompts: list[str]
    seed: int = 0
    steps: int | None = None
    metrics: tuple[str, ...] = ("psnr", "ssim", "fid", "adherence", "vbench")
    out: Path = Path("outputs/eval")
    batch_size: int = 8
    extra: dict[str, Any] = field(default_factory=dict)  # clip_checkpoint, lpips_backbone

    def key(self) -> str:
        blob = json.dumps([self.pipeline, _weights_stamp(self.pipeline), self.prompts, self.seed, self.steps])
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _weights_stamp(pipeline: str) -> list[tuple[str, int, int]]:
    """(file, size, mtime) of a local pipeline's weights: retraining or replacing them must not reuse
    FP samples of the old ones. Names without a folder (tiny-*, cached hub ids) stamp as []."""
    folder = WEIGHTS / pipeline if pipeline in NAMES else Path(pipeline)
    if not folder.is_dir():
        return []
    return [(str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns)
            for f in sorted(folder.rglob("*.safetensors"))]


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
                             start_index=s, progress=False).contiguous()
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


def _fp_samples(cfg: EvalConfig) -> tuple[torch.Tensor, float]:
    cache = cfg.out / "cache" / f"fp-{cfg.key()}.safetensors"
    if cache.is_file():
        data = load_file(str(cache))
        return data["samples"], float(data["seconds"])
    pipe = load(cfg.pipeline)
    t0 = time.perf_counter()
    samples = _generate_sharded(pipe, cfg, f"fp-{cfg.key()}")
    seconds = time.perf_counter() - t0
    if _state().is_main_process:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({"samples": samples, "seconds": torch.tensor(seconds)}, str(cache))
    return samples, seconds


def calibration_prompts(pipeline: str, fallback: list[str], n: int = 16) -> list[str]:
    """Held-out captions for calibration (never the evaluation prompts) where the data is known."""
    from dmquant.pipelines import calibration_prompts as held_out

    return held_out(pipeline, n) if pipeline in NAMES else fallback[:n]


def _quantized_pipe(cfg: EvalConfig, model: str) -> Any:
    if Path(model).is_dir():
        return dmquant.load_quantized(model)
    pipe = load(cfg.pipeline)
    prompts = calibration_prompts(cfg.pipeline, cfg.prompts, cfg.extra.get("calib_prompts") or 16)
    seed = cfg.seed + 10**6
    if ":" in model:  # other libraries calibrate by running the pipeline
        def calibrate(p: Any = pipe) -> None:
            generate(p, prompts, seed=seed, steps=cfg.steps, progress=False)

        calibrate.description = {"prompts": prompts, "steps": cfg.steps, "seed": seed}
        return apply_backend(pipe, model, calibrate)
    # dmquant records the float trajectory on held-out prompts (recipe timestep selection kept)
    settings = {"prompts": prompts, "steps": cfg.steps, "seed": seed, "timesteps": cfg.extra.get("calib_timesteps")}
    return dmquant.quantize(pipe, model, calibration={k: v for k, v in settings.items() if v is not None})


def _metrics(cfg: EvalConfig, images: torch.Tensor, fp: torch.Tensor | None, pipe: Any) -> dict[str, Any]:
    from dmquant.pipelines import judge

    m: dict[str, Any] = {}
    referee = judge(cfg.pipeline) if cfg.pipeline in NAMES else None
    if "adherence" in cfg.metrics and referee is not None:
        scores = referee.adherence(images, cfg.prompts)
        m["adherence"] = sum(scores.values()) / len(scores)
        m.update({f"adherence_{k}": v for k, v in scores.items()})
    if "clip" in cfg.metrics and cfg.extra.get("clip_checkpoint"):
        from .metrics.clip import clip_score

        m["clip"] = float(clip_score(images, cfg.prompts, checkpoint=cfg.extra["clip_checkpoint"]).mean())
    if "vbench" in cfg.metrics and images.dim() == 5:  # per-frame features from the image judge
        m.update(video_metrics(images, judge("image").features if referee is not None else None))
    extractor = _fid_extractor(cfg, referee)
    if "fid" in cfg.metrics and referee is not None:
        m["fid_real"] = fid(images, _real_samples(cfg.pipeline, images.shape[0]), extractor=extractor,
                            weights=cfg.extra.get("inception_weights")).value
    if fp is None:
        return m
    if "psnr" in cfg.metrics:
        m["psnr"] = float(psnr(images, fp).mean())
    if "ssim" in cfg.metrics:
        m["ssim"] = float(ssim(images, fp).mean())
    if "lpips" in cfg.metrics:
        from .metrics.similarity import lpips

        m["lpips"] = float(lpips(images, fp, backbone=cfg.extra.get("lpips_backbone")).mean())
    if "fid" in cfg.metrics and extractor is not None:
        m["fid_fp"] = fid(images, fp, extractor=extractor, weights=cfg.extra.get("inception_weights")).value
    if quantized_components(pipe):  # other libraries' models carry no dmquant report
        m["model_mb"] = dmquant.report(pipe).quant_bytes / 2**20
        calib = next(iter(quantized_components(pipe).values())).dmquant_state.provenance.get("calibration")
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
    unknown = set(cfg.metrics) - set(ALL_METRICS)
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; choose from {ALL_METRICS}")
    cfg.out.mkdir(parents=True, exist_ok=True)
    fp, fp_seconds = _fp_samples(cfg)
    rows = [{"name": "FP", **_metrics(cfg, fp, None, None)}]
    columns = {"FP": fp}
    for model in cfg.models:
        pipe = _quantized_pipe(cfg, model)
        t0 = time.perf_counter()
        images = _generate_sharded(pipe, cfg, f"{Path(model).name}-{cfg.key()}")
        row = {"name": Path(model).name, **_metrics(cfg, images, fp, pipe),
               "latency_ratio": (time.perf_counter() - t0) / max(fp_seconds, 1e-9)}
        rows.append(row)
        columns[row["name"]] = images
    if _state().is_main_process:
        _write(cfg, rows, columns)
    return rows


def _write(cfg: EvalConfig, rows: list[dict[str, Any]], columns: dict[str, torch.Tensor]) -> None:
    meta = {"pipeline": cfg.pipeline, "seed": cfg.seed, "steps": cfg.steps, "num_samples": len(cfg.prompts),
            "prompts": cfg.prompts}
    (cfg.out / "metrics.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    table = format_table(rows, n_samples=len(cfg.prompts))
    shown = min(len(cfg.prompts), 8)
    grid = save_grid(cfg.out / "grid", cfg.prompts[:shown], {k: v[:shown] for k, v in columns.items()})
    (cfg.out / "results.md").write_text(f"# {cfg.pipeline}: {len(cfg.prompts)} prompts, seed {cfg.seed}\n\n{table}\n")
    html_report(cfg.out / "report.html", f"dmquant eval: {cfg.pipeline}", rows, [grid], n_samples=len(cfg.prompts))
    print(table)
