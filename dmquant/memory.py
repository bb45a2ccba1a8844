"""Giving freed memory back to the operating system while a large model is quantized layer by layer.

Packing a layer frees its float temporaries, but glibc keeps freed heap memory for reuse (its mmap
threshold rises after the first large frees, so later temporaries land on the heap); between the
packed buffers left behind, that memory stays resident. Measured on a 611 M-parameter PixArt
(`scripts/benchmark.py`): quantize peak 1.52x the fp32 model without trimming, 1.27x with glibc's
threshold pinned. `malloc_trim(0)` after each layer returns the free pages without any setting. Calibration is the
same story per call: each float-master layer fake-quantizes its weight anew (`weight_cache_disabled`),
and without a trim after each call the w8a8-tsa quantize peak was 2.71x the fp32 model (1.27x with).

A model loaded by diffusers keeps its weights in the checkpoint's memory map (safetensors), one
mapping for all tensors of the file: a weight a layer replaced or packed stops being read, but its
pages stay resident as long as any other tensor of the file lives. `reclaim_file_pages` hands them
back (`madvise(MADV_PAGEOUT)`: content-preserving, a later read faults the same bytes in again), and
weights are replaced by new tensors rather than written into the map (`transforms.layer.set_weight`),
so the map's pages stay clean and reclaimable.
"""
from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import functools
import mmap
import sys

import torch

MADV_PAGEOUT = 21  # Linux >= 5.4; older kernels answer EINVAL and nothing happens


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if libc is not None and hasattr(libc, "madvise"):
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


TRIM_EVERY = 8 << 20  # bytes freed between two trims at most, for the per-call callers
_untrimmed = 0


def release_freed_memory(freed: int | None = None) -> None:
    """Return free heap pages to the OS (glibc `malloc_trim`; a no-op elsewhere). A caller that frees
    `freed` bytes per call (calibration forwards) trims only once `TRIM_EVERY` bytes have added up: a
    trim walks the whole heap, and on small layers called thousands of times it cost more than the layer."""
    global _untrimmed
    if freed is not None:
        _untrimmed += freed
        if _untrimmed < TRIM_EVERY:
            return
    _untrimmed = 0
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _file_mappings() -> list[tuple[int, int]]:
    """Sorted (start, end) address ranges of this process's file-backed mappings (Linux)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[4] != "0" and fields[5].startswith("/"):  # an inode and a path
                start, end = (int(a, 16) for a in fields[0].split("-"))
                ranges.append((start, end))
    return sorted(ranges)


def reclaim_file_pages(tensor: torch.Tensor) -> None:
    """Let the kernel reclaim the pages of a CPU tensor that lives in a memory-mapped file (see the
    module docstring); anonymous memory is never advised, so nothing live is swapped or changed."""
    madvise = getattr(_libc(), "madvise", None)
    if madvise is None or not sys.platform.startswith("linux") or tensor.device.type != "cpu" \
            or not tensor.is_contiguous():
        return
    page = mmap.PAGESIZE
    start = -(-tensor.data_ptr() // page) * page  # whole pages inside the tensor only
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if end <= start:
        return
    ranges = _file_mappings()
    i = bisect.bisect_right(ranges, (start, float("inf"))) - 1
    if i < 0 or not (ranges[i][0] <= start and end <= ranges[i][1]):
        return
    madvise(start, end - start, MADV_PAGEOUT)
