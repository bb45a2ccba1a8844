"""Refuse an evaluation that would report less than it was asked for, before it generates anything.

Every requested metric must be computable (its weights found, its judge present, its sample floor
met), and a saved quantized checkpoint must come from the pipeline whose FP samples it is scored
against: a PixArt checkpoint compared with SD's FP images gives numbers that mean nothing.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from dmquant.pipelines.miniature import NAMES, WEIGHTS

from .metrics.fid import MIN_SAMPLES

TINY_PREFIX = "tiny-"
ALL_METRICS = ("psnr", "ssim", "lpips", "fid", "adherence", "clip", "vbench")
log = logging.getLogger(__name__)


def _pipeline_index(pipeline: str) -> dict[str, Any] | None:
    """model_index.json of a miniature or a local diffusers folder (None for tiny or hub names)."""
    folder = WEIGHTS / pipeline if pipeline in NAMES else Path(pipeline)
    index = folder / "model_index.json"
    return json.loads(index.read_text()) if index.is_file() else None


def pipeline_class(pipeline: str) -> str | None:
    """The diffusers pipeline class a name stands for, where it is known without loading it."""
    from dmquant.pipelines import FAMILIES

    if pipeline.startswith(TINY_PREFIX) and pipeline[len(TINY_PREFIX):] in FAMILIES:
        return FAMILIES[pipeline[len(TINY_PREFIX):]].pipelines[0]
    index = _pipeline_index(pipeline)
    return index["_class_name"] if index else None


def is_video(pipeline: str) -> bool | None:
    """Whether a pipeline makes videos (None: unknown until it is loaded)."""
    from dmquant.pipelines import family_of

    cls = pipeline_class(pipeline)
    return None if cls is None else family_of(cls).is_video


def check_checkpoint(pipeline: str, folder: str | Path) -> None:
    """A saved quantized pipeline must have been quantized from `pipeline`: same pipeline class,
    same source folder where both are known, same denoiser configuration."""
    folder = Path(folder)
    if not (folder / "quantization.json").is_file():
        raise FileNotFoundError(f"{folder} is not a saved dmquant directory (no quantization.json)")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"{folder} holds a bare quantized model, not a pipeline: it cannot generate samples")
    saved = json.loads(index_file.read_text())
    expected_cls = pipeline_class(pipeline)
    if expected_cls is not None and saved["_class_name"] != expected_cls:
        raise ValueError(f"{folder} was quantized from a {saved['_class_name']}, but --pipeline {pipeline} is a "
                         f"{expected_cls}: its samples cannot be scored against {pipeline}'s FP samples")
    fp_folder = WEIGHTS / pipeline if pipeline in NAMES else Path(pipeline)
    source = saved.get("_name_or_path")
    if source and fp_folder.is_dir() and Path(source).resolve() != fp_folder.resolve():
        raise ValueError(f"{folder} was quantized from {source}, not from {fp_folder}: evaluate it with "
                         f"--pipeline {source}")
    from dmquant.pipelines import family_of

    denoiser = family_of(saved["_class_name"]).denoiser
    ours, theirs = folder / denoiser / "config.json", fp_folder / denoiser / "config.json"
    if ours.is_file() and theirs.is_file():
        drop = lambda c: {k: v for k, v in c.items()  # noqa: E731  (versions, paths, the plan dmquant records)
                          if not k.startswith("_") and k != "quantization_config"}
        if drop(json.loads(ours.read_text())) != drop(json.loads(theirs.read_text())):
            raise ValueError(f"{folder}'s {denoiser} configuration differs from {fp_folder}'s: "
                             "not a quantized copy of this pipeline")


def default_metrics(pipeline: str, n_prompts: int) -> tuple[str, ...]:
    """Every metric that applies without extra files: PSNR and SSIM; adherence, and FID from
    MIN_SAMPLES prompts, with a miniature's judge; VBench-style scores for video pipelines."""
    chosen = ["psnr", "ssim"]
    if pipeline in NAMES:
        chosen += ["adherence"] + (["fid"] if n_prompts >= MIN_SAMPLES else [])
    if is_video(pipeline):
        chosen.append("vbench")
    if pipeline in NAMES and n_prompts < MIN_SAMPLES:
        log.info("FID left out: %d prompts < %d (ask for it with more prompts)", n_prompts, MIN_SAMPLES)
    return tuple(chosen)


def check_metrics(metrics: tuple[str, ...], pipeline: str, n_prompts: int, extra: dict[str, Any]) -> None:
    """Raise, naming every problem, if any requested metric could not be computed."""
    unknown = set(metrics) - set(ALL_METRICS)
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; choose from {ALL_METRICS}")
    miniature = pipeline in NAMES
    problems = []
    if "adherence" in metrics and not miniature:
        problems.append(f"adherence needs a miniature's judge; {pipeline} has none (use clip with --clip-checkpoint)")
    if "vbench" in metrics and is_video(pipeline) is False:
        problems.append(f"vbench scores videos; {pipeline} makes images")
    if "fid" in metrics:
        if n_prompts < MIN_SAMPLES:
            problems.append(f"FID from {n_prompts} samples is dominated by its covariance estimate: refused below "
                            f"{MIN_SAMPLES} (raise --num-prompts or drop fid)")
        if not miniature and not extra.get("fid_extractor"):
            problems.append(f"FID on {pipeline} needs --fid-extractor inception or clean-fid (there is no judge)")
    for name, probe in (("clip", _probe_clip), ("lpips", _probe_lpips), ("fid", _probe_fid)):
        if name in metrics:
            try:
                probe(extra)
            except (FileNotFoundError, ImportError) as err:
                problems.append(str(err))
    if problems:
        raise ValueError("cannot compute every requested metric:\n  - " + "\n  - ".join(problems))


def _probe_clip(extra: dict[str, Any]) -> None:
    from .metrics.clip import clip_checkpoint

    clip_checkpoint(extra.get("clip_checkpoint"))


def _probe_lpips(extra: dict[str, Any]) -> None:
    from .metrics.similarity import lpips_backbone_file

    lpips_backbone_file(backbone=extra.get("lpips_backbone"))


def _probe_fid(extra: dict[str, Any]) -> None:
    """A named Inception is built now (weights file and package found) rather than after sampling."""
    from .metrics.fid import resolve_extractor

    if extra.get("fid_extractor") in ("inception", "clean-fid"):
        resolve_extractor(extra["fid_extractor"], extra.get("inception_weights"))
