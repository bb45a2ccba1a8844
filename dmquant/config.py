"""Typed, frozen configuration: what to quantize and how. Round-trips through dicts, JSON and YAML.

Unknown keys are refused with the list of valid ones, so a typo in a recipe never silently falls back
to a default.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any

from .families import ROLES, resolve_pattern
from .formats import BlockFormat, FloatFormat, get_format
from .granularity import PerGroup, PerToken, parse_granularity
from .observers import parse_observer
from .step_configs import DistillConfig, step_config

RECIPE_VERSION = 1
BACKENDS = ("fake", "auto", "cpu", "fbgemm", "cuda")  # "fbgemm": the CPU int GEMM only (older name)
COMPONENTS = ("denoiser", "text_encoder", "vae_decoder")


_PATTERN_ARGS = ("skip", "pattern", "temporal")  # step arguments that are layer-name regexes


def _strict(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise TypeError(f"{where}: expected a mapping, got {type(data).__name__}")
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(valid)}")
    return data


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: format, granularity, symmetry, static or dynamic scales.

    `observer` picks how a static range is estimated (minmax, ema:<momentum>, percentile:<p>, mse,
    lp:<p>); `timestep_groups` > 1 gives static activations one scale per group of noise levels."""

    format: str
    granularity: str = "channel"
    symmetric: bool = True
    dynamic: bool = False
    observer: str = "minmax"
    timestep_groups: int = 1

    def __post_init__(self) -> None:
        fmt = get_format(self.format)  # raises on unknown names / bits out of range
        gran = parse_granularity(self.granularity)
        if isinstance(fmt, BlockFormat):
            if not (isinstance(gran, PerGroup) and gran.size == fmt.block_size):
                # Block formats fix their own granularity: normalise rather than refuse a default.
                object.__setattr__(self, "granularity", str(PerGroup(fmt.block_size)))
        if not self.symmetric and isinstance(fmt, (FloatFormat, BlockFormat)):
            raise ValueError(f"{self.format}: floating-point formats are symmetric only")
        if isinstance(gran, PerToken) and not self.dynamic:
            raise ValueError("per-token scales are computed at run time: set dynamic: true")
        estimator = parse_observer(self.observer)  # raises on unknown observers
        if isinstance(fmt, BlockFormat) and estimator.kind != "minmax":
            raise ValueError(f"{self.format} derives each block's scale from its data: observer must be minmax")
        if not isinstance(self.timestep_groups, int) or self.timestep_groups < 1:
            raise ValueError(f"timestep_groups must be a positive integer, got {self.timestep_groups!r}")
        if self.timestep_groups > 1 and self.dynamic:
            raise ValueError("timestep_groups applies to static scales; dynamic scales already follow every input")
        object.__setattr__(self, "observer", str(estimator))
        object.__setattr__(self, "granularity", str(parse_granularity(self.granularity)))

    @property
    def fmt(self):
        return get_format(self.format)

    @property
    def gran(self):
        return parse_granularity(self.granularity)

    @property
    def bits(self) -> int:
        return self.fmt.bits

    @property
    def needs_calibration(self) -> bool:
        """Static activation scales must be observed on data before use."""
        return not self.dynamic

    def short(self) -> str:
        tail = "dyn" if self.dynamic else ""
        extra = ("" if self.observer == "minmax" else self.observer,
                 f"t{self.timestep_groups}" if self.timestep_groups > 1 else "")
        return "/".join(p for p in (self.format, self.granularity, "" if self.symmetric else "asym", tail, *extra) if p)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | str, where: str = "spec") -> "QuantSpec":
        if isinstance(data, str):
            data = {"format": data}
        return cls(**_strict(cls, data, where))


@dataclass(frozen=True)
class AttentionSpec:
    """Quantization of attention internals: Q, K, V and the softmax output (probabilities).

    `v` overrides `qkv` for V (SageAttention: int8 Q/K, fp8 V); a `channel` granularity on Q/K/V means
    one scale per head channel across tokens. `block_size` > 0 gives Q and K one scale per block of
    that many tokens. `smooth_k` subtracts K's per-channel mean over tokens (softmax is unchanged by
    it, the outliers it removes are not); `smooth_q` subtracts Q's and adds the exact correction
    mean(Q) K^T to the scores in float (SageAttention2: a vector-matrix product, not a second GEMM);
    `smooth_v` subtracts V's and adds it back after P V.
    `rotate` multiplies Q, K and V by a Hadamard matrix along the head channels before quantizing
    ((Q H)(K H)^T = Q K^T, P (V H) H^T = P V): channel outliers spread over all channels.
    `reorder` (PAROAttention) groups the tokens of a square token grid into Q/K blocks in the order
    each head's calibration chose (row-major, column-major or square tiles; step `paro`)."""

    qkv: QuantSpec | None = None
    probs: QuantSpec | None = None
    v: QuantSpec | None = None
    block_size: int = 0
    smooth_k: bool = False
    smooth_q: bool = False
    smooth_v: bool = False
    rotate: bool = False
    reorder: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 0:
            raise ValueError(f"attention.block_size must be a non-negative integer, got {self.block_size!r}")
        if self.block_size and (self.qkv is None or str(self.qkv.granularity) != "token"):
            raise ValueError("attention.block_size needs qkv with granularity: token (one scale per block of tokens)")
        if self.reorder and not self.block_size:
            raise ValueError("attention.reorder regroups tokens into Q/K blocks: it needs block_size > 0")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "attention") -> "AttentionSpec":
        data = dict(_strict(cls, data, where))
        for k in ("qkv", "probs", "v"):
            if data.get(k) is not None:
                data[k] = QuantSpec.from_dict(data[k], f"{where}.{k}")
        return cls(**data)


@dataclass(frozen=True)
class Override:
    """Per-layer exception (mixed precision): layers whose name matches `pattern` (regex search)."""

    pattern: str  # a regex, or "role:<name>" for a role of dmquant.families (e.g. role:temporal)
    weight: QuantSpec | None = None
    input: QuantSpec | None = None
    skip: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", resolve_pattern(self.pattern))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "override") -> "Override":
        data = dict(_strict(cls, data, where))
        for k in ("weight", "input"):
            if data.get(k) is not None:
                data[k] = QuantSpec.from_dict(data[k], f"{where}.{k}")
        return cls(**data)


@dataclass(frozen=True)
class Step:
    """An algorithm a recipe runs after the layers are swapped, e.g. {name: gptq, args: {...}}.

    `args` (the values given, checked and normalised) build the step's typed config
    (`dmquant.step_configs`) at once, so a misspelt argument fails before any work."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        args = {k: resolve_pattern(v) if k in _PATTERN_ARGS and isinstance(v, str) else v for k, v in self.args.items()}
        config = step_config(self.name, args, f"step {self.name!r}")
        object.__setattr__(self, "args", {k: getattr(config, k) for k in args})

    @property
    def config(self) -> Any:
        """The typed arguments, defaults filled in."""
        return step_config(self.name, self.args)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | str, where: str = "step") -> "Step":
        if isinstance(data, str):
            data = {"name": data}
        return cls(**_strict(cls, data, where))

    def __hash__(self) -> int:
        return hash((self.name, json.dumps(self.args, sort_keys=True)))


@dataclass(frozen=True)
class Recipe:
    """A named quantization recipe: what is quantized (components, filters) and how (specs)."""

    name: str
    description: str = ""
    weight: QuantSpec | None = None
    input: QuantSpec | None = None
    attention: AttentionSpec | None = None
    components: tuple[str, ...] = ("denoiser",)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] | None = None  # None: the family's high-precision roles (dmquant.families)
    include_roles: tuple[str, ...] = ()  # roles quantized anyway (e.g. temporal for TFMQ-DM)
    overrides: tuple[Override, ...] = ()
    steps: tuple[Step, ...] = ()
    calibration: dict[str, Any] = field(default_factory=dict)  # default CalibrationSet settings for pipelines
    backend: str = "fake"
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; use one of {BACKENDS}")
        bad = [c for c in self.components if c not in COMPONENTS]
        if bad:
            raise ValueError(f"unknown component(s) {bad}; use any of {COMPONENTS}")
        if self.version > RECIPE_VERSION:
            raise ValueError(f"recipe version {self.version} is newer than this dmquant ({RECIPE_VERSION})")
        unknown = [r for r in self.include_roles if r not in ROLES]
        if unknown:
            raise ValueError(f"unknown role(s) {unknown} in include_roles; roles: {', '.join(ROLES)}")
        if self.include_roles and self.exclude is not None:
            raise ValueError("include_roles adjusts the family's default exclusions: give it or exclude, not both")
        if self.weight is None and self.input is None and self.attention is None:
            raise ValueError(f"recipe {self.name!r} quantizes nothing: give weight, input or attention")
        tuned = [s.name for s in self.steps if isinstance(s.config, DistillConfig)]
        if len(tuned) > 1:
            raise ValueError(f"recipe {self.name!r}: one fine-tuning step per recipe, got {tuned}. Each merges its "
                             "adapters into the float weights, so a later one would distil against that merge "
                             "instead of the float model: give the one step more iters")

    @property
    def needs_calibration(self) -> bool:
        specs = [self.input, *(o.input for o in self.overrides)]
        if self.attention is not None:
            specs += [self.attention.qkv, self.attention.probs, self.attention.v]
        return bool(self.steps) or any(s is not None and s.needs_calibration for s in specs)

    def __hash__(self) -> int:
        return hash(self.config_hash())

    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        data = dict(_strict(cls, data, "recipe"))
        if "name" not in data:
            raise ValueError("recipe: missing required key 'name'")
        for k in ("weight", "input"):
            if data.get(k) is not None:
                data[k] = QuantSpec.from_dict(data[k], f"recipe.{k}")
        if data.get("attention") is not None:
            data["attention"] = AttentionSpec.from_dict(data["attention"], "recipe.attention")
        for k in ("components", "include", "include_roles"):
            if k in data:
                data[k] = tuple(data[k])
        if data.get("exclude") is not None:
            data["exclude"] = tuple(data["exclude"])
        data["steps"] = tuple(Step.from_dict(s, f"recipe.steps[{i}]") for i, s in enumerate(data.get("steps", ())))
        data["overrides"] = tuple(
            Override.from_dict(o, f"recipe.overrides[{i}]") for i, o in enumerate(data.get("overrides", ()))
        )
        return cls(**data)


def _plain(obj: Any) -> Any:
    """asdict output with tuples as lists, so JSON/YAML dumps stay plain."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
