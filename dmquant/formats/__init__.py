"""Number formats: integer, minifloat and block-scaled, in one registry looked up by name."""
from .base import Format
from .block import BlockFormat, e8m0_decode, e8m0_encode
from .floating import FloatFormat
from .integer import IntFormat
from .registry import FORMATS, get_format, list_formats

__all__ = ["Format", "IntFormat", "FloatFormat", "BlockFormat", "FORMATS", "get_format",
           "list_formats", "e8m0_encode", "e8m0_decode"]
