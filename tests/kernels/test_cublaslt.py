"""A Linear layer's bias added by the GEMM itself: cuBLASLt's bias epilogue (minipeft/kernels/cublaslt.py,
gemm16.gemm_bias) as the fast path of :func:`minipeft.amp.matmul_16bit_bias`.

CPU: the reference (``matmul_16bit`` then ``+ bias``) and what AmpLinear, the fused LoRA op and the
4-bit layers compute with it (bit for bit what they computed before: product, then bias); the
arguments ``gemm_bias`` hands cuBLASLt, against a NumPy model of ``cublasLtMatmul``'s documented
column-major contract with ``CUBLASLT_EPILOGUE_BIAS`` (one bias value per row of D); the header
struct's size; where ``libcublasLt`` is looked for.

GPU: the epilogue GEMM against float64 products of the same 16-bit operands and against the old
path (GEMM, then ``+ b``); recorded in a CUDA graph and replayed to the eager call's bits;
AmpLinear (batch dims, padded rows) and a 4-bit layer forward and backward against float32.

Tolerance, stated once. A product of two float16 or two bfloat16 values is exact in float32, so
the GEMM's result is a k-long float32 sum plus the bias: cuBLASLt adds the bias to the float32
accumulator and rounds once, the old path rounds the sum and then the sum plus the bias. Either
is within (k + 1) 2^-24 (|x| @ |w|^T + |b|) of the exact value, in any summation order (tensor
cores included); so two of them, or one of them and float64, are within
``(k + 1) * 2**-23 * (|x| @ |w|^T + |b|)`` of each other (:func:`assert_within_sums`, the bound
``tests/test_bf16.py`` uses for the same GEMMs).
"""
from __future__ import annotations

import ctypes
import types

import numpy as np
import pytest

from minipeft import amp, fast
from minipeft import functional as F
from minipeft.engine import Tensor
from minipeft.kernels import cublaslt, gemm16

UNIT_ROUNDOFF = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}  # u of the 16-bit operands


def _dtype(mode):
    return amp.device_dtype(mode)


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def assert_within_sums(got, ref, k: int, abs_sum, what: str = ""):
    """``got`` within ``(k + 1) 2^-23 abs_sum`` of ``ref`` elementwise (the module docstring's bound)."""
    got, ref = np.asarray(_host(got), np.float64), np.asarray(_host(ref), np.float64)
    bound = (k + 1) * 2.0 ** -23 * np.asarray(abs_sum, np.float64) + 1e-30
    err = np.abs(got - ref)
    assert np.all(err <= bound), (f"{what}: {np.mean(err > bound):.2%} over the bound, "
                                  f"max err/bound {np.max(err / bound):.2f}")


# ------------------------------------------------------------------- CPU: the reference and its callers


@pytest.mark.parametrize("mode", ["float16", "bfloat16"])
def test_the_reference_is_the_product_then_the_bias_per_column(mode):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 12)).astype(_dtype(mode))
    b = rng.standard_normal((12, 7)).astype(_dtype(mode))
    bias = rng.standard_normal(7).astype(np.float32)
    y = amp.matmul_16bit_bias(a, b, bias)
    assert y.dtype == np.float32 and y.shape == (5, 7)
    np.testing.assert_array_equal(y, amp.matmul_16bit(a, b) + bias)
    exact = a.astype(np.float64) @ b.astype(np.float64) + bias
    assert_within_sums(y, exact, 12, np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)) + np.abs(bias))
    zero = amp.matmul_16bit_bias(np.zeros_like(a), b, bias)  # no product: every row is the bias
    np.testing.assert_array_equal(zero, np.broadcast_to(bias, (5, 7)))


def test_padded_bias_is_the_bias_or_a_zero_padded_copy():
    b = np.arange(1, 6, dtype=np.float32)
    assert amp.padded_bias(b, 5) is b
    p = amp.padded_bias(b, 8)
    assert p.dtype == np.float32 and p.shape == (8,)
    np.testing.assert_array_equal(p, [1, 2, 3, 4, 5, 0, 0, 0])
    b[0] = 9  # a copy: made again at each call, never stale
    assert p[0] == 1 and amp.padded_bias(b, 8)[0] == 9


@pytest.mark.parametrize("mode", ["float16", "bfloat16"])
def test_gemm_with_a_bias_is_bit_for_bit_the_cut_product_plus_the_bias_on_the_cpu(mode):
    """The emulation: padded operands (50 -> 56 columns), the bias of the padded columns, the cut."""
    rng = np.random.default_rng(1)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((3, 4, 40), (50, 40), (50,)))
    xc, wc = amp.to_compute(x, mode), amp.to_compute_padded(w, mode, amp.aligned(50), axis=0)  # (3,4,40), (56,40)
    y = amp.gemm_2d(xc, wc.T, cols=50, bias=amp.padded_bias(b, 56))
    assert y.shape == (3, 4, 50) and y.dtype == np.float32 and y.flags.c_contiguous
    np.testing.assert_array_equal(y, amp.gemm_2d(xc, wc.T, cols=50) + b)


@pytest.mark.parametrize("mode,out", [("bfloat16", 50), ("float16", 48)])
def test_amp_linear_with_a_bias_on_the_cpu_computes_what_it_did(mode, out):
    """Forward bit for bit the product then the bias; the bias's gradient the column sums of g."""
    rng = np.random.default_rng(2)
    x0, w0, b0 = (rng.standard_normal(s).astype(np.float32) for s in ((2, 6, 32), (out, 32), (out,)))
    g0 = rng.standard_normal((2, 6, out)).astype(np.float32)
    x, w, b = (Tensor(a, requires_grad=True) for a in (x0, w0, b0))
    with amp.autocast(mode):
        y = F.linear(x, w, b)
    assert y._ctx.fn is amp.AmpLinear
    y.backward(g0)
    xc, wc = amp.to_compute(x0, mode), amp.to_compute_padded(w0, mode, amp.aligned(out), axis=0)
    np.testing.assert_array_equal(y.data, amp.gemm_2d(xc, wc.T, cols=out) + b0)
    np.testing.assert_allclose(b.grad, g0.reshape(-1, out).sum(axis=0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["float16", "bfloat16"])
def test_linear4bit_with_a_bias_on_the_cpu_computes_what_it_did(mode):
    from minipeft.nn import Linear
    from minipeft.quant.modules import Linear4bit

    rng = np.random.default_rng(3)
    q = Linear4bit(Linear(64, 20, bias=True, rng=0), compute_dtype=mode)
    q.bias.data[...] = rng.standard_normal(20).astype(np.float32)
    x0 = rng.standard_normal((3, 64)).astype(np.float32)
    y = q(Tensor(x0))
    W = amp.round_to_compute(q.dequantize(), mode)
    np.testing.assert_array_equal(y.data, amp.gemm_2d(amp.to_compute(x0, mode), W.T) + q.bias.data)


def test_the_fast_path_is_registered_and_numpy_runs_the_reference():
    paths = fast.paths(amp.matmul_16bit_bias)
    assert [p.impl for p in paths] == [gemm16.matmul_16bit_bias_cuda] and paths[0].switch
    a, b, bias = np.zeros((2, 3), np.float16), np.zeros((3, 4), np.float16), np.zeros(4, np.float32)
    assert fast.choose(amp.matmul_16bit_bias, a, b, bias) is amp.matmul_16bit_bias
    assert not gemm16.matmul_16bit_bias_applies(a, b, bias)


# ------------------------------------------------------------------- CPU: the arguments cuBLASLt gets


def test_the_heuristic_result_struct_has_the_headers_layout():
    """cublasLt.h: cublasLtMatmulAlgo_t (8 x uint64), size_t, cublasStatus_t, float, int[4]."""
    assert ctypes.sizeof(cublaslt._Algo) == 64
    assert ctypes.sizeof(cublaslt._HeuristicResult) == 96
    assert cublaslt._HeuristicResult.workspaceSize.offset == 64 and cublaslt._HeuristicResult.state.offset == 72


def test_alignment_is_the_largest_power_of_two_up_to_256():
    assert [cublaslt.alignment(p) for p in (0, 1, 2, 6, 16, 48, 256, 512, 4096 + 8)] == [256, 1, 2, 2, 16, 16, 256,
                                                                                         256, 8]


def test_libcublaslt_is_found_where_libcublas_is(tmp_path):
    assert cublaslt.locate("/x/libcublasLt.so.12", "/y/libcublas.so.12") == "/x/libcublasLt.so.12"  # mapped
    (tmp_path / "libcublas.so.12.4.5").write_bytes(b"")
    (tmp_path / "libcublasLt.so.12").write_bytes(b"")
    assert cublaslt.locate(None, str(tmp_path / "libcublas.so.12.4.5")) == str(tmp_path / "libcublasLt.so.12")
    (tmp_path / "libcublasLt.so.12.4.5").write_bytes(b"")  # the same version suffix first
    assert cublaslt.locate(None, str(tmp_path / "libcublas.so.12.4.5")) == str(tmp_path / "libcublasLt.so.12.4.5")
    with pytest.raises(RuntimeError, match="libcublasLt was not found.*MINIPEFT_KERNELS=0"):
        cublaslt.locate(None, str(tmp_path / "nowhere" / "libcublas.so.12"))


class _DeviceArray(np.ndarray):
    """A NumPy array that shows a CuPy-style ``.data.ptr`` (its address), for the cuBLASLt model below."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)


class _CublasLtModel:
    """``cublasLtMatmul`` with ``CUBLASLT_EPILOGUE_BIAS`` as cuBLAS documents it, in NumPy, standing in
    for CuPy and for :func:`minipeft.kernels.cublaslt.matmul_bias` (alpha 1, beta 0).

    Column-major: element (r, c) of a matrix with leading dimension ld sits at r + c * ld; the
    stored A is m x k (k x m with transa = T), B is k x n (n x k), op(A) op(B) is m x n; the bias
    has one float32 value per row of D, "broadcasted to all columns". Buffers are found by
    address; like CuPy's pool, every buffer it hands out is 256-byte aligned.
    """

    CODES = {2: np.dtype(np.float16), 14: "bfloat16"}

    def __init__(self, no_algorithm: bool = False):
        self.buffers, self.calls, self.no_algorithm = {}, [], no_algorithm

    def put(self, a):
        a = np.asarray(a)
        raw = np.empty(a.nbytes + 256, np.uint8)
        off = -raw.ctypes.data % 256
        out = raw[off:off + a.nbytes].view(a.dtype).reshape(a.shape).view(_DeviceArray)
        out[...] = a
        self.buffers[out.ctypes.data] = out
        return out

    def empty(self, shape, dtype):
        return self.put(np.empty(shape, dtype))

    def array(self, a):
        return self.put(np.array(a))

    def _matrix(self, ptr, code, rows, cols, ld):
        flat = self.buffers[ptr].reshape(-1)
        want = self.CODES.get(code, np.dtype(np.float32) if code == 0 else None)
        assert flat.dtype == want or flat.dtype.name == want, (flat.dtype, code)
        r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        return r + c * ld, flat

    def matmul_bias(self, trans_a, trans_b, m, n, k, a_ptr, a_type, lda, b_ptr, b_type, ldb, bias_ptr, d_ptr, ldd):
        self.calls.append(dict(trans_a=trans_a, trans_b=trans_b, m=m, n=n, k=k, lda=lda, ldb=ldb, ldd=ldd))
        if self.no_algorithm:
            return False
        assert bias_ptr % 16 == 0, "the bias must be 16-byte aligned"
        ia, fa = self._matrix(a_ptr, a_type, *((m, k) if trans_a == 0 else (k, m)), lda)
        ib, fb = self._matrix(b_ptr, b_type, *((k, n) if trans_b == 0 else (n, k)), ldb)
        idx, fd = self._matrix(d_ptr, 0, m, n, ldd)
        bias = self.buffers[bias_ptr]
        assert bias.dtype == np.float32 and bias.shape == (m,)
        opa = fa[ia].astype(np.float64) if trans_a == 0 else fa[ia].astype(np.float64).T
        opb = fb[ib].astype(np.float64) if trans_b == 0 else fb[ib].astype(np.float64).T
        fd[idx] = opa @ opb + np.asarray(bias, np.float64)[:, None]
        return True


@pytest.mark.parametrize("mode", ["float16", "bfloat16"])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm_bias_passes_cublaslt_the_row_major_product_with_the_bias_per_column(trans_a, trans_b, mode,
                                                                                  monkeypatch):
    model = _CublasLtModel()
    monkeypatch.setattr(gemm16, "cupy", lambda: model)
    monkeypatch.setattr(gemm16, "cublaslt", model)
    rng = np.random.default_rng(5)
    m, k, n = 4, 6, 5
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(_dtype(mode))
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(_dtype(mode))
    bias = rng.standard_normal(n).astype(np.float32)
    c = gemm16.gemm_bias(model.put(a), model.put(b), model.put(bias), trans_a=trans_a, trans_b=trans_b)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    ref = (a64.T if trans_a else a64) @ (b64.T if trans_b else b64) + bias
    assert len(model.calls) == 1 and c.shape == (m, n) and c.dtype == np.float32 and c.flags.c_contiguous
    np.testing.assert_allclose(np.asarray(c), ref, rtol=1e-6, atol=1e-6)
    # cuBLASLt's m is our n (the output features: D's rows, the bias's length), its n our m
    assert model.calls[0]["m"] == n and model.calls[0]["n"] == m and model.calls[0]["ldd"] == n


def test_gemm_bias_copies_an_unaligned_bias_and_falls_back_without_an_algorithm(monkeypatch):
    model = _CublasLtModel()
    monkeypatch.setattr(gemm16, "cupy", lambda: model)
    monkeypatch.setattr(gemm16, "cublaslt", model)
    rng = np.random.default_rng(6)
    x = model.put(rng.standard_normal((3, 8)).astype(np.float16))
    w = model.put(rng.standard_normal((5, 8)).astype(np.float16))
    big = model.put(rng.standard_normal(6).astype(np.float32))
    bias = big[1:]  # a view 4 bytes into its buffer
    assert bias.data.ptr % 16 == 4
    y = gemm16.matmul_16bit_bias_cuda(x, w.T, bias)
    np.testing.assert_allclose(np.asarray(y), x.astype(np.float64) @ w.astype(np.float64).T + bias, rtol=1e-6)
    model.no_algorithm = True  # the heuristic has nothing: the product, then the bias
    assert gemm16.gemm_bias(x, w, bias, trans_b=True) is None
    monkeypatch.setattr(gemm16, "batched_gemm", lambda a, b, trans_a, trans_b, out_dtype:
                        np.asarray(a, np.float32) @ np.asarray(b, np.float32).T)
    y = gemm16.matmul_16bit_bias_cuda(x, w.T, bias)  # float32 product, then + bias: two roundings
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    assert_within_sums(y, x64 @ w64.T + bias, 8, np.abs(x64) @ np.abs(w64).T + np.abs(bias))


def test_gemm_bias_checks_its_operands():
    a16 = np.zeros((3, 4), np.float16)
    with pytest.raises(TypeError, match="two float16 or two bfloat16"):
        gemm16.gemm_bias(a16.astype(np.float32), a16.astype(np.float32), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="2-D C-contiguous"):
        gemm16.gemm_bias(a16, a16.T, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="inner sizes differ"):
        gemm16.gemm_bias(a16, a16, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match=r"float32 bias of shape \(3,\)"):
        gemm16.gemm_bias(a16, a16, np.zeros(4, np.float32), trans_b=True)
    with pytest.raises(ValueError, match="float32 bias"):
        gemm16.gemm_bias(a16, a16, np.zeros(3, np.float16), trans_b=True)


# ------------------------------------------------------------------- GPU: the epilogue


class _Ran:
    """Record what each :func:`cublaslt.matmul_bias` call returned (True: the epilogue GEMM ran)."""

    def __init__(self, monkeypatch):
        self.results = []
        inner = cublaslt.matmul_bias

        def wrapped(*args):
            self.results.append(inner(*args))
            return self.results[-1]

        monkeypatch.setattr(cublaslt, "matmul_bias", wrapped)


def _operands(cp, mode, M, K, out, seed):
    """x (M, K), W zero-padded to (out8, K), both 16-bit on the GPU; b (out,) and its padded (out8,) copy."""
    rng = np.random.default_rng(seed)
    x0, w0, b0 = (rng.standard_normal(s).astype(np.float32) for s in ((M, K), (out, K), (out,)))
    x = amp.to_compute(cp.asarray(x0), mode)
    w = amp.to_compute_padded(cp.asarray(w0), mode, amp.aligned(out), axis=0)
    b = cp.asarray(b0)
    return x, w, b, amp.padded_bias(b, amp.aligned(out))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["float16", "bfloat16"])
@pytest.mark.parametrize("M,K,out,epilogue", [(64, 128, 256, True), (37, 96, 50, True), (33, 768, 2304 + 3, True),
                                              (5, 100, 13, False)])
def test_bias_gemm_matches_float64_and_the_product_then_the_bias(cp, mode, M, K, out, epilogue, monkeypatch):
    """``epilogue``: the case is aligned for the tensor cores and must run in cuBLASLt (K = 100 may
    not: its rows are 8-byte aligned; then the fallback's numbers are checked the same way)."""
    ran = _Ran(monkeypatch)
    x, w, b, bp = _operands(cp, mode, M, K, out, seed=M + K)
    assert gemm16.matmul_16bit_bias_applies(x, w.T, bp)
    y = gemm16.matmul_16bit_bias_cuda(x, w.T, bp)[:, :out]  # (M, out) of the padded (M, out8)
    assert ran.results == [True] or not epilogue, ran.results
    x64, w64, b64 = (_host(a.astype(cp.float32)).astype(np.float64) for a in (x, w[:out], b))
    abs_sum = np.abs(x64) @ np.abs(w64).T + np.abs(b64)
    assert_within_sums(y, x64 @ w64.T + b64, K, abs_sum, "against float64")
    old = amp.matmul_16bit(x, w.T)[:, :out] + b  # the old path: one GEMM, then + b
    assert_within_sums(y, old, K, abs_sum, "against the product then the bias")
    f32 = x.astype(cp.float32) @ w[:out].astype(cp.float32).T + b  # CuPy float32 of the same 16-bit values
    assert_within_sums(y, f32, K, abs_sum, "against CuPy float32")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["float16", "bfloat16"])
def test_gemm_2d_with_batch_dims_is_one_epilogue_gemm(cp, mode, monkeypatch):
    ran = _Ran(monkeypatch)
    x, w, b, bp = _operands(cp, mode, 4 * 9, 64, 50, seed=11)
    x3 = x.reshape(4, 9, 64)
    y = amp.gemm_2d(x3, w.T, cols=50, bias=bp)
    assert ran.results == [True] and y.shape == (4, 9, 50) and y.dtype == cp.float32 and y.flags.c_contiguous
    x64, w64, b64 = (_host(a.astype(cp.float32)).astype(np.float64) for a in (x3, w[:50], b))
    assert_within_sums(y, x64 @ w64.T + b64, 64, np.abs(x64) @ np.abs(w64).T + np.abs(b64))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["float16", "bfloat16"])
def test_bias_gemm_is_recorded_in_a_cuda_graph_and_replays_the_eager_bits(cp, mode):
    x, w, b, bp = _operands(cp, mode, 48, 256, 200, seed=13)
    eager = gemm16.gemm_bias(x, w, bp, trans_b=True)  # the plan (descriptors, heuristic) is made here
    assert eager is not None
    cp.cuda.Device().synchronize()  # the operands and the eager result are written (the capture stream does not wait)
    plans = cublaslt.handle(cp.cuda.runtime.getDevice()).plans
    n_plans = len(plans)
    stream = cp.cuda.Stream(non_blocking=True)  # capture needs a stream other than the legacy one
    with stream:
        stream.begin_capture()
        try:
            y = gemm16.gemm_bias(x, w, bp, trans_b=True)
        except BaseException:
            try:
                stream.end_capture()
            except Exception:  # the capture is invalid after the error
                pass
            raise
        graph = stream.end_capture()
    assert len(plans) == n_plans  # the recorded call made no plan: it only called cublasLtMatmul
    graph.launch(stream)
    stream.synchronize()
    assert bool((y.view(cp.uint32) == eager.view(cp.uint32)).all()), "a replay differs from the eager call"
    # a replay reads the operands' memory again: new values in place, the eager result of the new values
    rng = np.random.default_rng(14)
    x[...] = amp.to_compute(cp.asarray(rng.standard_normal(x.shape).astype(np.float32)), mode)
    bp += 1
    cp.cuda.Device().synchronize()
    graph.launch(stream)
    stream.synchronize()
    again = gemm16.gemm_bias(x, w, bp, trans_b=True)
    assert bool((y.view(cp.uint32) == again.view(cp.uint32)).all())
    assert not bool((y == eager).all())


@pytest.mark.gpu
@pytest.mark.parametrize("mode,out", [("bfloat16", 50), ("float16", 50), ("bfloat16", 2304 + 3)])
def test_amp_linear_with_a_bias_forward_and_backward_follow_float32(cp, mode, out, monkeypatch):
    """AmpLinear on the GPU (batch dims, W padded to out8 rows) against float32 F.linear on the CPU.

    Rounding x, W and g to 16 bits moves each product by at most 2u + u^2 of |x||w| (u the 16-bit
    unit roundoff), and each side's float32 sums add the module docstring's bound (on products up
    to (1 + u)^2 |x||w|), so per element
    |y - y32| <= (2u + u^2) |x| @ |w|^T + (k + 1) 2^-23 (1 + u)^2 (|x| @ |w|^T + |b|), and the same
    for the gradients with their own sums (dL/dx sums over the padded out8 columns); dL/db is
    float32 column sums of float32 g on both sides.
    """
    ran = _Ran(monkeypatch)
    rng = np.random.default_rng(15)
    B, T, K = 3, 7, 96
    x0, w0, b0 = (rng.standard_normal(s).astype(np.float32) for s in ((B, T, K), (out, K), (out,)))
    g0 = rng.standard_normal((B, T, out)).astype(np.float32)
    res = {}
    for xp in (np, cp):
        x, w, b = (Tensor(xp.asarray(a), requires_grad=True) for a in (x0, w0, b0))
        if xp is cp:
            with amp.autocast(mode):
                y = F.linear(x, w, b)
            assert y._ctx.fn is amp.AmpLinear
        else:
            y = F.linear(x, w, b)  # the float32 reference
        y.backward(xp.asarray(g0))
        res[xp.__name__] = [np.asarray(_host(t), np.float64) for t in (y.data, x.grad, w.grad, b.grad)]
    assert ran.results == [True]  # the forward's bias came out of the GEMM's epilogue
    (y, gx, gw, gb), (y32, gx32, gw32, gb32) = res["cupy"], res["numpy"]
    u = UNIT_ROUNDOFF[mode]
    ax, aw, ag = np.abs(x0.astype(np.float64)), np.abs(w0.astype(np.float64)), np.abs(g0.astype(np.float64))
    M = B * T

    def check(got, ref, abs_prod, k, extra, what):
        bound = (2 * u + u * u) * abs_prod + (k + 1) * 2.0 ** -23 * (1 + u) ** 2 * (abs_prod + extra) + 1e-30
        err = np.abs(got - ref)
        assert np.all(err <= bound), f"{what}: max err/bound {np.max(err / bound):.2f}"

    check(y, y32, ax @ aw.T, K, np.abs(b0), "y")
    check(gx, gx32, ag @ aw, amp.aligned(out), 0, "dL/dx")
    check(gw, gw32, ag.reshape(M, out).T @ ax.reshape(M, K), M, 0, "dL/dW")
    assert np.all(np.abs(gb - gb32) <= (M + 1) * 2.0 ** -23 * ag.reshape(M, out).sum(axis=0) + 1e-30), "dL/db"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["float16", "bfloat16"])
def test_linear4bit_with_a_bias_on_the_gpu_matches_the_cpu_emulation(cp, mode):
    """QLoRA's frozen layer with a bias (out = 50, not padded there): the same 16-bit operands on both
    sides, so only the sums' order (and the bias's one rounding) differ."""
    from minipeft.nn import Linear
    from minipeft.quant.modules import Linear4bit

    rng = np.random.default_rng(16)
    b0 = rng.standard_normal(50).astype(np.float32)
    layers = {}
    for dev in ("cpu", "cuda"):
        q = Linear4bit(Linear(128, 50, bias=True, rng=0), compute_dtype=mode)
        q.bias.data[...] = b0
        layers[dev] = q.to(dev) if dev == "cuda" else q
    x0 = rng.standard_normal((2, 5, 128)).astype(np.float32)
    y = {dev: _host(q(Tensor(x0).to(dev)).data) for dev, q in layers.items()}
    W = np.abs(amp.round_to_compute(layers["cpu"].dequantize(), mode).astype(np.float64))
    xr = np.abs(amp.round_to_compute(x0, mode).astype(np.float64))
    assert_within_sums(y["cuda"], y["cpu"], 128, xr @ W.T + np.abs(b0))
