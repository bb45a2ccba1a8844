"""One registry of formats, looked up by canonical name ("int4", "fp8_e4m3", "nvfp4", ...)."""
from __future__ import annotations

import re

from .base import Format
from .block import BlockFormat
from .floating import FloatFormat
from .integer import MAX_BITS, MIN_BITS, IntFormat
from .log import LOG_BITS, log_format

_FLOATS = {
    "fp8_e4m3": (4, 3, "fn"),
    "fp8_e5m2": (5, 2, "ieee"),
    "fp6_e3m2": (3, 2, "finite"),
    "fp6_e2m3": (2, 3, "finite"),
    "fp4_e2m1": (2, 1, "finite"),
}
_BLOCKS = {
    # name: (element, block size, scale kind, second-level per-tensor scale)
    "mxfp8": ("fp8_e4m3", 32, "e8m0", False),
    "mxfp8_e5m2": ("fp8_e5m2", 32, "e8m0", False),
    "mxfp6": ("fp6_e3m2", 32, "e8m0", False),
    "mxfp6_e2m3": ("fp6_e2m3", 32, "e8m0", False),
    "mxfp4": ("fp4_e2m1", 32, "e8m0", False),
    "nvfp4": ("fp4_e2m1", 16, "fp8_e4m3", True),
}
_INT = re.compile(r"(u?)int(\d+)")
_LOG = re.compile(r"u?(log2|twinlog)_(\d+)")


def _build() -> dict[str, Format]:
    table: dict[str, Format] = {}
    for bits in range(MIN_BITS, MAX_BITS + 1):
        table[f"int{bits}"] = IntFormat(name=f"int{bits}", bits=bits, signed=True)
        table[f"uint{bits}"] = IntFormat(name=f"uint{bits}", bits=bits, signed=False)
    for name, (e, m, conv) in _FLOATS.items():
        table[name] = FloatFormat(name=name, bits=1 + e + m, exp_bits=e, man_bits=m, convention=conv)
    for name, (elem, block, kind, ts) in _BLOCKS.items():
        el = table[elem]
        table[name] = BlockFormat(name=name, bits=el.bits, element=el, block_size=block,
                                  scale_kind=kind, tensor_scale=ts)
    for kind in ("log2", "twinlog"):
        for bits in LOG_BITS:
            for signed in (True, False):
                fmt = log_format(kind, bits, signed)
                table[fmt.name] = fmt
    return table


FORMATS: dict[str, Format] = _build()
ALIASES = {"fp8": "fp8_e4m3", "e4m3": "fp8_e4m3", "e5m2": "fp8_e5m2", "fp4": "fp4_e2m1",
           "fp6": "fp6_e3m2", "e3m2": "fp6_e3m2", "e2m3": "fp6_e2m3", "e2m1": "fp4_e2m1"}


def get_format(name: str) -> Format:
    """Look a format up by name; unknown names and integer widths outside 2-8 bits are refused."""
    key = ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else name
    if key in FORMATS:
        return FORMATS[key]
    m = _INT.fullmatch(str(key))
    if m:
        raise ValueError(
            f"bits out of range in format {name!r}: integer formats support {MIN_BITS}-{MAX_BITS} bits"
        )
    m = _LOG.fullmatch(str(key))
    if m:
        raise ValueError(f"bits out of range in format {name!r}: {m.group(1)} formats support "
                         f"{LOG_BITS[0]}-{LOG_BITS[-1]} bits")
    raise ValueError(f"unknown format {name!r}; known formats: {', '.join(list_formats())}")


def list_formats() -> list[str]:
    return list(FORMATS)
