"""minipeft against bitsandbytes' own outputs, bit for bit.

The fixture ``tests/fixtures/bnb_quant.safetensors`` (+ ``bnb_quant.json``) is made by
``tests/fixtures/make_bnb_fixtures.py`` on a CUDA machine with bitsandbytes 0.50.2; its
docstring lists the keys. Every check here is exact equality of bit patterns, except two
places where the reference's arithmetic is not reproducible and the test says so:

- the double-quantization offset is PyTorch's float32 CUDA ``mean``, whose summation order
  is the kernel's: ours may differ by an ulp, so the nested codes are also checked
  exactly with bitsandbytes' offset put in (``double_quantize(..., offset=...)``);
- ``int8_vectorwise_quant`` scales by ``__fdividef(127, absmax)`` (an approximate
  division) on CUDA: codes may differ by +-1 on rare elements (bitsandbytes' own test
  allows 1 in 500); the row statistics must match exactly.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from minipeft.quant import blockwise as B
from minipeft.quant import codes as C
from minipeft.quant import int8 as I

HERE = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURE, META = HERE / "bnb_quant.safetensors", HERE / "bnb_quant.json"
PRESENT = FIXTURE.exists() and META.exists()
REASON = (f"{FIXTURE.name} not found in tests/fixtures/: make it on a CUDA machine with torch and "
          "bitsandbytes==0.50.2 by running `python tests/fixtures/make_bnb_fixtures.py`")
CASES = json.loads(META.read_text())["cases"] if PRESENT else []


def cases(kind):
    return pytest.mark.parametrize("case", [c for c in CASES if c["kind"] == kind],
                                   ids=lambda c: c["key"])


@pytest.fixture(scope="module")
def fx():
    if not PRESENT:
        pytest.skip(REASON)
    from safetensors.numpy import load_file
    return load_file(str(FIXTURE))


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_same(ours, ref, what):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != bitsandbytes {ref.shape}"
    assert ours.dtype == ref.dtype, f"{what}: dtype {ours.dtype} != bitsandbytes {ref.dtype}"
    diff = np.nonzero(bits(ours).reshape(-1) != bits(ref).reshape(-1))[0]
    assert diff.size == 0, (f"{what}: {diff.size} of {ref.size} differ, first at flat index "
                            f"{diff[:8].tolist()}: ours {ours.reshape(-1)[diff[:8]].tolist()} vs "
                            f"bitsandbytes {ref.reshape(-1)[diff[:8]].tolist()}")


def ulps(a, b):
    """Distance of two float32 scalars in units in the last place (same sign)."""
    u = [int(np.asarray(v, np.float32).reshape(1).view(np.uint32)[0]) for v in (a, b)]
    return abs(u[0] - u[1])


def sha(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def test_fixture_present():
    if not PRESENT:
        pytest.skip(REASON)
    meta = json.loads(META.read_text())
    assert meta["bitsandbytes"].startswith("0.50"), meta["bitsandbytes"]
    assert FIXTURE.stat().st_size < 2_500_000


def bnb_state_4bit(fx, key, case, shape, dtype):
    """A QuantState holding bitsandbytes' own arrays."""
    state = B.QuantState(absmax=fx[f"{key}.absmax"], shape=shape, code=fx[f"{key}.code"],
                         blocksize=case["blocksize"], quant_type=case.get("quant_type"),
                         dtype=np.dtype(dtype))
    if f"{key}.offset" in fx:
        bs2 = 256 if case["kind"] == "4bit" else case["blocksize"]
        state.offset = fx[f"{key}.offset"].reshape(())
        state.state2 = B.QuantState(absmax=fx[f"{key}.nested_absmax"], shape=state.absmax.shape,
                                    code=fx[f"{key}.nested_code"], blocksize=bs2,
                                    dtype=np.dtype(np.float32))
    return state


def check_nested(fx, key, ours, plain_absmax, blocksize2):
    """Nested state: exact given bitsandbytes' offset; fully exact when the offsets agree."""
    ref_offset = fx[f"{key}.offset"].reshape(())
    assert ulps(ours.offset, ref_offset) <= 16, (float(ours.offset), float(ref_offset))
    assert_same(ours.state2.code, fx[f"{key}.nested_code"], "nested code")
    assert_same(fx[f"{key}.nested_code"], C.DYNAMIC_SIGNED, "bitsandbytes' dynamic map")
    q2, _, s2 = B.double_quantize(plain_absmax, blocksize=blocksize2, offset=ref_offset)
    assert_same(q2, fx[f"{key}.absmax"], "nested absmax codes (bitsandbytes' offset)")
    assert_same(s2.absmax, fx[f"{key}.nested_absmax"], "nested absmax (bitsandbytes' offset)")
    if ulps(ours.offset, ref_offset) == 0:
        assert_same(ours.absmax, fx[f"{key}.absmax"], "nested absmax codes")
        assert_same(ours.state2.absmax, fx[f"{key}.nested_absmax"], "nested absmax")


@cases("4bit")
def test_quantize_4bit_matches_bitsandbytes(case, fx):
    key, x = case["key"], fx[f"in.{case['input']}"]
    kw = dict(blocksize=case["blocksize"], quant_type=case["quant_type"])
    packed, state = B.quantize_4bit(x, compress_statistics=case["compress_statistics"], **kw)
    assert_same(packed, fx[f"{key}.packed"], "packed 4-bit bytes")
    assert_same(state.code, fx[f"{key}.code"], "code")
    _, plain = B.quantize_4bit(x, **kw)
    if case["compress_statistics"]:
        check_nested(fx, key, state, plain.absmax, 256)
    else:
        assert_same(state.absmax, fx[f"{key}.absmax"], "absmax")
    # dequantize bitsandbytes' own bytes and state
    deq = B.dequantize_4bit(fx[f"{key}.packed"], bnb_state_4bit(fx, key, case, x.shape, x.dtype))
    assert str(deq.dtype) == case["dequant_dtype"]
    if f"{key}.dequant" in fx:
        assert_same(deq, fx[f"{key}.dequant"], "dequantized")
    assert sha(deq) == case["dequant_sha256"], "dequantized values differ (SHA-256)"
    if f"{key}.qs_packed" in fx:                                       # serialization
        ref = json.loads(fx[f"{key}.qs_packed"].tobytes().decode("utf-8"))
        blob = state.as_dict(packed=True)[f"quant_state.bitsandbytes__{case['quant_type']}"]
        mine = json.loads(blob.tobytes().decode("utf-8"))
        assert list(mine) == list(ref)
        for k in ref:
            if k == "nested_offset":
                assert mine[k] == pytest.approx(ref[k], rel=1e-6)
            else:
                assert mine[k] == ref[k], k


@cases("8bit")
def test_quantize_blockwise_matches_bitsandbytes(case, fx):
    key, x = case["key"], fx[f"in.{case['input']}"]
    bs = case["blocksize"]
    q, state = B.quantize_blockwise(x, blocksize=bs, nested=case["nested"])
    assert_same(q, fx[f"{key}.codes"], "8-bit codes")
    assert_same(fx[f"{key}.code"], C.DYNAMIC_SIGNED, "bitsandbytes' dynamic map")
    _, plain = B.quantize_blockwise(x, blocksize=bs)
    if case["nested"]:
        check_nested(fx, key, state, plain.absmax, bs)
    else:
        assert_same(state.absmax, fx[f"{key}.absmax"], "absmax")
    deq = B.dequantize_blockwise(fx[f"{key}.codes"], bnb_state_4bit(fx, key, case, x.shape, x.dtype))
    if f"{key}.dequant" in fx:
        assert_same(deq, fx[f"{key}.dequant"], "dequantized")
    assert sha(deq) == case["dequant_sha256"], "dequantized values differ (SHA-256)"


@cases("int8")
def test_int8_vectorwise_quant_matches_bitsandbytes(case, fx):
    key = case["key"]
    x = fx[f"in.{case['input']}"].astype(np.float16)
    CA, SCA, cols = I.int8_vectorwise_quant(x, threshold=case["threshold"])
    assert_same(SCA, fx[f"{key}.SCA"], "row stats")
    if case["outlier_cols_none"]:
        assert cols is None
    else:
        ref_cols = fx.get(f"{key}.outlier_cols", np.zeros(0, np.int64))
        np.testing.assert_array_equal(cols, ref_cols)
    diff = CA.astype(np.int32) - fx[f"{key}.CA"].astype(np.int32)
    assert np.abs(diff).max() <= 1, "int8 codes differ by more than 1"
    assert np.count_nonzero(diff) <= CA.size / 500, f"{np.count_nonzero(diff)} codes differ by 1"


@cases("int8mm")
def test_int8_matmul_and_dequant_match_bitsandbytes(case, fx):
    CA, SCA = fx["i8.act.t0.CA"], fx["i8.act.t0.SCA"]
    CB, SCB = fx["i8.weight.t0.CA"], fx["i8.weight.t0.SCA"]
    Cmat = I.int8_linear_matmul(CA, CB)
    assert_same(Cmat, fx["i8mm.act.weight.C"], "int32 product")
    assert_same(I.int8_mm_dequant(Cmat, SCA, SCB), fx["i8mm.act.weight.out"], "int8_mm_dequant")
