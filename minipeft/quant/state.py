"""What ``minipeft.quant`` and its CUDA twins in ``minipeft/kernels`` share: the
``QuantState`` a quantizer returns, the checks every quantizer runs on its arguments, the
4-bit decode tables and the float32 mean used by double quantization.

Both sides import this module, and it imports neither: the reference code and the
kernels meet here instead of reaching into each other's private names. Semantics follow
bitsandbytes (Dettmers et al. 2021, arXiv 2110.02861; Dettmers et al. 2023, arXiv
2305.14314, Sec. 3); see :mod:`minipeft.quant.blockwise` for the quantizers themselves.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..backend import bfloat16_dtype, to_device, to_numpy, xp_of
from .codes import DYNAMIC_SIGNED, FP4_MAGNITUDE, NF4

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))   # what the quantizers take
QUANT_TYPES_4BIT = ("nf4", "fp4", "int4")


class LaunchCache(dict):
    """What GPU launchers prepared for one :class:`QuantState` (``minipeft.kernels.quant4bit``).

    A copy starts empty: ``copy.deepcopy`` of a model makes new arrays, whose launches are
    built anew on first use (and a launch holds a compiled kernel, not worth copying)."""

    def __copy__(self):
        return LaunchCache()

    def __deepcopy__(self, memo):
        return LaunchCache()


@dataclass
class QuantState:
    """What it takes to dequantize; the fields of bitsandbytes' ``QuantState``."""

    absmax: Any                          # (n_blocks,) float32; nested: uint8 codes of absmax-offset
    shape: tuple | None = None           # shape of the original tensor
    code: Any = None                     # float32 table the indices point into (16 or 256)
    blocksize: int | None = None         # elements per block (32 ... 4096, a power of two)
    quant_type: str | None = None        # "nf4" | "fp4" | "int4" for 4-bit; None for 8-bit
    dtype: Any = None                    # dtype of the original tensor; dequantize returns it
    offset: Any = None                   # float32 mean of the first-level absmax (nested only)
    state2: "QuantState | None" = None   # the absmax's own state (dynamic map, blocks of 256)
    # What a GPU launcher prepared for this state (minipeft.kernels.quant4bit): never saved, never
    # copied by .to(); each entry says which arrays it was built from and is rebuilt when they change
    cache: LaunchCache = field(default_factory=LaunchCache, repr=False, compare=False)

    @property
    def nested(self) -> bool:
        """True when the absmax values are double-quantized."""
        return self.state2 is not None

    def to(self, device: str) -> "QuantState":
        """A copy with every array on ``device`` ('cpu' or 'cuda')."""
        move = (lambda a: None if a is None else to_device(a, device))
        return QuantState(move(self.absmax), self.shape, move(self.code), self.blocksize,
                          self.quant_type, self.dtype, move(self.offset),
                          None if self.state2 is None else self.state2.to(device))

    def as_dict(self, packed: bool = False) -> dict:
        """bitsandbytes' serialization dict (keys ``absmax, quant_map, nested_*, ...``).

        With ``packed=True`` the non-array items are JSON-encoded into a uint8 array under
        ``quant_state.bitsandbytes__<quant_type>``, as bitsandbytes writes safetensors files.
        """
        d: dict = {"quant_type": self.quant_type, "absmax": self.absmax,
                   "blocksize": self.blocksize, "quant_map": self.code,
                   "dtype": np.dtype(self.dtype).name, "shape": tuple(self.shape)}
        if self.nested:
            d.update({"nested_absmax": self.state2.absmax,
                      "nested_blocksize": self.state2.blocksize,
                      "nested_quant_map": self.state2.code,
                      "nested_dtype": np.dtype(self.state2.dtype).name,
                      "nested_offset": float(self.offset)})
        if not packed:
            return d
        arrays = {k: v for k, v in d.items() if hasattr(v, "dtype")}
        rest = {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in d.items() if not hasattr(v, "dtype")}
        blob = np.frombuffer(json.dumps(rest).encode("utf-8"), dtype=np.uint8).copy()
        arrays[f"quant_state.bitsandbytes__{self.quant_type}"] = blob
        return arrays

    @classmethod
    def from_dict(cls, d: dict) -> "QuantState":
        """Inverse of :meth:`as_dict` (packed or not; key prefixes are stripped)."""
        d = dict(d)
        packed_keys = [k for k in d if "quant_state.bitsandbytes__" in k]
        if len(packed_keys) > 1:
            raise ValueError(f"expected at most one packed quant_state entry, got {packed_keys}")
        for key in packed_keys:
            d.update(json.loads(to_numpy(d.pop(key)).astype(np.uint8).tobytes().decode("utf-8")))
        d = {k.split(".")[-1]: v for k, v in d.items()}                  # strip prefixes
        state2 = offset = None
        if "nested_absmax" in d:
            state2 = cls(absmax=d["nested_absmax"], blocksize=int(d["nested_blocksize"]),
                         code=d["nested_quant_map"], dtype=np.dtype(d["nested_dtype"]))
            xp = xp_of(d["nested_absmax"])
            offset = xp.asarray(d["nested_offset"], dtype=xp.float32)
        return cls(absmax=d["absmax"], shape=tuple(d["shape"]), code=d["quant_map"],
                   blocksize=int(d["blocksize"]), quant_type=d["quant_type"],
                   dtype=np.dtype(d["dtype"]), offset=offset, state2=state2)



# ---------------------------------------------------------------------------------------
# Checks (each raises with what was wrong and what to do)
def check_blocksize(blocksize) -> int:
    """``blocksize`` as an int: a power of two from 32 to 4096, as bitsandbytes' kernels take."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)):
        raise TypeError(f"blocksize must be an int, got {type(blocksize).__name__}")
    b = int(blocksize)
    if not (32 <= b <= 4096 and b & (b - 1) == 0):
        raise ValueError(f"blocksize {b} is not supported: expected a power of two from 32 to "
                         "4096 (bitsandbytes' kernels: 32, 64, ..., 4096); 64 is QLoRA's choice")
    return b


def check_input(A, what: str) -> None:
    """A block-wise quantizer's input: a non-empty, finite float16/float32 NumPy or CuPy array."""
    if not hasattr(A, "dtype") or not hasattr(A, "shape"):
        raise TypeError(f"{what} expects a NumPy or CuPy array, got {type(A).__name__}")
    if np.dtype(A.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"{what} supports float32 and float16 arrays (as bitsandbytes, which also "
                        f"takes bfloat16), got {A.dtype}; convert with A.astype(np.float32)")
    if A.size == 0:
        raise ValueError(f"{what} got an empty array of shape {tuple(A.shape)}; "
                         "nothing to quantize")
    xp = xp_of(A)
    finite = xp.isfinite(A)
    if not bool(finite.all()):
        bad = int(A.size - int(finite.sum()))
        raise ValueError(f"{what} got {bad} NaN/inf value(s) in an array of shape "
                         f"{tuple(A.shape)}: "
                         "a block's absmax would be inf/NaN and every value in it lost; "
                         "find where they come from (or replace them, e.g. xp.nan_to_num) first")


def check_quant_type_4bit(quant_type) -> str:
    """One of ``QUANT_TYPES_4BIT``."""
    if quant_type not in QUANT_TYPES_4BIT:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES_4BIT}, got {quant_type!r}")
    return quant_type


def check_out_dtype(dtype, *, bfloat16: bool = False):
    """What dequantization may return: float32 or float16, and with ``bfloat16=True`` (the 4-bit
    dequantizers) also bfloat16 (``'bfloat16'`` or ``ml_dtypes.bfloat16``, returned as the dtype
    a CuPy or NumPy bfloat16 array holds)."""
    name = dtype if isinstance(dtype, str) else getattr(dtype, "name", getattr(dtype, "__name__", None))
    if bfloat16 and name == "bfloat16":
        return bfloat16_dtype()                     # needs ml_dtypes, imported here
    dt = np.dtype(dtype)
    if dt not in FLOAT_DTYPES:
        allowed = "float32, float16 or bfloat16" if bfloat16 else "float32 or float16"
        raise TypeError(f"dequantize can return {allowed}, got {dt}")
    return dt


def check_4bit_state(packed, quant_state) -> None:
    """What :func:`~minipeft.quant.blockwise.dequantize_4bit` takes: uint8 bytes and a 4-bit state."""
    if np.dtype(packed.dtype) != np.uint8:
        raise TypeError(f"dequantize_4bit expects packed uint8 bytes, got {packed.dtype}")
    if quant_state is None or quant_state.quant_type not in QUANT_TYPES_4BIT:
        raise ValueError("dequantize_4bit needs the QuantState returned by quantize_4bit")


def blockwise_state(A, quant_state=None, absmax=None, code=None, blocksize: int = 4096) -> QuantState:
    """The state :func:`~minipeft.quant.blockwise.dequantize_blockwise` decodes ``A`` (uint8 indices) with.

    ``quant_state`` as given, or one made of ``absmax`` (and ``code``, default the signed
    dynamic map, and ``blocksize``), as bitsandbytes' ``dequantize_blockwise`` accepts.
    """
    if np.dtype(A.dtype) != np.uint8:
        raise TypeError(f"dequantize_blockwise expects uint8 indices, got {A.dtype}")
    if quant_state is not None:
        return quant_state
    if absmax is None:
        raise ValueError("dequantize_blockwise needs quant_state or absmax")
    return QuantState(absmax=absmax, shape=tuple(A.shape), code=DYNAMIC_SIGNED if code is None else code,
                      blocksize=blocksize, dtype=np.dtype(np.float32))


def check_float(A, what: str) -> None:
    """LLM.int8()'s input: a non-empty, finite float16/float32 array with a last (hidden) axis."""
    if not hasattr(A, "dtype"):
        raise TypeError(f"{what} expects a NumPy or CuPy array, got {type(A).__name__}")
    if np.dtype(A.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"{what} supports float16 and float32 arrays, got {A.dtype}; "
                        "use A.astype(np.float32)")
    if A.ndim < 1 or A.size == 0:
        raise ValueError(f"{what} needs a non-empty array with a last (hidden) axis, got shape "
                         f"{tuple(A.shape)}")
    if not bool(xp_of(A).isfinite(A).all()):
        raise ValueError(f"{what} got NaN/inf values; int8 scales cannot be formed from them")


# ---------------------------------------------------------------------------------------
# Shared arithmetic and tables
def mean_f32(x):
    """float32 mean as PyTorch's CUDA reduction forms it: sum, then times float32(1/n).

    The sum is taken in float64 and rounded once; PyTorch sums in float32 in a
    kernel-defined order, so the two can differ by an ulp (then so does everything
    computed from the offset). Double quantization's offset, on either device.
    """
    xp = xp_of(x)
    total = xp.sum(x.astype(xp.float64)).astype(xp.float32)
    return (total * (xp.float32(1) / xp.float32(x.size))).astype(xp.float32)


# What the CUDA dequantizer multiplies absmax by, per 4-bit index: NF4 its table; FP4 the
# magnitude of the low 3 bits times the sign of bit 3 (a sign flip is exact, so the order
# of the two products does not matter, and index 8 is 0 * -1 = -0.0). Other 4-bit codes
# (Int4) decode from the state's own ``code``.
DECODE_4BIT = {"nf4": NF4,
               "fp4": np.concatenate([FP4_MAGNITUDE, -FP4_MAGNITUDE]).astype(np.float32)}
