"""CUDA RawKernels for 4-bit block-wise quantization (NF4 / FP4 / Int4) and their launchers.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314, Sec. 3): ``absmax_b = max |x|`` per block,
``q = nearest code index of x * (1/absmax_b)``, two indices per byte (even element in the
high nibble), ``x^ = decode[q] * absmax_b``; double quantization stores the absmax as
8-bit codes of ``absmax - mean(absmax)`` in blocks of 256.

The NumPy twins are :func:`minipeft.quant.blockwise.quantize_4bit` and
:func:`minipeft.quant.blockwise.dequantize_4bit`; ``tests/kernels`` checks that the
kernels agree with them bit for bit (packed bytes, absmax, nested state, dequantized
values). The tables the kernels compare against and decode with are the twin's
(:mod:`minipeft.quant.codes`, :mod:`minipeft.quant.state`), never retyped here. Each call
is one kernel launch (double quantization adds the mean of the absmax and one 8-bit
launch, see :mod:`minipeft.kernels.quant8bit`).

:func:`quantize_4bit_cuda` and :func:`dequantize_4bit_cuda` take the twins' arguments and
run their checks; :mod:`minipeft.kernels` registers them as the twins' fast paths for
CuPy arrays, so ``minipeft.quant.quantize_4bit(cupy_array)`` runs the kernel.
Dequantization writes float32, float16 or bfloat16 (what QLoRA's bfloat16 layers multiply
with: no float32 weight and no cast pass); a frozen weight's launch is prepared once and
kept on its ``QuantState`` (:func:`cached_dequantize_launch`), so a call is an identity
check, the allocation and the launch.
"""
from __future__ import annotations

import functools
import operator

import numpy as np

from ..backend import device_of
from ..quant import codes
from ..quant.state import (DECODE_4BIT, QuantState, check_4bit_state, check_blocksize, check_input,
                           check_out_dtype, check_quant_type_4bit)
from ._module import aligned_to, as_f32, compute_capability, kernel, log2, resident_blocks
from ._module import cupy as _cupy
from .pdl import DependentLaunch
from .quant8bit import double_quantize_cuda, nested_arrays

THREADS = 256          # threads per CUDA block (quantize: more when blocksize/8 > 256)
# The dequantize kernel's compile-time variant (the macros of quant4bit.cu, see dequantize_variant):
CHUNK = 4              # packed bytes per chunk and load: 4, 8 or 16, as CHUNK in the .cu
UNROLL = 4             # chunks per dequantize thread and sweep, as UNROLL in the .cu
STREAMING = 0          # 1: streaming cache hints on the loads and stores, as STREAMING in the .cu
STAGED = 0             # 1: the staged kernel (sm_90+: shared memory and bulk stores), as STAGED in the .cu
TILE = 16384           # staged: output bytes per tile, as TILE in the .cu
STAGES = 2             # staged: tiles of shared memory in flight, as STAGES in the .cu
PREFETCH = 0           # staged: tiles ahead prefetched into L2, as PREFETCH in the .cu
AHEAD = 0              # staged: 1 loads the next tile's codes and absmax while a tile decodes, as AHEAD in the .cu
INTERLEAVE = 0         # 1 deals the sweeps (staged: the tiles) out to the CUDA blocks in turn, as INTERLEAVE in the .cu
WIDE = 0               # 1: the wide kernel (512-byte loads and stores per warp instruction), as WIDE in the .cu
WIDE_BLOCKS = 8        # wide: CUDA blocks per SM its registers must allow (4, 6 or 8), as WIDE_BLOCKS in the .cu
WIDE_EARLY = 0         # wide: 1 or 2 issue a block's first loads before its table and barrier, as WIDE_EARLY in the .cu
PDL = 0                # wide, sm_90+: 1 or 2 launch with programmatic dependent launch (pdl.py), as PDL in the .cu
_CU_DEFAULTS = {"CHUNK": CHUNK, "UNROLL": UNROLL, "STREAMING": STREAMING, "STAGED": STAGED, "TILE": TILE,
                "STAGES": STAGES, "PREFETCH": PREFETCH, "AHEAD": AHEAD, "INTERLEAVE": INTERLEAVE, "WIDE": WIDE,
                "WIDE_BLOCKS": WIDE_BLOCKS, "WIDE_EARLY": WIDE_EARLY, "PDL": PDL}   # the .cu's #define defaults
DEFAULT_VARIANT = dict(_CU_DEFAULTS)   # the swept kernel as the .cu compiles it by default
# On sm_90+ (Hopper) a launch with no variant takes the wide kernel, one group per warp and step, registers for
# 8 CUDA blocks per SM (w1b8: 32 registers, no spills in its 16-bit kernels), launched with programmatic dependent
# launch (PDL=1: each kernel waits at its start for the one before, so it is correct whatever ran before; a
# dequantize launched right after another one places its blocks while that one ends). On the H200, calls in a
# row ran at 88.9-91.6% of the copy rate without double quantization and 85.9-91.0% with it at 4096x11008 and
# 8192x8192, against 85.4-88.7% and 82.3-85.6% for w1b6 launched plainly (the default before;
# benchmarks/results/h200-2026-12-03/README.md, call l). Below sm_90 the swept kernel stays the default: the
# wide one has not been measured there, and PDL needs sm_90.
HOPPER_VARIANT = {**DEFAULT_VARIANT, "WIDE": 1, "CHUNK": 16, "UNROLL": 1, "INTERLEAVE": 1, "WIDE_BLOCKS": 8, "PDL": 1}
# Settings that differ from HOPPER_VARIANT for one (output dtype, double quantization). float16 output with
# double quantization: the first loads before the table (WIDE_EARLY=2, e2), 0.5-0.9 points of the copy rate
# faster on the H200 in calls in a row (85.5-85.9% against 84.9-85.0% at 4096x11008, 88.9-89.2% against
# 87.9-88.1% at 8192x8192), where bfloat16 output is 1.2-1.5 points slower with it and neither changes without
# double quantization (benchmarks/results/h200-2026-12-03/README.md, call u). The kernels differ only in the
# conversion instruction; why the two output types respond oppositely is not established.
HOPPER_TUNED = {("float16", True): {"WIDE_EARLY": 2}}


def default_variant(device_id: int, dtype=None, nested: bool = False) -> dict:
    """The variant a launch on ``device_id`` takes when none is given: :data:`HOPPER_VARIANT` on sm_90 or
    newer (measured there), with :data:`HOPPER_TUNED`'s settings for output ``dtype`` (a dtype or its name;
    None: none) and ``nested`` (double quantization); else :data:`DEFAULT_VARIANT`."""
    if compute_capability(device_id) < 90:
        return dict(DEFAULT_VARIANT)
    name = dtype if dtype is None or isinstance(dtype, str) else np.dtype(dtype).name
    return {**HOPPER_VARIANT, **HOPPER_TUNED.get((name, bool(nested)), {})}


_ONLY_STAGED, _ONLY_SWEPT = ("TILE", "STAGES", "PREFETCH", "AHEAD"), ("UNROLL", "WIDE", "WIDE_BLOCKS", "WIDE_EARLY", "PDL")   # one body's only
_VARIANT_VALUES = {"CHUNK": (4, 8, 16), "UNROLL": tuple(range(1, 17)), "STREAMING": (0, 1), "STAGED": (0, 1),
                   "TILE": (8192, 16384), "STAGES": (2, 3, 4), "PREFETCH": (0, 1, 2, 3, 4), "AHEAD": (0, 1),
                   "INTERLEAVE": (0, 1), "WIDE": (0, 1), "WIDE_BLOCKS": (4, 6, 8), "WIDE_EARLY": (0, 1, 2),
                   "PDL": (0, 1, 2)}
_WIDE_DEFAULTS = {"CHUNK": 16, "UNROLL": 1, "INTERLEAVE": 1}   # what WIDE=1 implies unless given


def _kernel(name: str):
    """The kernel ``name`` of ``quant4bit.cu``, compiled once per device (:mod:`minipeft.kernels._module`)."""
    return kernel("quant4bit.cu", name)


# ---------------------------------------------------------------------------------------
# Tables (host NumPy, built once from the twin's modules; device copies cached per device)
@functools.lru_cache(maxsize=None)
def decision_table(quant_type: str):
    """``(thresholds float32[16], index map uint8[16], fp4)``: the kernel's quantizer.

    The index of a scaled value s is ``map[#{k : thresholds[k] < a}]`` with ``a = s`` (or
    ``|s|`` and the sign in bit 3 for FP4); unused thresholds are +inf. The thresholds are
    the twin's: ``codes.NF4_THRESHOLDS`` for NF4 (bitsandbytes' literals),
    ``codes.FP4_THRESHOLDS`` and ``FP4_RANK_TO_CODE`` for FP4, and for any other code the
    float32 midpoints of its sorted distinct values mapped back to the first index holding
    each value (``codes.nearest_code_index``).
    """
    thr = np.full(16, np.inf, np.float32)
    imap = np.zeros(16, np.uint8)
    if quant_type == "fp4":
        t, m = codes.FP4_THRESHOLDS, codes.FP4_RANK_TO_CODE
    elif quant_type == "nf4":
        t, m = codes.NF4_THRESHOLDS, np.arange(16)
    else:
        code = codes.get_4bit_type(quant_type)
        _, m = np.unique(code, return_index=True)
        t = codes.midpoints(code)
    thr[: len(t)] = t
    imap[: len(m)] = m
    return thr, imap, quant_type == "fp4"


def decode_table(quant_type: str) -> np.ndarray | None:
    """The 16 values the twin multiplies absmax by, or None when it uses the state's code.

    :mod:`minipeft.quant.blockwise` decodes NF4 and FP4 from bitsandbytes' built-in tables
    (``quant.state.DECODE_4BIT``: FP4 index 8 is -0.0 there) and anything else from
    ``quant_state.code``.
    """
    table = DECODE_4BIT.get(quant_type)
    return None if table is None else np.asarray(table, np.float32)


@functools.lru_cache(maxsize=None)
def _device_decision(quant_type: str, device_id: int):
    cp = _cupy()
    thr, imap, fp4 = decision_table(quant_type)
    return cp.asarray(thr), cp.asarray(imap), fp4


@functools.lru_cache(maxsize=None)
def _device_decode(quant_type: str, device_id: int):
    table = decode_table(quant_type)
    return None if table is None else _cupy().asarray(table)


@functools.lru_cache(maxsize=None)
def _device_code(quant_type: str, device_id: int):
    return _cupy().asarray(codes.get_4bit_type(quant_type))


# ---------------------------------------------------------------------------------------
# Quantize
def _launch_quantize_4bit(A, blocksize: int, quant_type: str, compress_statistics: bool):
    cp = _cupy()
    dev = cp.cuda.runtime.getDevice()
    x = aligned_to(cp, A, 16)                                            # contiguous, n values
    n = x.size
    n_blocks = -(-n // blocksize)
    packed = cp.empty(((n + 1) // 2, 1), dtype=cp.uint8)               # ((n+1)//2, 1)
    absmax = cp.empty(n_blocks, dtype=cp.float32)                      # (n_blocks,)
    thr, imap, fp4 = _device_decision(quant_type, dev)
    group = blocksize // 8                                             # threads per block of B
    threads = max(THREADS, group)
    grid = -(-(n_blocks * group) // threads)
    name = "quantize_4bit_f16" if x.dtype == cp.float16 else "quantize_4bit_f32"
    _kernel(name)((grid,), (threads,), (x, np.int64(n), np.int32(log2(blocksize)), thr, imap,
                                         np.int32(fp4), packed, absmax))
    state = QuantState(absmax=absmax, shape=tuple(A.shape),
                          code=_device_code(quant_type, dev).copy(), blocksize=blocksize,
                          quant_type=quant_type, dtype=np.dtype(A.dtype))
    if compress_statistics:
        state.absmax, state.offset, state.state2 = double_quantize_cuda(absmax, blocksize=256)
    return packed, state


def quantize_4bit_cuda(x, blocksize: int = 64, quant_type: str = "fp4",
                       compress_statistics: bool = False):
    """4-bit block-wise quantization of a CuPy array: ``(packed uint8 ((n+1)//2, 1), QuantState)``.

    The same result, bit for bit, and the same checks as
    :func:`minipeft.quant.blockwise.quantize_4bit` (whose fast path this is for CuPy input).
    """
    if device_of(x) != "cuda":
        raise TypeError(f"quantize_4bit_cuda expects a CuPy array, got {type(x).__name__}; "
                        "use minipeft.quant.blockwise.quantize_4bit for NumPy arrays")
    check_input(x, "quantize_4bit_cuda")
    blocksize = check_blocksize(blocksize)
    check_quant_type_4bit(quant_type)
    return _launch_quantize_4bit(x, blocksize, quant_type, bool(compress_statistics))


# ---------------------------------------------------------------------------------------
# Dequantize
_SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}   # kernel name per output dtype


_CHECKED_VARIANTS: set = set()   # every tuple dequantize_variant returned: passed again, it is taken as is


def dequantize_variant(variant=None) -> tuple:
    """The dequantize kernel's compile-time variant, checked, as sorted ``(NAME, value)`` pairs.

    ``variant`` is None (:data:`DEFAULT_VARIANT`) or a dict (or pairs) with any of ``CHUNK``
    (packed bytes per load: 4, 8 or 16), ``UNROLL`` (chunks per thread and sweep: 1 to 16),
    ``STREAMING`` (0, or 1 for streaming cache hints), ``INTERLEAVE`` (1: the sweeps, or the
    staged kernel's tiles, dealt out to the CUDA blocks in turn) and ``STAGED`` (1: the staged kernel,
    sm_90+, with ``TILE`` output bytes per tile, 8192 or 16384, ``STAGES`` buffers, 2 to 4,
    ``STAGES * TILE <= 32768``, ``PREFETCH`` tiles ahead prefetched into L2, 0 to 4, and ``AHEAD``,
    1 to load the next tile's codes and absmax into registers while a tile decodes; it loads
    4 packed bytes per chunk and has no ``UNROLL``) or ``WIDE`` (1: the wide kernel, one 16-byte
    load per lane, each warp store instruction 512 contiguous bytes, one CUDA block per step; it
    implies and needs ``CHUNK=16``, ``INTERLEAVE=1``, ``STREAMING=0``, with ``UNROLL`` 1 unless
    given, ``WIDE_BLOCKS``: 4, 6 or 8 CUDA blocks per SM its registers must allow, ``WIDE_EARLY``,
    1 or 2 to issue a block's first loads before its shared-memory table and barrier (1: the nested
    absmax's code read through the read-only cache, 2: from shared memory), and ``PDL``, sm_90+, 1 or 2
    to launch with programmatic dependent launch, :mod:`minipeft.kernels.pdl` (1: the kernel waits for
    the one before at its start; 2: after issuing its first loads, correct only when the kernel before
    did not write the codes or absmax: a measured variant)); missing
    names take :data:`DEFAULT_VARIANT`'s values, and a setting of the other kernel body is
    refused. Every variant gives the same bits (``quant4bit.cu``: only the memory accesses
    differ). A tuple this function returned is returned at once (a set look-up), so a caller
    that keeps it pays nothing per call.
    """
    if type(variant) is tuple and variant in _CHECKED_VARIANTS:
        return variant
    given = {} if variant is None else dict(variant)
    unknown = sorted(set(given) - set(_VARIANT_VALUES))
    if unknown:
        raise ValueError(f"unknown dequantize variant setting(s) {unknown}: expected any of "
                         f"{sorted(_VARIANT_VALUES)}, e.g. dict(CHUNK=16, UNROLL=2, STREAMING=1)")
    full = {**DEFAULT_VARIANT, **(_WIDE_DEFAULTS if given.get("WIDE") == 1 else {}), **given}
    for name, value in full.items():
        allowed = _VARIANT_VALUES[name]
        if isinstance(value, bool) or value not in allowed:
            raise ValueError(f"dequantize variant {name}={value!r} is not supported: expected one of "
                             f"{list(allowed)}")
    other = _ONLY_SWEPT if full["STAGED"] else _ONLY_STAGED        # the other body's settings: its defaults
    wrong = sorted(k for k in other if k in given and given[k] != _CU_DEFAULTS[k])
    if wrong:
        raise ValueError(f"dequantize variant setting(s) {wrong} apply only to the "
                         f"{'swept' if full['STAGED'] else 'staged'} kernel (STAGED={1 - full['STAGED']})")
    full.update({k: _CU_DEFAULTS[k] for k in other})
    for name in ("WIDE_BLOCKS", "WIDE_EARLY", "PDL"):
        if not full["WIDE"] and given.get(name, _CU_DEFAULTS[name]) != _CU_DEFAULTS[name]:
            raise ValueError(f"dequantize variant setting {name} applies only to the wide kernel (WIDE=1)")
    if full["WIDE"] and (full["CHUNK"], full["INTERLEAVE"], full["STREAMING"]) != (16, 1, 0):
        raise ValueError(f"the wide dequantize kernel (WIDE=1) loads CHUNK=16 bytes per lane, deals its steps out in "
                         f"turn (INTERLEAVE=1) and takes no streaming hints (STREAMING=0), got CHUNK={full['CHUNK']}, "
                         f"INTERLEAVE={full['INTERLEAVE']}, STREAMING={full['STREAMING']}")
    if full["STAGED"] and (full["CHUNK"] != 4 or full["STAGES"] * full["TILE"] > 32768):
        raise ValueError(f"the staged dequantize kernel loads CHUNK=4 bytes and keeps STAGES * TILE <= 32768 "
                         f"bytes of shared memory, got CHUNK={full['CHUNK']}, STAGES={full['STAGES']}, "
                         f"TILE={full['TILE']}")
    pairs = tuple(sorted((name, int(value)) for name, value in full.items()))
    _CHECKED_VARIANTS.add(pairs)
    return pairs


def _variant_defines(variant: tuple) -> tuple:
    """The ``-D`` macros that compile ``variant`` (a :func:`dequantize_variant`): those that differ
    from the .cu's defaults, so the default variant is the very module the quantize kernels use."""
    return tuple((name, value) for name, value in variant if value != _CU_DEFAULTS[name])


def _sources(packed, qs) -> tuple:
    """Everything a :class:`DequantizeLaunch` is built from, to compare by identity (``is``)."""
    s2 = qs.state2
    nested = () if s2 is None else (s2.absmax, s2.code, s2.blocksize)
    return (packed, qs.absmax, qs.code, qs.offset, qs.shape, qs.blocksize, qs.quant_type, qs.dtype, s2) + nested


class DequantizeLaunch:
    """One checked dequantize launch of ``packed`` with ``quant_state`` into ``dtype`` (a NumPy dtype).

    Built once: the checks, the device tables, the nested absmax's arrays (decoded inside the
    kernel, no separate pass), the kernel, its grid and every argument but the output. A call
    allocates the output (or takes ``out``) and launches: what a frozen weight needs on every
    forward and backward. ``grid`` defaults to one wave (every CUDA block the device runs at
    once, each an equal share, see ``quant4bit.cu``; the wide kernel: one block per step); any
    grid gives the same result.
    ``variant`` picks the kernel's compile-time memory-access shape (:func:`dequantize_variant`;
    None: :func:`default_variant` of the device, output dtype and nesting), compiled once per
    variant; every variant gives the same bits.
    """

    def __init__(self, packed, quant_state, dtype, grid: int | None = None, variant=None):
        cp = _cupy()
        self.device = cp.cuda.runtime.getDevice()
        qs = quant_state
        self.sources = _sources(packed, qs)
        if variant is None:                                            # this device's, output type's and nesting's
            variant = default_variant(self.device, dtype, qs.nested)
        pairs = dequantize_variant(variant)
        self.variant = dict(pairs)                                     # {"CHUNK": .., "STAGED": .., ...}
        chunk, unroll = self.variant["CHUNK"], self.variant["UNROLL"]
        bs = int(qs.blocksize)
        if bs < 2 * chunk:                                             # check_blocksize: bs >= 32 = 2 * 16
            raise ValueError(f"blocksize {bs} is smaller than the {2 * chunk} values of a {chunk}-byte "
                             "chunk, which must lie in one block; use a smaller CHUNK")
        self.shape = tuple(qs.shape)
        n = int(np.prod(self.shape, dtype=np.int64))
        aligned = aligned_to(cp, packed, chunk)                        # one CHUNK-byte load per chunk
        self.copied_packed = aligned is not packed                     # a copy of the codes: not worth keeping
        if aligned.size != (n + 1) // 2:
            raise ValueError(f"{n} values need {(n + 1) // 2} packed bytes, got {aligned.size}")
        n_blocks = -(-n // bs)
        if qs.absmax.size != n_blocks:
            raise ValueError(f"absmax has {qs.absmax.size} blocks but {n} values at blocksize {bs} "
                             f"need {n_blocks}; is the QuantState from another tensor?")
        decode = _device_decode(qs.quant_type, self.device)
        if decode is None:
            decode = as_f32(cp, qs.code)
            if decode.size != 16:
                raise ValueError(f"a 4-bit code has 16 values, got {decode.size}")
        self.dtype = np.dtype(dtype)
        name = "dequantize_4bit_" + _SUFFIX[self.dtype.name]
        if qs.nested:
            qabsmax, code2, absmax2, offset, bs2 = nested_arrays(qs)
            ptrs = (decode, absmax2, qabsmax, code2, absmax2, offset)
            name += "_nested"
        else:
            absmax = as_f32(cp, qs.absmax)
            bs2 = 256
            ptrs = (decode, absmax, aligned, decode, absmax, decode)     # unused slots: any pointer
        defines = _variant_defines(pairs)                              # none for the .cu's defaults
        for setting in ("STAGED", "PDL"):
            if self.variant[setting] and compute_capability(self.device) < 90:
                raise ValueError(f"the dequantize kernel's {setting}={self.variant[setting]} needs an sm_90 (Hopper) "
                                 f"or newer GPU; device {self.device} is sm_{compute_capability(self.device)}: "
                                 f"use {setting}=0")
        self.kernel = kernel("quant4bit.cu", name, self.device, defines)
        self.chunks = -(-((n + 1) // 2) // chunk)                      # CHUNK packed bytes each
        if self.variant["STAGED"]:                                     # tiles of TILE output bytes
            self.sweeps = -(-n // (self.variant["TILE"] // self.dtype.itemsize))
        else:                                                          # sweeps of THREADS * UNROLL chunks (wide: steps)
            self.sweeps = -(-self.chunks // (THREADS * unroll))
        if grid is None and self.variant["WIDE"]:                      # one CUDA block per step (several waves)
            grid = self.sweeps
        elif grid is None:                                             # one wave, or fewer blocks than that
            grid = min(resident_blocks("quant4bit.cu", name, THREADS, self.device, defines), self.sweeps)
        self.grid = (max(1, int(grid)),)
        self.args = (aligned, np.int64(n)) + ptrs + (np.int32(log2(bs)), np.int32(log2(bs2)))
        self._empty = cp.empty
        self._dependent = (DependentLaunch(self.kernel, self.grid[0], THREADS, self.args, self.device)
                           if self.variant["PDL"] else None)

    def built_from(self, packed, quant_state) -> bool:
        """True while every array and setting it was built from is the very same object."""
        return all(map(operator.is_, self.sources, _sources(packed, quant_state)))

    def __call__(self, out=None):
        """Dequantize into ``out`` and return it: a fresh array of the state's shape when None, else a
        C-contiguous CuPy array of that shape and this dtype starting on a 16-byte boundary."""
        if out is None:
            out = self._empty(self.shape, dtype=self.dtype)            # shape of the original
        if self._dependent is not None:                                # PDL: through cuLaunchKernelEx
            self._dependent(out)
        else:
            self.kernel(self.grid, (THREADS,), self.args + (out,))
        return out


def cached_dequantize_launch(packed, quant_state, dtype=None, variant=None) -> DequantizeLaunch:
    """The :class:`DequantizeLaunch` of ``(packed, quant_state, dtype)``, from ``quant_state.cache``.

    A frozen weight's launch never changes, so it is built once per output ``dtype`` (as
    passed), device and kernel ``variant`` (:func:`dequantize_variant`; None: the default;
    pass the tuple it returns to keep the per-call check to a set look-up) and kept in the
    state's ``cache``. Invalidation rule: an entry is used
    only while ``packed`` and every field of the state it was built from (absmax, code,
    offset, state2 and its absmax, code and blocksize, shape, blocksize, quant_type, dtype) are
    the very same objects (``is``); replacing any of them, as ``requantize``,
    ``load_state_dict`` and ``.to()`` do, builds a new one (``.to()`` also starts an empty
    cache). Writing into those arrays in place is seen where the kernel reads them directly
    (packed bytes, float32 absmax, uint8 nested absmax, float32 tables), not where the launch
    holds a converted copy (a code of another dtype, say): after such a write call
    ``quant_state.cache.clear()``. A launch that had to copy the packed bytes (an unaligned
    view) is not kept.
    """
    key = ("dequantize_4bit", dtype, _cupy().cuda.runtime.getDevice())
    if variant is not None:                                            # the default's key: as before
        key += (dequantize_variant(variant),)
    launch = quant_state.cache.get(key)
    if launch is not None and launch.built_from(packed, quant_state):
        return launch
    if device_of(packed) != "cuda":
        raise TypeError(f"dequantize_4bit_cuda expects a CuPy array, got {type(packed).__name__}")
    check_4bit_state(packed, quant_state)
    check_blocksize(quant_state.blocksize)
    dt = check_out_dtype(quant_state.dtype if dtype is None else dtype, bfloat16=True)
    launch = DequantizeLaunch(packed, quant_state, dt, variant=variant)
    if not launch.copied_packed:
        quant_state.cache[key] = launch
    return launch


def prepare_dequantize_4bit(packed, quant_state, out_dtype=None, variant=None):
    """A zero-argument function that dequantizes into one preallocated output and returns it.

    Everything but the launch happens once, here (:class:`DequantizeLaunch`, with the kernel
    ``variant``, None: the default), the output included: each call is the kernel launch
    alone. The returned array is overwritten by the next call.
    """
    launch = cached_dequantize_launch(packed, quant_state, out_dtype, variant)
    out = launch()

    def run():
        return launch(out)

    return run


def dequantize_4bit_cuda(packed, quant_state, dtype=None):
    """Inverse of :func:`quantize_4bit_cuda` on the GPU: ``decode[q] * absmax[block]``, cast once.

    ``dtype`` is float32, float16 or bfloat16 (``'bfloat16'`` or ``ml_dtypes.bfloat16``;
    default: the state's dtype). Bit for bit the result of
    :func:`minipeft.quant.blockwise.dequantize_4bit` (whose fast path this is for CuPy
    input); the nested absmax is reconstructed inside the same launch. Everything but the
    allocation and the launch is cached on the state (:func:`cached_dequantize_launch`).
    """
    return cached_dequantize_launch(packed, quant_state, dtype)()
