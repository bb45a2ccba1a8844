"""Number formats: integer, minifloat, block-scaled and logarithmic, in one registry looked up by name."""
from .base import Format
from .block import BlockFormat, e8m0_decode, e8m0_encode
from .floating import FloatFormat
from .integer import IntFormat
from .log import CodebookFormat, log_format
from .registry import FORMATS, get_format, list_formats

__all__ = ["Format", "IntFormat", "FloatFormat", "BlockFormat", "CodebookFormat", "log_format", "FORMATS",
           "get_format", "list_formats", "e8m0_encode", "e8m0_decode"]
