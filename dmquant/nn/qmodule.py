"""The mixin every quantized layer shares: weight/input quantizers, a low-rank slot, a backend.

A quantized layer subclasses its float type (so `isinstance(m, nn.Linear)` still holds for diffusers
and peft) and lives in one of two forms:
- *float master* (while recipe steps calibrate or fine-tune it): the float weight stays a Parameter and
  the forward uses its fake-quantized copy, cached in inference so denoising steps do not re-quantize.
- *packed* (`pack_weight()`, what `dmquant.quantize` and `load_quantized` leave): only the bit-packed
  codes (`weight_packed`) and the quantizer's scales remain. A kernel runs on them, or they are decoded
  per call (never cached: a cached copy would be the float weight again). `layer.weight` still answers
  with the decoded tensor, read-only in spirit: writing to it changes nothing (see `weight`).
  Once a kernel has packed the codes into a layout that gives them back exactly (the CPU int8 GEMM),
  the layer drops `weight_packed` too and the kernel's copy is the only one (`release_codes`);
  `packed_codes()` reads them back for saving, copying and the simulated path.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch
from torch import nn

from ..config import QuantSpec
from ..memory import reclaim_file_pages, release_freed_memory
from ..packing import pack, pack_indices, unpack, unpack_indices
from ..primitives import dequantize, element_format
from .quantizer import TensorQuantizer

log = logging.getLogger(__name__)


class QuantModule:
    """Mixin for quantized layers; subclasses define `INPUT_AXIS` and `float_forward(x, weight)`."""

    INPUT_AXIS: int = -1
    weight_quantizer: TensorQuantizer | None
    input_quantizer: TensorQuantizer | None
    lowrank: nn.Module | None
    transform: nn.Module | None
    served: Callable[[], torch.Tensor] | None = None  # a trial weight an algorithm serves (see `serve`)
    release_codes: bool = True  # drop weight_packed once a kernel holds the same codes (`dmquant.hold_codes`)
    _codes_in_kernel: bool = False  # weight_packed was dropped: the kernel in _kcache holds the codes

    def setup_quant(self, weight: QuantSpec | None, input: QuantSpec | None, backend: str = "fake",
                    name: str = "", init_scales: bool = True) -> None:
        self.weight_quantizer = TensorQuantizer(weight, None, f"{name}.weight") if weight else None
        self.input_quantizer = TensorQuantizer(input, self.INPUT_AXIS, f"{name}.input") if input else None
        self.lowrank = None  # high-precision low-rank branch (SVDQuant / LoRA), filled by algorithms
        self.transform = None  # input smoothing / rotation (dmquant.transforms), applied before the quantizer
        self.backend = backend
        self.qname = name
        w = self._parameters["weight"]
        self.weight_shape, self.weight_dtype = tuple(w.shape), w.dtype
        self._wcache: tuple[tuple, torch.Tensor] | None = None
        self.cache_weight = True  # off while calibrating large models (nn.switch.weight_cache_disabled)
        self._kcache: tuple[tuple, object] | None = None  # (key, (kernel, packed kernel weights) or None)
        if init_scales and self.weight_quantizer is not None:
            self.weight_quantizer.init_from(w.detach())

    @classmethod
    def from_float(cls, module: nn.Module, weight: QuantSpec | None, input: QuantSpec | None,
                   backend: str = "fake", name: str = "", init_scales: bool = True) -> "QuantModule":
        """Wrap a float layer, sharing its parameters (no copy)."""
        q = cls.empty_like(module)
        q.weight, q.bias = module.weight, module.bias
        q.train(module.training)
        q.setup_quant(weight, input, backend, name, init_scales)
        return q

    # -- the two weight forms --------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The float master Parameter; on a packed layer the decoded weight, built on each access (a
        new tensor: in-place edits to it are lost, so algorithms must run before `pack_weight`)."""
        master = self._parameters.get("weight")
        if master is not None:
            return master
        if self.is_packed:
            return self.decoded_weight()
        raise AttributeError(f"{type(self).__name__} has no weight")

    @property
    def is_packed(self) -> bool:
        return self._buffers.get("weight_packed") is not None or self._codes_in_kernel or self.is_vq

    @property
    def is_vq(self) -> bool:
        """The weight is a codebook plus packed codeword indices (VQ4DiT, `dmquant.algorithms.vq`)."""
        return self._buffers.get("vq_packed") is not None

    @property
    def weight_device(self) -> torch.device:
        if self._codes_in_kernel:
            return torch.device(self._kcache[1][0].device)
        held = "vq_packed" if self.is_vq else "weight_packed" if self.is_packed else None
        return (self._buffers[held] if held else self._parameters["weight"]).device

    def adopt_vq(self, codebook: torch.Tensor, packed: torch.Tensor, bits: int, dim: int) -> None:
        """Hold a vector-quantized weight: the (2**(bits*dim), dim) codebook and one index per `dim`
        consecutive inputs of a row, packed at bits*dim bits; the float master is dropped."""
        self._parameters.pop("weight", None)
        self.register_buffer("vq_codebook", codebook)
        self.register_buffer("vq_packed", packed)
        self.vq_bits, self.vq_dim = bits, dim
        self._wcache = self._kcache = None
        self._codes_in_kernel = False

    def _vq_weight(self, dtype: torch.dtype | None) -> torch.Tensor:
        n_out, n_in = self.weight_shape[0], math.prod(self.weight_shape[1:])
        n_sub = -(-n_in // self.vq_dim)
        index = unpack_indices(self._buffers["vq_packed"], self.vq_bits * self.vq_dim, n_out * n_sub)
        rows = self._buffers["vq_codebook"][index.to(self.weight_device)].reshape(n_out, -1)[:, :n_in]
        return rows.reshape(self.weight_shape).to(dtype or self.weight_dtype)

    def pack_weight(self) -> None:
        """Keep only what inference needs: bit-packed codes plus scales; the float master is dropped."""
        vq = getattr(self, "vq", None)  # set by the vq step: codebook and indices of the master weight
        if vq is not None and not self.is_packed:
            self.adopt_vq(vq.codebook, pack_indices(vq.codes, vq.bits * vq.dim), vq.bits, vq.dim)
            del self.vq
            return
        wq = self.weight_quantizer
        if wq is None or self.is_packed:
            return
        if wq.observing or not wq.calibrated:
            raise RuntimeError(f"{self.qname}: cannot pack a weight whose quantizer has no scales yet")
        codes = self.weight_codes()
        spec = wq.spec
        reclaim_file_pages(self._parameters["weight"].data)  # a weight still in a checkpoint's map
        del self.weight  # the Parameter leaves _parameters; memory is freed once nobody else holds it
        self.register_buffer("weight_packed", pack(element_format(spec.fmt, spec.symmetric).encode(codes), spec.bits))
        self._wcache = self._kcache = None

    def adopt_packed(self, packed: torch.Tensor) -> None:
        """Take stored packed codes (loading): the (meta) float master is dropped without decoding."""
        self._parameters.pop("weight", None)
        self.register_buffer("weight_packed", packed)
        self._wcache = self._kcache = None
        self._codes_in_kernel = False

    def packed_codes(self) -> torch.Tensor:
        """The bit-packed weight codes (what gets saved), read back from the kernel if it alone holds them."""
        held = self._buffers.get("weight_packed")
        if held is not None:
            return held
        if not self._codes_in_kernel:
            raise AttributeError(f"{self.qname} holds no packed weight codes")
        if torch.compiler.is_compiling():
            raise RuntimeError(f"{self.qname}: after running on the CPU int8 kernels this layer holds its weight "
                               "only in the kernel's opaque layout, which torch.compile cannot trace; call "
                               "dmquant.hold_codes(model) before torch.compile")
        kernel, kpacked = self._kcache[1]
        spec = self.weight_quantizer.spec
        codes = kernel.codes(self, kpacked).float()
        return pack(element_format(spec.fmt, spec.symmetric).encode(codes), spec.bits)

    def hold_codes(self, keep: bool = False) -> None:
        """Take the codes back from the kernel (before a move, a load, a re-pack); `keep` stops later
        kernel calls from dropping them again."""
        if self._codes_in_kernel:
            self._buffers["weight_packed"] = self.packed_codes()
            self._codes_in_kernel = False
        if keep:
            self.release_codes = False

    def _release_to_kernel(self, kernel: Any, kpacked: object) -> None:
        """Drop weight_packed when `kernel` can give the same codes back: the weight is then held once."""
        if not (self.release_codes and self._buffers.get("weight_packed") is not None):
            return
        if not kernel.gives_codes(self, kpacked):  # type: ignore[attr-defined]
            return
        self._buffers["weight_packed"] = None
        self._codes_in_kernel = True

    def weight_codes(self) -> torch.Tensor:
        """The weight's grid values as float, (out, in * kernel): what kernels multiply and saving packs."""
        wq = self.weight_quantizer
        spec = wq.spec
        if self.is_packed:
            n = math.prod(self.weight_shape)
            codes = unpack(self.packed_codes(), spec.bits, n)
            return element_format(spec.fmt, spec.symmetric).decode(codes).reshape(self.weight_shape[0], -1)
        return wq.codes(self._parameters["weight"].detach())

    def int_weight_codes(self) -> torch.Tensor:
        """Signed integer weight codes as int8, (out, in * kernel), for integer GEMM kernels: sign-extended
        straight from the packed bytes (no float copy, which would cost 4 bytes a weight while a kernel
        prepares)."""
        spec = self.weight_quantizer.spec
        if not (self.is_packed and spec.symmetric and spec.format.startswith("int")):
            return self.weight_codes().to(torch.int8)
        shift = 8 - spec.bits  # two's complement b-bit codes: move the sign bit to bit 7, shift back
        u = unpack(self.packed_codes(), spec.bits, math.prod(self.weight_shape))
        return ((u << shift).view(torch.int8) >> shift).reshape(self.weight_shape[0], -1)

    def decoded_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dequantize the packed codes (bit for bit what fake quantization of the master gave)."""
        if self.is_vq:
            return self._vq_weight(dtype)
        wq = self.weight_quantizer
        values = self.weight_codes()
        out = dequantize(values, wq.spec.gran, wq.qparams, dtype or self.weight_dtype)
        return out.reshape(self.weight_shape)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        """Follow `.to(dtype)` / `.half()` in `weight_dtype`, which a packed layer has no tensor for; codes
        held only by a CPU kernel come back first, so they move with the layer."""
        self.hold_codes()
        result = super()._apply(fn, recurse)  # type: ignore[misc]
        if getattr(self, "weight_shape", None) is not None:
            probe = fn(torch.empty(0, dtype=self.weight_dtype))
            self.weight_dtype = probe.dtype
        return result

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001 - nn.Module's signature
        super()._save_to_state_dict(destination, prefix, keep_vars)  # type: ignore[misc]
        if self._codes_in_kernel:
            destination[prefix + "weight_packed"] = self.packed_codes()

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: ANN002, ANN003
        self.hold_codes()  # a dropped buffer would make the stored codes an "unexpected key"
        self._kcache = None
        return super()._load_from_state_dict(*args, **kwargs)  # type: ignore[misc]

    def __getstate__(self) -> dict:
        """Copies and pickles carry the codes, never the kernel's opaque packed weights."""
        state = self.__dict__.copy()
        if self._codes_in_kernel:
            state["_buffers"] = {**self._buffers, "weight_packed": self.packed_codes()}
            state["_codes_in_kernel"] = False
        state["_kcache"] = None
        return state

    # -- forward ---------------------------------------------------------------------------------
    def _needs_grad(self) -> bool:
        wq = self.weight_quantizer
        if self.is_packed:
            return False
        return torch.is_grad_enabled() and (self.weight.requires_grad or (wq is not None and wq.scale.requires_grad))

    def _weight_key(self) -> tuple:
        wq = self.weight_quantizer
        s = wq.scale
        if self._codes_in_kernel:  # the kernel's copy is the weight: it changes only through a re-pack
            return ("kernel", s.data_ptr(), s._version, wq.generation)
        w = self._buffers["weight_packed"] if self.is_packed else self._parameters["weight"]
        return (w.data_ptr(), w._version, w.device, s.data_ptr(), s._version, wq.generation)

    def set_weight_cache(self, enabled: bool) -> None:
        """Cache the fake-quantized weight between calls (default) or recompute it on every call (one
        layer's copy at a time while a large model calibrates)."""
        self.cache_weight, self._wcache = enabled, None

    def serve(self, weight: Callable[[], torch.Tensor] | None) -> None:
        """Compute with `weight()` as the quantized weight (a trial rounding, a weight plus adapters)
        while the float master stays untouched; None stops. A served layer runs the simulated path, so
        no kernel packs the stale master instead (`nn.switch.serving` undoes it on exit)."""
        self.served = weight

    def quantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        wq = self.weight_quantizer
        if self.served is not None:
            return self.served() if wq.enabled else self.weight
        if self.is_packed:
            if wq is not None and not wq.enabled:
                raise RuntimeError(f"{self.qname}: the float weight was dropped when the layer was packed; "
                                   "quantize with pack=False to keep float masters for float references")
            return self.decoded_weight(dtype)  # decoded per call: caching it would re-create the float copy
        if wq is None or not wq.enabled:
            return self.weight
        if self._needs_grad() or not self.cache_weight:
            return wq(self.weight)  # training: no cache, gradients flow through the STE
        key = self._weight_key()
        if self._wcache is None or self._wcache[0] != key:
            self._wcache = (key, wq(self.weight))
        return self._wcache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform is not None:  # kernel, fake quantization and low-rank branch all see (x / s) Q
            x = self.transform(x)
        out = self.kernel_forward(x)
        if out is not None and self.lowrank is not None:  # a kernel's fresh output, no autograd
            out = self.lowrank.add_to(out, x)
        elif out is None:
            xq = self.input_quantizer(x) if self.input_quantizer is not None else x
            out = self.float_forward(xq, self.quantized_weight())
            if self.lowrank is not None:
                out = out + self.lowrank(x)
        if not self.cache_weight and not self.is_packed:  # calibrating: this call's fake-quantized copy
            # would stay on glibc's heap, layer after layer (see dmquant.memory)
            release_freed_memory(self.weight.numel() * self.weight.element_size())
        return out

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Run on the backend's real low-bit kernel; None falls back to fake quantization (the
        reference), e.g. for shapes or formats the kernel lacks, or when gradients are needed."""
        if self.backend == "fake" or self.weight_quantizer is None or self.served is not None or self._needs_grad():
            return None
        if not self.cache_weight and not self.is_packed:  # calibrating a float master: the reference path,
            return None  # and no prepacked copy (0.25x of the fp32 weight per layer) on top of the master
        if torch.compiler.is_compiling():  # opaque prepacked kernel weights do not trace: the graph
            return None  # runs the simulated path, which inductor fuses (see README: torch.compile)
        iq = self.input_quantizer
        if not self.weight_quantizer.enabled or (iq is not None and (
                not iq.enabled or iq.observing or (iq.scale is None and iq.allow_uncalibrated))):
            return None  # the float reference, calibration and pass-through run on the fake path
        from ..kernels import select_kernel

        key = (*self._weight_key(), x.dtype)
        if self._kcache is None or self._kcache[0] != key:
            self.hold_codes()  # the kernel about to be replaced may hold the only copy of the codes
            kernel, reason = select_kernel(self, x.dtype)
            if kernel is None and (self._kcache is None or self._kcache[1] is not None):
                log.info("%s stays on fake quantization (%s backend: %s)", self.qname, self.backend, reason)
            chosen = None if kernel is None else (kernel, kernel.prepare(self, x))
            if chosen is not None:
                self._release_to_kernel(*chosen)
                release_freed_memory()  # packing's temporaries (codes as float/int32) go back to the OS
            self._kcache = ((*self._weight_key(), x.dtype), chosen)  # keyed after a release changed the key
        chosen = self._kcache[1]
        return None if chosen is None else chosen[0].run(self, chosen[1], x)

    def kernel_name(self, dtype: torch.dtype | None = None) -> str:
        """Which kernel this layer's forward runs now, in words (for reports)."""
        if self.is_vq:
            return "simulated (VQ codebook lookup per call)"
        if self.backend == "fake" or self.weight_quantizer is None:
            return "simulated (fake quantization)"
        from ..kernels import select_kernel

        kernel, reason = select_kernel(self, dtype or self.weight_dtype)
        if kernel is None:
            return f"simulated ({reason})"
        chosen = self._kcache[1] if self._kcache is not None else None  # the layout the calls chose, once run
        return kernel.describe(self, chosen[1] if chosen is not None and chosen[0] is kernel else None)

    def float_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def empty_like(cls, module: nn.Module) -> "QuantModule":
        raise NotImplementedError
