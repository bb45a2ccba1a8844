"""Typed arguments of every recipe step, checked when a recipe is built.

Each step's arguments are a frozen dataclass here; `Step(name, args)` validates its `args` against it,
so `{gptq: {blocksize: 64}}` fails at once (with the valid names) instead of after the float
trajectory is recorded. The step functions (`dmquant.steps.STEPS`) take exactly these fields as
keyword arguments; `tests/test_architecture.py` keeps the two in step. This module sits at the bottom
of the import graph: it imports nothing from dmquant.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Union

SMOOTHING_ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # SmoothQuant's grid when no alpha is given


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ (Frantar et al. 2022): lazy-batch `block_size`, Hessian dampening `damp` (of its mean
    diagonal), `act_order` (columns by decreasing Hessian diagonal), `sequential` (Hessians of the
    already-quantized prefix, block after block)."""

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    sequential: bool = False


@dataclass(frozen=True)
class RangesConfig:
    """Freeze the static activation scales still missing (takes no arguments)."""


@dataclass(frozen=True)
class AdaRoundConfig:
    """BRECQ block reconstruction of AdaRound weights (`dmquant.algorithms.reconstruction`)."""

    blocks: tuple[str, ...] | None = None  # None: the default block patterns
    iters: int = 1000
    lr: float = 1e-2
    batch_size: int = 4
    weight: float = 0.1
    beta: tuple[float, ...] = (20.0, 2.0)
    warmup: float = 0.2
    lsq: bool = False
    lsq_lr: float = 1e-3
    skip: str | None = None
    samples: int | None = None
    seed: int = 0
    temporal: str | None = None  # TFMQ-DM's TIAR on these layers first (e.g. role:temporal), not in the blocks


@dataclass(frozen=True)
class SplitShortcutConfig:
    """Q-Diffusion's split quantization of UNet skip concatenations (takes no arguments)."""


@dataclass(frozen=True)
class ParoConfig:
    """PAROAttention: each head's Q/K token order from calibration (takes no arguments)."""


@dataclass(frozen=True)
class TemporalConfig:
    """TFMQ-DM: static input scales of the temporal (time-embedding) layers per visited timestep."""

    pattern: str | None = None  # None: the default temporal-layer pattern


@dataclass(frozen=True)
class VQConfig:
    """VQ4DiT: per-layer codebooks of `2**(bits*dim)` entries over `dim`-vectors, `candidates` per
    sub-vector, relaxed assignments trained for `iters` steps at `lr`."""

    bits: int = 2
    dim: int = 4
    candidates: int = 8
    iters: int = 300
    lr: float = 1e-2


@dataclass(frozen=True)
class SmoothQuantConfig:
    """SmoothQuant (or SVDQuant's smoothing when `rank` > 0): `alpha` fixed or searched over a grid."""

    alpha: float | tuple[float, ...] = SMOOTHING_ALPHAS
    fold: bool = True
    timestep_aware: bool = False
    buckets: int = 4
    samples: int = 256
    rank: int = 0


@dataclass(frozen=True)
class RotateConfig:
    """Orthogonal rotation of layer inputs (QuaRot-style), folded into the previous layer when `fold`."""

    kind: str = "hadamard"  # block-diagonal Hadamard | random (stored n x n) | kron (full: R (x) H)
    seed: int = 0
    fold: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("hadamard", "random", "kron"):
            raise ValueError(f"rotation kind must be hadamard, random or kron, got {self.kind!r}")


@dataclass(frozen=True)
class SVDConfig:
    """SVDQuant's low-rank branch: `rank` for every layer, or per layer from `ranks`."""

    rank: int = 32
    ranks: dict[str, int] | None = None


@dataclass(frozen=True)
class DistillConfig:
    """Loop settings shared by the fine-tuning steps (see each step's docstring for its defaults)."""

    iters: int = 100
    lr: float = 1e-3
    batch_size: int = 4  # trajectory calls per optimizer step
    lsq_lr: float = 1e-3  # step sizes: relative to each scale tensor's mean
    branch_lr: float = 1e-3  # low-rank branch factors (efficientdm `branch`): relative to each one's mean
    smooth_lr: float = 5e-3  # log smoothing scales (efficientdm `smooth`): absolute, in log units
    feature_weight: float = 0.0  # block-wise feature loss weight (0: output loss only)
    blocks: tuple[str, ...] | None = None  # None: the default block patterns
    mixed_precision: str = "no"  # accelerate: "no" | "fp16" | "bf16"
    checkpoint: str | None = None  # directory; the file is <checkpoint>/<name>.safetensors
    checkpoint_every: int = 50
    resume: bool = False
    seed: int = 0
    trajectory: str = "float"  # inputs: "float" (the calibration trajectory) | "student" (re-sampled)
    refresh_every: int = 50  # "student": re-sample the trajectory every this many steps
    lr_schedule: str = "constant"  # every learning rate: "constant" | "cosine" (decays to 0 at `iters`)
    drop: float = 0.0  # QDrop: probability that an activation element skips its quantizer while training
    guidance: float | None = None  # loss on the classifier-free guided output at this scale (None: per half)
    objective: str = "call"  # "call": each recorded call's output | "sample": final latents of whole sampling runs
    prompts: int | None = None  # own data set: this many calibration prompts' float trajectory (None: the recipe's)

    def __post_init__(self) -> None:
        if self.iters < 0 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("fine-tuning needs iters >= 0, batch_size >= 1 and checkpoint_every >= 1")
        if self.trajectory not in ("float", "student"):
            raise ValueError(f"trajectory must be float or student, got {self.trajectory!r}")
        if self.trajectory == "student" and (self.refresh_every < 1 or self.checkpoint_every % self.refresh_every):
            raise ValueError("trajectory: student needs refresh_every >= 1 dividing checkpoint_every (a resumed "
                             f"run re-samples where the uninterrupted one did); got {self.refresh_every} and "
                             f"{self.checkpoint_every}")
        if self.prompts is not None and self.prompts < 1:
            raise ValueError(f"prompts is the number of calibration prompts to fine-tune on: it must be >= 1, "
                             f"got {self.prompts}")
        if self.objective not in ("call", "sample"):
            raise ValueError(f"objective must be call or sample, got {self.objective!r}")
        if self.objective == "sample" and (self.trajectory != "float" or self.feature_weight or self.guidance):
            raise ValueError("objective: sample trains on whole sampling runs of the quantized model (its own "
                             "trajectory, guidance as sampled): trajectory, feature_weight and guidance are "
                             "options of the per-call objective")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if not 0.0 <= self.drop < 1.0:
            raise ValueError(f"drop is the probability that an activation skips its quantizer while training: "
                             f"it must be in [0, 1), got {self.drop}")
        if self.guidance is not None and not (math.isfinite(self.guidance) and self.guidance > 1.0):
            raise ValueError(f"guidance is the sampler's classifier-free guidance scale, which batches an "
                             f"unconditional and a conditional half only above 1: got {self.guidance}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")


@dataclass(frozen=True)
class EfficientDMConfig(DistillConfig):
    """EfficientDM: QALoRA adapters of `rank` on every weight-quantized layer (not `skip`)."""

    rank: int = 8
    lsq: bool = True
    scale_aware: bool = True
    skip: str | None = None
    branch: bool = False  # also train the 16-bit low-rank branch of the layers that have one (SVDQuant)
    smooth: bool = False  # also train a per-input-channel smoothing scale of every layer (folded into x / s)


@dataclass(frozen=True)
class QuestConfig(DistillConfig):
    """QuEST: adapters on the `top` most sensitive layers plus the temporal ones."""

    rank: int = 8
    top: float = 0.25
    temporal: str | None = None  # None: the default temporal-layer pattern
    samples: int = 4
    lsq: bool = True
    scale_aware: bool = True


@dataclass(frozen=True)
class QVGenConfig(DistillConfig):
    """QVGen: adapters plus an auxiliary branch of `aux_rank` decayed to zero by SVD rank cuts."""

    rank: int = 8
    aux_rank: int = 8
    decay: float = 0.5
    gamma: float = 1e-2
    lsq: bool = True
    scale_aware: bool = True


STEP_CONFIGS: dict[str, type] = {
    "gptq": GPTQConfig, "ranges": RangesConfig, "adaround": AdaRoundConfig, "split_shortcut": SplitShortcutConfig,
    "temporal": TemporalConfig, "vq": VQConfig, "smoothquant": SmoothQuantConfig, "rotate": RotateConfig,
    "svd": SVDConfig, "efficientdm": EfficientDMConfig, "quest": QuestConfig, "qvgen": QVGenConfig,
    "paro": ParoConfig,
}


def step_config(name: str, args: dict[str, Any], where: str = "step") -> Any:
    """The typed config of step `name` from `args`: unknown steps, unknown arguments and values of the
    wrong type are refused with what would be valid."""
    if name not in STEP_CONFIGS:
        raise ValueError(f"{where}: unknown recipe step {name!r}; available steps: {sorted(STEP_CONFIGS)}")
    if not isinstance(args, dict):
        raise TypeError(f"{where}.args: expected a mapping, got {type(args).__name__}")
    cls = STEP_CONFIGS[name]
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(args) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown argument(s) {unknown} for step {name!r}; valid: {valid or 'none'}")
    values = {k: _coerce(v, hints[k], f"{where}.args.{k}") for k, v in args.items()}
    return cls(**values)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` checked against a type hint (YAML lists become tuples, ints are accepted as floats)."""
    origin, params = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in params:
            return None
        errors = []
        for option in (p for p in params if p is not type(None)):
            try:
                return _coerce(value, option, where)
            except TypeError as err:
                errors.append(str(err))
        raise TypeError(errors[-1] if len(errors) == 1 else f"{where}: {value!r} is not a {_name(hint)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, params[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(k, params[0], where): _coerce(v, params[1], f"{where}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise TypeError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _name(hint: Any) -> str:
    return " or ".join("none" if a is type(None) else getattr(a, "__name__", str(a)) for a in typing.get_args(hint))
