"""The quantization RawKernels agree bit for bit with their NumPy twins.

minipeft/kernels/quant4bit.py and quant8bit.py against minipeft.quant.blockwise and
minipeft.quant.int8 (run on NumPy): packed bytes, codes, absmax, the nested state of
double quantization and dequantized values are compared as raw bits, on random inputs of
many shapes (odd lengths, all-zero blocks, subnormals, values exactly on the decision
thresholds), every block size, float16 and float32. All tests need CuPy and a GPU.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from minipeft.backend import to_numpy
from minipeft.quant import blockwise as B
from minipeft.quant import codes as C
from minipeft.quant import int8 as I8

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "dequant_4bit.py"

pytestmark = pytest.mark.gpu

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
SHAPES = [(1,), (7,), (64,), (65,), (1001,), (3, 4097), (33, 129), (2, 3, 2048), (70001,)]


@pytest.fixture(scope="module")
def k4():
    from minipeft.kernels import quant4bit

    return quant4bit


@pytest.fixture(scope="module")
def k8():
    from minipeft.kernels import quant8bit

    return quant8bit


def bits(a) -> np.ndarray:
    """The raw bits of an array (either backend), flattened, as unsigned integers."""
    a = np.ascontiguousarray(to_numpy(a)).reshape(-1)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_same(gpu, ref, what=""):
    g, r = to_numpy(gpu), np.asarray(to_numpy(ref))
    assert g.dtype == r.dtype, f"{what}: dtype {g.dtype} != {r.dtype}"
    assert g.shape == r.shape, f"{what}: shape {g.shape} != {r.shape}"
    gb, rb = bits(g), bits(r)
    bad = np.flatnonzero(gb != rb)
    assert bad.size == 0, (f"{what}: {bad.size} of {gb.size} differ, first at {bad[:5]}: "
                           f"{g.reshape(-1)[bad[:5]]} vs {r.reshape(-1)[bad[:5]]}")


def make_input(seed: int, shape, dtype, blocksize: int, thresholds=None) -> np.ndarray:
    """Random data with the hard cases: zero blocks, subnormals, wide scales, ties."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if thresholds is None:
        x = rng.standard_normal(n) * np.exp(rng.uniform(-3, 3, n))
    else:                                                             # absmax 1: s == x exactly
        x = rng.uniform(-1, 1, n)
        x = np.where(rng.random(n) < 0.3, rng.choice(np.concatenate([thresholds, -thresholds]),
                                                       size=n), x)
        x[::blocksize] = 1.0
    if n > 2 * blocksize:
        x[blocksize: 2 * blocksize] = 0.0                            # an all-zero block
    if n > 8:
        start = int(rng.integers(0, n - 4))
        x[start: start + int(rng.integers(1, 300))] = 0.0             # zeros anywhere
    if dtype == np.float32 and n > 40:
        x[rng.integers(0, n, size=5)] = 3e-39                         # subnormal inputs
        if n > 3 * blocksize:
            x[2 * blocksize: 3 * blocksize] = rng.uniform(-1e-39, 1e-39, blocksize)
        x[-1] = 2e38 if n > 4 * blocksize else x[-1]                  # reciprocal flushed
    if dtype == np.float16:
        x = np.clip(x, -6e4, 6e4)
    return x.astype(dtype).reshape(shape)


def assert_states_equal(g, r):
    assert g.shape == r.shape and g.blocksize == r.blocksize
    assert g.quant_type == r.quant_type and np.dtype(g.dtype) == np.dtype(r.dtype)
    assert_same(g.absmax, r.absmax, "absmax")
    assert_same(g.code, r.code, "code")
    assert g.nested == r.nested
    if r.nested:
        assert_same(g.offset, r.offset, "offset")
        assert_states_equal(g.state2, r.state2)


# ---------------------------------------------------------------------------------------
# 4-bit
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_4bit_quantize_and_dequantize_match_twin(cp, k4, blocksize, quant_type, dtype, compress):
    thr = k4.decision_table(quant_type)[0]
    thr = thr[np.isfinite(thr)]
    for i, shape in enumerate(SHAPES):
        x = make_input(1000 * blocksize + i, shape, dtype, blocksize, thr if i % 2 else None)
        packed, state = k4.quantize_4bit_cuda(cp.asarray(x), blocksize, quant_type, compress)
        rpacked, rstate = B.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                          compress_statistics=compress)
        assert_same(packed, rpacked, f"packed {shape}")
        assert_states_equal(state, rstate)
        for out in (np.float16, np.float32, "bfloat16"):
            y = k4.dequantize_4bit_cuda(packed, state, out)
            assert_same(y, B.dequantize_4bit(rpacked, rstate, dtype=out), f"dequant {shape} {out}")


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_4bit_dequantize_random_bytes(cp, k4, quant_type, nested):
    """Every byte value (FP4's -0 included), absmax with zeros and subnormals."""
    rng = np.random.default_rng(7)
    for n, bs in [(1, 32), (9, 64), (4097, 64), (100_003, 128), (2 * 4096 + 1, 4096)]:
        packed = rng.integers(0, 256, size=((n + 1) // 2, 1), dtype=np.uint8)
        n_blocks = -(-n // bs)
        absmax = (rng.random(n_blocks) * 10).astype(np.float32)
        absmax[rng.random(n_blocks) < 0.1] = 0.0
        absmax[rng.random(n_blocks) < 0.05] = 1e-39
        state = B.QuantState(absmax=absmax, shape=(n,), code=C.get_4bit_type(quant_type),
                             blocksize=bs, quant_type=quant_type, dtype=np.dtype(np.float32))
        if nested:
            state.absmax, state.offset, state.state2 = B.double_quantize(absmax, blocksize=256)
        for out in (np.float16, np.float32, "bfloat16"):
            y = k4.dequantize_4bit_cuda(cp.asarray(packed), state.to("cuda"), out)
            assert_same(y, B.dequantize_4bit(packed, state, dtype=out), f"n={n} {out}")


def test_4bit_large_tensor(cp, k4):
    """Many CUDA blocks and the unrolled tail: a (1000, 4099) weight, NF4, block 64, both."""
    x = make_input(3, (1000, 4099), np.float16, 64)
    for compress in (False, True):
        packed, state = k4.quantize_4bit_cuda(cp.asarray(x), 64, "nf4", compress)
        rpacked, rstate = B.quantize_4bit(x, blocksize=64, quant_type="nf4",
                                          compress_statistics=compress)
        assert_same(packed, rpacked, "packed")
        assert_states_equal(state, rstate)
        assert_same(k4.dequantize_4bit_cuda(packed, state), B.dequantize_4bit(rpacked, rstate))
        run = k4.prepare_dequantize_4bit(packed, state, np.float32)
        for _ in range(2):
            assert_same(run(), B.dequantize_4bit(rpacked, rstate, dtype=np.float32))


def test_4bit_unaligned_views(cp, k4):
    """Inputs that start off a 16-byte boundary, and non-contiguous inputs."""
    x = make_input(5, (2000,), np.float32, 64)
    xd = cp.asarray(x)
    for view, ref in ((xd[1:], x[1:]), (xd[::2], x[::2])):
        packed, state = k4.quantize_4bit_cuda(view, 64, "nf4", False)
        rpacked, rstate = B.quantize_4bit(np.ascontiguousarray(ref), blocksize=64, quant_type="nf4")
        assert_same(packed, rpacked, "packed")
        pd = cp.asarray(rpacked).reshape(-1)
        # a packed array that starts at an odd byte
        buf = cp.concatenate([cp.zeros(1, cp.uint8), pd])[1:].reshape(-1, 1)
        assert_same(k4.dequantize_4bit_cuda(buf, rstate.to("cuda")), B.dequantize_4bit(rpacked, rstate))


def test_4bit_dequantize_bfloat16_is_the_float32_result_rounded_once(cp, k4):
    """bfloat16 output = the float32 output cast to bfloat16 (CuPy's cast, the course's rounding)."""
    from minipeft.amp import bfloat16_dtype
    from minipeft.quant.floats import float32_to_bfloat16_bits

    x = make_input(8, (257, 515), np.float32, 64)
    for compress in (False, True):
        packed, state = k4.quantize_4bit_cuda(cp.asarray(x), 64, "nf4", compress)
        y32 = k4.dequantize_4bit_cuda(packed, state, np.float32)
        y16 = k4.dequantize_4bit_cuda(packed, state, bfloat16_dtype())
        assert y16.dtype == bfloat16_dtype() and y16.shape == x.shape
        assert_same(y16, y32.astype(bfloat16_dtype()), "cast")
        np.testing.assert_array_equal(bits(y16), float32_to_bfloat16_bits(y32.get()).reshape(-1))


@pytest.mark.parametrize("grid", [1, 3, 7, 64])
def test_4bit_dequantize_any_grid_gives_the_same_bits(cp, k4, grid):
    """Each CUDA block takes an equal share of the chunks: many sweeps (grid 1), odd shares, the tail."""
    x = make_input(9, (333, 1001), np.float16, 64)
    for compress in (False, True):
        packed, state = k4.quantize_4bit_cuda(cp.asarray(x), 64, "nf4", compress)
        rpacked, rstate = B.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=compress)
        for out in (np.float16, "bfloat16"):
            dt = B.check_out_dtype(out, bfloat16=True)
            launch = k4.DequantizeLaunch(packed, state, dt, grid=grid)
            assert launch.grid == (grid,)
            assert launch.variant == k4.default_variant(cp.cuda.runtime.getDevice(), dt, compress)   # wide on sm_90+
            assert_same(launch(), B.dequantize_4bit(rpacked, rstate, dtype=out), f"grid {grid} {out}")


def test_4bit_dequantize_launch_is_cached_on_the_state_until_its_arrays_change(cp, k4):
    """One launch per (dtype, device) kept in quant_state.cache, rebuilt when an array it was built from is replaced."""
    x = make_input(10, (64, 300), np.float32, 64)
    packed, state = k4.quantize_4bit_cuda(cp.asarray(x), 64, "nf4", True)
    rpacked, rstate = B.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    first = k4.dequantize_4bit_cuda(packed, state, np.float16)
    launch = k4.cached_dequantize_launch(packed, state, np.float16)
    assert launch.built_from(packed, state) and list(state.cache.values()).count(launch) == 1
    second = k4.dequantize_4bit_cuda(packed, state, np.float16)
    assert k4.cached_dequantize_launch(packed, state, np.float16) is launch        # a hit
    assert second is not first                                                       # a fresh output
    assert_same(second, first)
    assert_same(second, B.dequantize_4bit(rpacked, rstate, dtype=np.float16))
    # another state's absmax (a different tensor's scales): the entry is rebuilt, the result follows
    _, other = B.quantize_4bit(x * np.float32(0.5), blocksize=64, quant_type="nf4", compress_statistics=True)
    state.absmax, state.offset, state.state2 = (cp.asarray(other.absmax), cp.asarray(other.offset),
                                                other.state2.to("cuda"))
    rstate.absmax, rstate.offset, rstate.state2 = other.absmax, other.offset, other.state2
    assert not launch.built_from(packed, state)
    assert_same(k4.dequantize_4bit_cuda(packed, state, np.float16),
                B.dequantize_4bit(rpacked, rstate, dtype=np.float16), "after the state changed")
    assert k4.cached_dequantize_launch(packed, state, np.float16) is not launch
    # other packed bytes with the same state, and a copy of the state on another device: not the cached launch
    packed2 = packed.copy()
    assert k4.cached_dequantize_launch(packed2, state, np.float16).built_from(packed2, state)
    assert state.to("cuda").cache == {}
    # an unaligned view of the codes is copied for the kernel, and such a launch is not kept
    buf = cp.concatenate([cp.zeros(1, cp.uint8), packed.reshape(-1)])[1:].reshape(-1, 1)
    state.cache.clear()
    assert_same(k4.dequantize_4bit_cuda(buf, state, np.float16), k4.dequantize_4bit_cuda(packed, state, np.float16))
    assert [entry.sources[0] is packed for entry in state.cache.values()] == [True]


# Compile-time variants of the dequantize kernel (quant4bit.cu: CHUNK packed bytes per load,
# UNROLL chunks per thread and sweep, STREAMING cache hints, INTERLEAVE: sweeps dealt out in turn): the
# default and each load width with a few unrolls, with and without the hints; and the staged kernel (STAGED=1, sm_90+: TILE
# output bytes per bulk store, STAGES buffers, PREFETCH tiles ahead into L2, AHEAD: the next tile's
# loads in flight while a tile decodes, INTERLEAVE: tiles dealt out in turn) at each tile size, numbers of stages and prefetch distances;
# and the wide kernel (WIDE=1: 512-byte warp loads and stores, one block per step) at 1, 2 and 4 groups per warp and step.
DEQUANT_VARIANTS = [dict(CHUNK=c, UNROLL=u, STREAMING=s, STAGED=0, INTERLEAVE=i) for c, u, s, i in
                    [(4, 4, 0, 0), (4, 1, 1, 0), (4, 3, 0, 0), (8, 1, 0, 0), (8, 2, 1, 0), (8, 4, 0, 0),
                     (16, 1, 0, 0), (16, 1, 1, 0), (16, 2, 1, 0), (16, 4, 0, 0), (4, 4, 0, 1), (4, 3, 0, 1),
                     (16, 2, 1, 1)]]
DEQUANT_VARIANTS += [dict(CHUNK=4, STAGED=1, TILE=t, STAGES=k, PREFETCH=p, STREAMING=s, AHEAD=a, INTERLEAVE=i)
                     for t, k, p, s, a, i in [(16384, 2, 0, 0, 0, 0), (16384, 2, 2, 1, 0, 0), (8192, 2, 1, 0, 0, 0),
                                              (8192, 3, 4, 0, 0, 0), (8192, 4, 3, 1, 0, 0), (16384, 2, 0, 0, 1, 0),
                                              (8192, 2, 0, 0, 1, 0), (8192, 3, 1, 1, 1, 0), (16384, 2, 0, 0, 0, 1), (8192, 2, 0, 0, 0, 1),
                                              (8192, 3, 1, 0, 1, 1)]]
DEQUANT_VARIANTS += [dict(WIDE=1, UNROLL=u, WIDE_BLOCKS=b, WIDE_EARLY=e, PDL=p)                    # the wide kernel
                     for u, b, e, p in [(1, 8, 0, 0), (2, 6, 1, 0), (4, 4, 0, 0), (1, 4, 1, 0), (1, 6, 2, 0),
                                        (2, 4, 2, 1), (1, 6, 0, 1), (1, 6, 0, 2)]]   # PDL: dependent launches


def variant_id(v) -> str:
    """The variant's token in benchmarks/dequant_4bit.py (its variant_name), e.g. b8k2p0s0i1 or w1b8."""
    spec = importlib.util.spec_from_file_location("dequant_4bit_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from minipeft.kernels.quant4bit import dequantize_variant
    return mod.variant_name(dequantize_variant(v))                     # every setting, the defaults filled in


def needs_sm90_for(cp, variant):
    """Skip a staged or PDL variant below sm_90, where quant4bit.py refuses it (tested below)."""
    from minipeft.kernels._module import compute_capability
    if (variant.get("STAGED") or variant.get("PDL")) and compute_capability(cp.cuda.runtime.getDevice()) < 90:
        pytest.skip("the staged dequantize kernel and dependent launches need sm_90 or newer")


@pytest.mark.parametrize("variant", DEQUANT_VARIANTS, ids=variant_id)
def test_4bit_dequantize_variants_match_twin(cp, k4, variant):
    """Every variant gives the twin's bits: odd n, n not a multiple of a chunk's 2 * CHUNK values
    (the partial last chunk read byte by byte), block sizes 32 (a 16-byte chunk is exactly one
    block) to 4096, nested or not, float32/float16/bfloat16 output, one wave and other grids;
    for the staged kernel also whole numbers of tiles (8192 values: a 16 KiB tile of 16-bit values,
    two of float32), with and without a partial last tile."""
    needs_sm90_for(cp, variant)
    rng = np.random.default_rng(11)
    for n, bs in [(1, 32), (7, 32), (31, 32), (33, 32), (65, 64), (1001, 32), (1001, 128),
                  (4097, 64), (2 * 4096 + 1, 4096), (70_001, 128), (100_003, 32), (3 * 8192, 64),
                  (5 * 8192 + 8, 256)]:
        packed = rng.integers(0, 256, size=((n + 1) // 2, 1), dtype=np.uint8)
        n_blocks = -(-n // bs)
        absmax = (rng.random(n_blocks) * 10).astype(np.float32)
        absmax[rng.random(n_blocks) < 0.1] = 0.0
        absmax[rng.random(n_blocks) < 0.05] = 1e-39                    # subnormal: flushed
        dpacked = cp.asarray(packed)
        for nested in (False, True):
            state = B.QuantState(absmax=absmax, shape=(n,), code=C.get_4bit_type("nf4"), blocksize=bs,
                                 quant_type="nf4", dtype=np.dtype(np.float32))
            if nested:
                state.absmax, state.offset, state.state2 = B.double_quantize(absmax, blocksize=256)
            dstate = state.to("cuda")
            for out in (np.float32, np.float16, "bfloat16"):
                dt = B.check_out_dtype(out, bfloat16=True)
                ref = B.dequantize_4bit(packed, state, dtype=out)
                for grid in (None, 1, 7):
                    launch = k4.DequantizeLaunch(dpacked, dstate, dt, grid=grid, variant=variant)
                    assert launch.variant == dict(k4.dequantize_variant(variant))
                    assert all(launch.variant[k] == v for k, v in variant.items())
                    assert_same(launch(), ref, f"{variant_id(variant)} n={n} bs={bs} nested={nested} "
                                               f"{dt} grid={launch.grid}")


@pytest.mark.parametrize("variant", DEQUANT_VARIANTS[1::3], ids=variant_id)
def test_4bit_dequantize_variant_through_the_cache_and_unaligned_codes(cp, k4, variant):
    """A variant through cached_dequantize_launch / prepare_dequantize_4bit (kept apart from the
    default's entry), on quantized data; packed bytes off a CHUNK-byte boundary are copied first."""
    needs_sm90_for(cp, variant)
    x = make_input(12, (129, 515), np.float16, 64)
    for compress in (False, True):
        packed, state = k4.quantize_4bit_cuda(cp.asarray(x), 64, "nf4", compress)
        rpacked, rstate = B.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=compress)
        ref = B.dequantize_4bit(rpacked, rstate, dtype="bfloat16")
        launch = k4.cached_dequantize_launch(packed, state, "bfloat16", variant)
        assert launch is k4.cached_dequantize_launch(packed, state, "bfloat16", k4.dequantize_variant(variant))
        assert launch is not k4.cached_dequantize_launch(packed, state, "bfloat16")    # the default's own
        assert_same(launch(), ref, "cached")
        run = k4.prepare_dequantize_4bit(packed, state, "bfloat16", variant)
        for _ in range(2):
            assert_same(run(), ref, "prepared")
        # codes 4 bytes past a 512-byte boundary: aligned for 4-byte loads, not for 8- or 16-byte ones
        buf = cp.concatenate([cp.zeros(4, cp.uint8), packed.reshape(-1)])[4:]
        off = k4.DequantizeLaunch(buf, state, B.check_out_dtype("bfloat16", bfloat16=True), variant=variant)
        assert off.copied_packed == (launch.variant["CHUNK"] > 4)
        assert_same(off(), ref, "unaligned codes")


@pytest.mark.parametrize("pdl", [1, 2])
def test_4bit_dequantize_dependent_launches_in_a_row(cp, k4, pdl):
    """PDL (programmatic dependent launch): each launch's start overlaps the end of the one before and
    waits before it stores, so launches in a row into one output leave the last one's values, whatever
    the kernels before wrote; with PDL=1 a dequantize right after the quantize that wrote its codes
    (no synchronization between) reads the new codes."""
    variant = dict(WIDE=1, WIDE_BLOCKS=8, PDL=pdl)
    needs_sm90_for(cp, variant)
    dt = B.check_out_dtype("bfloat16", bfloat16=True)
    shape = (1024, 4160)                                               # 520 CUDA blocks: more than fit at once
    weights = []
    for seed, compress in ((21, False), (22, True), (23, False)):
        packed, state = k4.quantize_4bit_cuda(cp.asarray(make_input(seed, shape, np.float32, 64)), 64, "nf4", compress)
        plain = k4.DequantizeLaunch(packed, state, dt, variant={**variant, "PDL": 0})
        weights.append((packed, state, plain()))                       # the plain launch's values
    cp.cuda.Device().synchronize()
    launches = [k4.DequantizeLaunch(p, s, dt, variant=variant) for p, s, _ in weights]
    assert all(launch._dependent is not None for launch in launches)
    out = cp.empty(shape, dtype=dt)
    for _ in range(3):
        for launch in launches:                                        # three weights in turn into one output
            launch(out)
        assert_same(out, weights[-1][2], f"PDL={pdl}: the last launch's values")
    for launch, (_, _, ref) in zip(launches, weights):                 # fresh outputs, back to back
        assert_same(launch(), ref, f"PDL={pdl}: a fresh output")
    if pdl == 1:
        for seed in (31, 32, 33):                                      # quantize, then dequantize at once
            x = make_input(seed, shape, np.float32, 64)
            packed, state = k4.quantize_4bit_cuda(cp.asarray(x), 64, "nf4", True)
            got = k4.DequantizeLaunch(packed, state, dt, variant=variant)()
            rpacked, rstate = B.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
            assert_same(got, B.dequantize_4bit(rpacked, rstate, dtype="bfloat16"), f"after the quantize, seed {seed}")


@pytest.mark.parametrize("variant", [None, dict(WIDE=1), dict(WIDE=1, UNROLL=2, WIDE_BLOCKS=4, WIDE_EARLY=1),
                                     dict(STAGED=1, TILE=8192, INTERLEAVE=1), dict(CHUNK=4, UNROLL=4)],
                         ids=lambda v: "default" if v is None else variant_id(v))
def test_4bit_dequantize_non_finite_absmax_and_code(cp, k4, variant):
    """Infinite and NaN absmax and products past the float16 range: for those blocks the staged and
    wide kernels leave their short decoding for decode8's (quant4bit.cu, decode_word), and every kernel
    gives the twin's values (NaN where the twin has NaN, whatever its payload)."""
    if variant is not None:
        needs_sm90_for(cp, variant)
    rng = np.random.default_rng(5)
    n, bs = 4 * 8192 + 1024 + 3, 64                                    # whole tiles and groups, then a partial one
    packed = rng.integers(0, 256, size=((n + 1) // 2, 1), dtype=np.uint8)
    n_blocks = -(-n // bs)
    absmax = (rng.random(n_blocks) * 10).astype(np.float32)
    pick = rng.random(n_blocks)
    absmax[pick < 0.05] = np.inf
    absmax[(pick >= 0.05) & (pick < 0.08)] = np.nan
    absmax[(pick >= 0.08) & (pick < 0.15)] = 3e38                      # products past float16's range
    for quant_type in ("nf4", "fp4"):
        state = B.QuantState(absmax=absmax, shape=(n,), code=C.get_4bit_type(quant_type), blocksize=bs,
                             quant_type=quant_type, dtype=np.dtype(np.float32))
        dstate = state.to("cuda")
        for out in (np.float16, "bfloat16", np.float32):
            dt = B.check_out_dtype(out, bfloat16=True)
            ref = to_numpy(B.dequantize_4bit(packed, state, dtype=out)).astype(np.float32)
            got = to_numpy(k4.DequantizeLaunch(cp.asarray(packed), dstate, dt, variant=variant)()).astype(np.float32)
            assert np.array_equal(np.isnan(got), np.isnan(ref)), f"{dt}: NaN where the twin has none, or not"
            ok = ~np.isnan(ref)
            assert np.isnan(ref).any() and np.isinf(ref).any()
            assert_same(got[ok], ref[ok], f"{dt} finite and infinite values")


def test_4bit_dequantize_bad_variant_raises(cp, k4):
    packed, state = k4.quantize_4bit_cuda(cp.ones(64, cp.float32), 64, "nf4")
    for bad, match in ((dict(CHUNK=32), "CHUNK=32"), (dict(UNROLL=0), "UNROLL=0"),
                       (dict(STREAMING=True), "STREAMING"), (dict(WIDTH=4), "unknown"),
                       (dict(STAGED=1, CHUNK=16), "CHUNK=4"), (dict(STAGED=1, TILE=16384, STAGES=3), "STAGES"),
                       (dict(STAGED=1, UNROLL=8), "UNROLL"), (dict(STAGED=0, TILE=8192), "TILE"),
                       (dict(STAGED=1, TILE=4096), "TILE=4096")):
        with pytest.raises(ValueError, match=match):
            k4.DequantizeLaunch(packed, state, np.dtype(np.float16), variant=bad)
        with pytest.raises(ValueError, match=match):
            k4.cached_dequantize_launch(packed, state, np.float16, bad)


def test_linear4bit_bfloat16_on_the_gpu_dequantizes_straight_to_bfloat16(cp, k4):
    """MatMul4bit asks for a bfloat16 weight on the GPU (no float32 weight, no cast) and multiplies
    exactly what the float32 weight cast to bfloat16 gives."""
    from minipeft import amp
    from minipeft.engine import Tensor
    from minipeft.nn import Linear
    from minipeft.quant import modules

    q = modules.Linear4bit(Linear(256, 96, bias=False, rng=0), compute_dtype="bfloat16").to("cuda")
    x0 = np.random.default_rng(1).normal(size=(4, 256)).astype(np.float32)
    assert modules._weight_dtype(cp.asarray(x0), "bfloat16") == amp.bfloat16_dtype()
    assert modules._weight_dtype(x0, "bfloat16") == np.float32                    # the CPU emulates
    y = q(Tensor(cp.asarray(x0))).data
    w32 = k4.dequantize_4bit_cuda(q.weight.data, q.quant_state, np.float32)
    ref = amp.gemm_2d(amp.to_compute(cp.asarray(x0), "bfloat16"), amp.to_compute(w32, "bfloat16").T)
    assert_same(y, ref.astype(np.float32), "forward")


# ---------------------------------------------------------------------------------------
# 8-bit block-wise
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_8bit_blockwise_match_twin(cp, k8, blocksize, dtype, nested):
    mids = C.midpoints(C.DYNAMIC_SIGNED)
    for i, shape in enumerate(SHAPES):
        x = make_input(2000 * blocksize + i, shape, dtype, blocksize, mids if i % 2 else None)
        q, state = k8.quantize_blockwise_cuda(cp.asarray(x), blocksize=blocksize, nested=nested)
        rq, rstate = B.quantize_blockwise(x, blocksize=blocksize, nested=nested)
        assert_same(q, rq, f"codes {shape}")
        assert_states_equal(state, rstate)
        for out in (np.float16, np.float32):
            y = k8.dequantize_blockwise_cuda(q, state, out)
            assert_same(y, B.dequantize_blockwise(rq, rstate, dtype=out), f"dequant {shape} {out}")


@pytest.mark.parametrize("code_name", ["udynamic", "nf4", "int4", "short"])
def test_8bit_other_codes(cp, k8, code_name):
    """Any code of 2..256 values: unsigned map, 16-value codes, unsorted Int4, 5 values."""
    code = (np.asarray([-1, -0.25, 0, 0.5, 1], np.float32) if code_name == "short"
            else np.asarray(C.CODES[code_name], np.float32))
    mids = C.midpoints(code)
    for i, shape in enumerate(SHAPES[:7]):
        x = make_input(30 + i, shape, np.float32, 256, mids if i % 2 else None)
        if code_name == "udynamic":
            x = np.abs(x)
        q, state = k8.quantize_blockwise_cuda(cp.asarray(x), cp.asarray(code), blocksize=256)
        rq, rstate = B.quantize_blockwise(x, code, blocksize=256)
        assert_same(q, rq, f"codes {shape}")
        assert_states_equal(state, rstate)
        assert_same(k8.dequantize_blockwise_cuda(q, state), B.dequantize_blockwise(rq, rstate))


def test_double_quantize_matches_twin(cp, k8):
    rng = np.random.default_rng(11)
    for n in (1, 255, 256, 257, 10_000):
        absmax = (rng.random(n) * rng.uniform(0.1, 100)).astype(np.float32)
        q2, offset, state2 = k8.double_quantize_cuda(cp.asarray(absmax), blocksize=256)
        rq2, roffset, rstate2 = B.double_quantize(absmax, blocksize=256)
        assert_same(q2, rq2, "q2")
        assert_same(offset, roffset, "offset")
        assert_states_equal(state2, rstate2)


# ---------------------------------------------------------------------------------------
# Row-wise int8
@pytest.mark.parametrize("threshold", [0.0, 2.5, 6.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_int8_vectorwise_quant_matches_twin(cp, k8, dtype, threshold):
    rng = np.random.default_rng(int(threshold * 10) + (dtype == np.float16))
    for shape in [(1, 1), (1, 7), (5, 33), (64, 4096), (3, 17, 129), (300, 1001), (2049,)]:
        x = rng.standard_normal(shape) * rng.uniform(0.1, 3)
        flat = x.reshape(-1, shape[-1])
        flat[rng.random(flat.shape) < 0.002] *= 40                    # outliers
        if flat.shape[0] > 2:
            flat[0] = 0.0                                             # an all-zero row
            flat[1, :3] = threshold if threshold else 1.0             # on the threshold
        x = x.astype(dtype)
        q, stats, cols = k8.int8_vectorwise_quant_cuda(cp.asarray(x), threshold)
        rq, rstats, rcols = I8.int8_vectorwise_quant(x, threshold)
        assert_same(q, rq, f"q {shape}")
        assert_same(stats, rstats, f"stats {shape}")
        if rcols is None:
            assert cols is None
        else:
            np.testing.assert_array_equal(to_numpy(cols), rcols)


# ---------------------------------------------------------------------------------------
# Hooks and errors
def test_registry_sends_cupy_to_the_kernels(cp, k4, k8):
    """The quantizers' fast paths: the kernel for a CuPy array, the twin for NumPy or with the switch off."""
    from minipeft import fast

    x = make_input(1, (300,), np.float32, 64)
    pairs = [(B.quantize_4bit, k4.quantize_4bit_cuda), (B.dequantize_4bit, k4.dequantize_4bit_cuda),
             (B.quantize_blockwise, k8.quantize_blockwise_cuda),
             (B.dequantize_blockwise, k8.dequantize_blockwise_cuda),
             (I8.int8_vectorwise_quant, k8.int8_vectorwise_quant_cuda)]
    for reference, kernel in pairs:
        assert fast.choose(reference, cp.asarray(x)) is kernel, reference.__name__
        assert fast.choose(reference, x) is reference, reference.__name__
    packed, state = B.quantize_4bit(cp.asarray(x), blocksize=64, quant_type="nf4", compress_statistics=True)
    rpacked, rstate = B.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert_same(packed, rpacked)
    assert_same(B.dequantize_4bit(packed, state, dtype=np.float16),
                B.dequantize_4bit(rpacked, rstate, dtype=np.float16))


def test_switch_off_runs_the_twins_on_cupy(cp, k4, k8, monkeypatch):
    """MINIPEFT_KERNELS=0: the NumPy-style twins run through CuPy, and give the kernels' bits."""
    from ._twin import Counter

    x = cp.asarray(make_input(4, (3, 1001), np.float32, 64))
    kpacked, kstate = B.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    kq, ks8 = B.quantize_blockwise(x, blocksize=256)
    calls = [Counter(monkeypatch, k4, "quantize_4bit_cuda"), Counter(monkeypatch, k8, "quantize_blockwise_cuda")]
    monkeypatch.setenv("MINIPEFT_KERNELS", "0")
    packed, state = B.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    q, s8 = B.quantize_blockwise(x, blocksize=256)
    assert [c.n for c in calls] == [0, 0], "a kernel ran with MINIPEFT_KERNELS=0"
    assert_same(packed, kpacked, "packed")
    assert_states_equal(state, kstate)
    assert_same(q, kq, "codes")
    assert_same(B.dequantize_blockwise(q, s8), B.dequantize_blockwise(kq, ks8))


def test_blockwise_on_cupy_matches_kernels(cp, k4, k8):
    """minipeft.quant.blockwise on a CuPy array (kernel path once hooked in) = the kernels."""
    x = cp.asarray(make_input(2, (5, 999), np.float32, 64))
    packed, state = B.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    kpacked, kstate = k4.quantize_4bit_cuda(x, 64, "nf4", True)
    assert_same(packed, kpacked)
    assert_states_equal(state, kstate)
    assert_same(B.dequantize_4bit(packed, state), k4.dequantize_4bit_cuda(kpacked, kstate))
    q, s8 = B.quantize_blockwise(x, blocksize=256, nested=True)
    kq, ks8 = k8.quantize_blockwise_cuda(x, blocksize=256, nested=True)
    assert_same(q, kq)
    assert_same(B.dequantize_blockwise(q, s8), k8.dequantize_blockwise_cuda(kq, ks8))


def test_bad_input_raises(cp, k4, k8):
    with pytest.raises(TypeError, match="CuPy"):
        k4.quantize_4bit_cuda(np.ones(64, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        k4.quantize_4bit_cuda(cp.asarray([1.0, np.nan], dtype=cp.float32))
    with pytest.raises(ValueError, match="blocksize"):
        k8.quantize_blockwise_cuda(cp.ones(64, cp.float32), blocksize=100)
    with pytest.raises(TypeError, match="supports float32 and float16"):
        k4.quantize_4bit_cuda(cp.ones(64, cp.float64))
    packed, state = k4.quantize_4bit_cuda(cp.ones(64, cp.float32), 64, "nf4")
    with pytest.raises(ValueError, match="packed bytes"):
        k4.dequantize_4bit_cuda(packed[:-1], state)
