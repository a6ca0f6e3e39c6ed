"""The dequantize kernel's compile-time variants are checked on the host (no GPU needed).

``minipeft.kernels.quant4bit.dequantize_variant`` turns a dict of settings into the sorted pairs
that key a compile: the swept kernel (CHUNK, UNROLL, STREAMING, INTERLEAVE; WIDE=1: the wide shape), and the
staged one (STAGED=1: TILE, STAGES, PREFETCH, AHEAD). A setting of the other kernel body is refused rather than silently compiled twice,
and ``benchmarks/dequant_4bit.py``'s tokens name each variant once.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from minipeft.kernels.quant4bit import DEFAULT_VARIANT, dequantize_variant

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "dequant_4bit.py"


def bench():
    spec = importlib.util.spec_from_file_location("dequant_4bit_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_default_variant_per_device_output_dtype_and_nesting(monkeypatch):
    """sm_90+: HOPPER_VARIANT, with HOPPER_TUNED's settings for (output dtype, double quantization); older: the .cu's."""
    import numpy as np

    from minipeft.kernels import quant4bit as q

    monkeypatch.setattr(q, "compute_capability", lambda device_id: 90)
    assert q.default_variant(0) == q.HOPPER_VARIANT
    assert q.default_variant(0, "bfloat16", True) == q.HOPPER_VARIANT
    assert q.default_variant(0, "float16", False) == q.HOPPER_VARIANT
    tuned = q.default_variant(0, "float16", True)
    assert tuned == {**q.HOPPER_VARIANT, "WIDE_EARLY": 2} and tuned["PDL"] == 1
    assert q.default_variant(0, np.float16, True) == tuned == q.default_variant(0, np.dtype("float16"), True)
    assert dict(q.dequantize_variant(tuned)) == tuned                  # a valid variant as it stands
    q.default_variant(0, "float16", True)["PDL"] = 0                   # a copy: HOPPER_VARIANT is not changed
    assert q.HOPPER_VARIANT["PDL"] == 1 and q.HOPPER_TUNED[("float16", True)] == {"WIDE_EARLY": 2}
    monkeypatch.setattr(q, "compute_capability", lambda device_id: 80)
    assert q.default_variant(0, "float16", True) == DEFAULT_VARIANT


def test_default_variant_and_missing_settings():
    assert dict(dequantize_variant(None)) == DEFAULT_VARIANT
    staged = dict(dequantize_variant(dict(STAGED=1)))
    assert staged == {**DEFAULT_VARIANT, "STAGED": 1}
    # the other body's settings are normalized to the .cu's defaults: one compile per distinct kernel
    assert dequantize_variant(dict(STAGED=1, STREAMING=1)) == dequantize_variant(
        dict(STAGED=1, STREAMING=1, UNROLL=DEFAULT_VARIANT["UNROLL"]))
    v = dequantize_variant(dict(STAGED=1, TILE=8192, STAGES=4, PREFETCH=3))
    assert dequantize_variant(v) is v                                  # a checked tuple is taken as is
    # WIDE=1 implies its shape: 16-byte chunks dealt out in turn, one group per warp and step unless given
    assert dict(dequantize_variant(dict(WIDE=1))) == {**DEFAULT_VARIANT, "WIDE": 1, "CHUNK": 16, "UNROLL": 1,
                                                      "INTERLEAVE": 1}
    assert dict(dequantize_variant(dict(WIDE=1, UNROLL=4, WIDE_BLOCKS=4)))["UNROLL"] == 4


@pytest.mark.parametrize("bad, match", [
    (dict(STAGED=1, CHUNK=16), "CHUNK=4"),
    (dict(STAGED=1, TILE=16384, STAGES=3), "STAGES"),
    (dict(STAGED=1, UNROLL=8), "UNROLL"),
    (dict(STAGED=0, TILE=8192), "TILE"),
    (dict(STAGED=0, PREFETCH=2), "PREFETCH"),
    (dict(STAGED=1, PREFETCH=5), "PREFETCH=5"),
    (dict(STAGED=0, AHEAD=1), "AHEAD"),
    (dict(STAGED=1, AHEAD=2), "AHEAD=2"),
    (dict(STAGED=0, INTERLEAVE=2), "INTERLEAVE=2"),
    (dict(STAGED=1, INTERLEAVE=2), "INTERLEAVE=2"),
    (dict(STAGED=1, TILE=4096), "TILE=4096"),
    (dict(STAGED=2), "STAGED=2"),
    (dict(STAGES=True), "STAGES"),
    (dict(WIDE=1, CHUNK=4), "CHUNK=16"),
    (dict(WIDE=1, INTERLEAVE=0), "INTERLEAVE=1"),
    (dict(WIDE=1, STREAMING=1), "STREAMING=0"),
    (dict(WIDE=1, STAGED=1), "WIDE"),
    (dict(WIDE_BLOCKS=6), "WIDE_BLOCKS applies only"),
    (dict(WIDE_EARLY=1), "WIDE_EARLY applies only"),
    (dict(WIDE=1, WIDE_EARLY=3), "WIDE_EARLY=3"),
    (dict(PDL=1), "PDL applies only"),
    (dict(WIDE=1, PDL=3), "PDL=3"),
    (dict(WIDE=1, WIDE_BLOCKS=5), "WIDE_BLOCKS=5"),
])
def test_bad_variants_name_the_setting(bad, match):
    with pytest.raises(ValueError, match=match):
        dequantize_variant(bad)


def test_benchmark_tokens_round_trip():
    b = bench()
    variants = b.parse_variants(b.DEFAULT_SWEEP + ",b8k4p3s1,c16u2s1,b8k3p0s0a1i1,c4u2s0i1,b16k2p2s1a1,b16k2p0s0a0i0")
    names = [b.variant_name(v) for v in variants]
    assert names == b.DEFAULT_SWEEP.split(",") + ["b8k4p3s1", "c16u2s1", "b8k3p0s0a1i1", "c4u2s0i1", "b16k2p2s1a1",
                                                  "b16k2p0s0"]
    assert dict(variants[-2])["AHEAD"] == 1 and b.parse_variants("b8k3p1s0a0") == b.parse_variants("b8k3p1s0")
    assert dict(variants[names.index("b8k3p0s0a1i1")]) == {**DEFAULT_VARIANT, "STAGED": 1, "TILE": 8192, "STAGES": 3,
                                                           "AHEAD": 1, "INTERLEAVE": 1}
    assert b.parse_variants("b16k2p0s0a0i0") == b.parse_variants("b16k2p0s0")   # i0 is the default
    assert dict(variants[names.index("c4u2s0i1")]) == {**DEFAULT_VARIANT, "UNROLL": 2, "INTERLEAVE": 1}
    assert dict(b.parse_variants("w2b6")[0]) == {**DEFAULT_VARIANT, "WIDE": 1, "CHUNK": 16, "UNROLL": 2,
                                                 "INTERLEAVE": 1, "WIDE_BLOCKS": 6}
    assert dict(b.parse_variants("w1b4e1")[0])["WIDE_EARLY"] == 1 and b.parse_variants("w1b4e0") == b.parse_variants("w1b4")
    assert [b.variant_name(v) for v in b.parse_variants("w1b4e1,w2b6e0")] == ["w1b4e1", "w2b6"]
    assert [b.variant_name(v) for v in b.parse_variants("w1b6e2p1,w1b6p2,w1b6p0")] == ["w1b6e2p1", "w1b6p2", "w1b6"]
    assert dict(b.parse_variants("w1b6e2p1")[0])["PDL"] == 1
    assert dict(variants[names.index("b8k4p3s1")]) == {**DEFAULT_VARIANT, "STAGED": 1, "TILE": 8192, "STAGES": 4,
                                                       "PREFETCH": 3, "STREAMING": 1}
    for bad in ("b16k3p2s0", "b4k2p2s0", "b16k2s0", "x4u4s0", "w1b5", "w1"):
        with pytest.raises(ValueError):
            b.parse_variants(bad)


def test_benchmark_result_file(tmp_path):
    """The dequantize benchmarks' JSON: written where asked, nothing written without a path."""
    import json
    b = bench()
    result = {"device_name": "x", "rows": [{"frac_copy": 0.85}]}
    assert b.write_result(None, result) is result
    path = tmp_path / "out.json"
    assert b.write_result(str(path), result) is result
    assert json.loads(path.read_text(encoding="utf-8")) == result
    newer = {**result, "rows": []}
    b.write_result(str(path), newer)                                   # an existing file is replaced whole
    assert json.loads(path.read_text(encoding="utf-8")) == newer


class _FakeEvent:
    """A CUDA event of the fake torch below: records the host clock; elapsed_time in milliseconds."""

    def __init__(self, enable_timing=True):
        self.t = None

    def record(self):
        import time
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


class _FakeTorch:
    class cuda:
        Event = _FakeEvent

        @staticmethod
        def synchronize():
            pass


def test_time_alternating_gc_off_keeps_the_collector_off_while_timing():
    """--gc-off: the collector is off during every timed call and on again afterwards (also after an
    error); without it the collector stays as it was."""
    import gc
    b = bench()
    seen = []
    fns = {"a": lambda: seen.append(("a", gc.isenabled())), "b": lambda: seen.append(("b", gc.isenabled()))}
    assert gc.isenabled()
    host = {}
    t = b.time_alternating(fns, _FakeTorch, warmup=0, reps=3, inner=2, host=host, gc_off=True)
    assert set(t) == {"a", "b"} == set(host) and all(q1 <= med <= q3 for q1, med, q3 in t.values())
    assert len(seen) == 2 * 3 * (2 + 1) and not any(on for _, on in seen)   # primed call + inner calls, collector off
    assert gc.isenabled()
    seen.clear()
    b.time_alternating(fns, _FakeTorch, warmup=0, reps=2, inner=1)
    assert all(on for _, on in seen)

    def boom():
        raise RuntimeError("a failing call")
    with pytest.raises(RuntimeError, match="failing"):
        b.time_alternating({"x": boom}, _FakeTorch, warmup=0, reps=1, inner=1, gc_off=True)
    assert gc.isenabled()


def test_bytes_read_counts_codes_and_absmax():
    """The bytes a dequantize reads, as the benchmarks count them: codes, then float32 absmax per block,
    or nested one byte per block, a float32 per 256 blocks, the 256-entry code and the offset."""
    b = bench()
    n = 4096 * 11008                                                   # 704,512 blocks of 64
    assert b.bytes_read(n, 64, False) == n // 2 + 4 * (n // 64)
    assert b.bytes_read(n, 64, True) == n // 2 + n // 64 + 4 * 2752 + 4 * 256 + 4
    assert b.bytes_read(65, 64, False) == 33 + 4 * 2                  # an odd length: a half byte and a second block
