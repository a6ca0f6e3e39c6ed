"""16-bit attention under autocast (minipeft/kernels/amp_attention.py, gemm16.py).

CPU: the twin (16-bit operands emulated in float32) against the float32 reference attention,
forward within a derived rounding bound and gradients within stated tolerances, with the
causal, prefix (Tk > Tq) and key-padding cases; what it saves, and what the memory calculator
counts for it; the arguments ``batched_gemm`` hands cuBLAS, against a NumPy model of cuBLAS's
column-major contract. GPU: ``batched_gemm`` against float64 products of the same 16-bit operands, and
the tensor-core attention against the twin on the same inputs.
"""
from __future__ import annotations

import types

import numpy as np
import pytest

from minipeft import amp, engine, fast
from minipeft import functional as F
from minipeft.engine import Tensor
from minipeft.kernels import amp_attention
from minipeft.kernels.amp_attention import AmpAttention
from minipeft.kernels.gemm16 import batched_gemm
from minipeft.memory_activations import activation_bytes
from minipeft.ops.attention import Attention

from ._twin import Counter, rel_err

UNIT_ROUNDOFF = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}  # u: half the spacing at 1 (11 and 8 bits)

# (B, H, Tq, Tk, D, causal, masked): plain causal; a key/value prefix (prefix tuning, a cache);
# padding; padding over a prefix; no causal rule, one batch row with every key hidden (uniform)
CASES = [
    (2, 3, 6, 6, 8, True, False),
    (1, 2, 5, 9, 8, True, False),
    (2, 2, 7, 7, 16, True, True),
    (2, 3, 4, 10, 8, True, True),
    (3, 2, 5, 5, 4, False, True),
]


def _inputs(B, H, Tq, Tk, D, causal, masked, seed=0):
    rng = np.random.default_rng(seed + 7 * Tq + Tk)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((B, H, Tq, D), (B, H, Tk, D), (B, H, Tk, D)))
    g = rng.standard_normal((B, H, Tq, D)).astype(np.float32)
    km = None
    if masked:
        km = rng.random((B, Tk)) > 0.3
        km[:, -1] = True  # every causal row sees at least its own position
        if not causal:
            km[0, :] = False  # a row with no key at all comes out uniform, as the reference's
    return q, k, v, g, km


def _run(xp, q, k, v, g, km, causal, mode, needs=(True, True, True)):
    """Attention (under ``autocast(mode)``) forward and backward; NumPy results and the op that ran."""
    ts = [Tensor(xp.asarray(a), requires_grad=n) for a, n in zip((q, k, v), needs)]
    mask = None if km is None else xp.asarray(km)
    with amp.autocast(mode):
        y = F.scaled_dot_product_attention(*ts, causal=causal, key_mask=mask)
    fn = y._ctx.fn
    y.backward(xp.asarray(g))
    host = lambda a: None if a is None else (a.get() if hasattr(a, "get") else np.asarray(a))  # noqa: E731
    return host(y.data), [host(t.grad) for t in ts], fn


# ------------------------------------------------------------------- CPU: the twin


@pytest.mark.parametrize("mode", ["float16", "bfloat16"])
@pytest.mark.parametrize("B,H,Tq,Tk,D,causal,masked", CASES)
def test_twin_forward_is_float32_attention_within_the_rounding_bound(B, H, Tq, Tk, D, causal, masked, mode):
    """Bound, per output element i (first order in u is exact enough; the +1e-5 covers float32 sums):

    rounding q and k moves every score a_ij = scale q_i.k_j by at most
    delta_i = scale (2u + u^2 + 2 D 2^-24) max_j sum_d |q_id| |k_jd|, which moves each p_ij by a
    factor within exp(+-2 delta_i); rounding p and v adds a factor (1 +- u) each. So
    |out_i - out32_i| <= (exp(2 delta_i) (1 + u)^2 - 1 + 1e-5) sum_j p_ij |v_j|.
    """
    q, k, v, g, km = _inputs(B, H, Tq, Tk, D, causal, masked)
    u, scale = UNIT_ROUNDOFF[mode], 1.0 / np.sqrt(D)
    y32, _, fn32 = _run(np, q, k, v, g, km, causal, "float32")
    y16, _, fn16 = _run(np, q, k, v, g, km, causal, mode)
    assert fn32 is Attention and fn16 is AmpAttention
    p32 = amp_attention.masked_softmax(q @ k.swapaxes(-1, -2), scale, causal, km)  # (B, H, Tq, Tk)
    qk = np.abs(q).astype(np.float64) @ np.abs(k).astype(np.float64).swapaxes(-1, -2)  # (B, H, Tq, Tk)
    delta = scale * (2 * u + u * u + 2 * D * 2.0 ** -24) * qk.max(axis=-1, keepdims=True)  # (B, H, Tq, 1)
    bound = (np.exp(2 * delta) * (1 + u) ** 2 - 1 + 1e-5) * (p32 @ np.abs(v).astype(np.float64))  # (B, H, Tq, D)
    err = np.abs(y16.astype(np.float64) - y32)
    assert np.all(err <= bound), f"max err / bound = {np.max(err / bound):.3f}"
    assert not np.array_equal(y16, y32)  # it did run in 16 bits


@pytest.mark.parametrize("mode", ["float16", "bfloat16"])
def test_twin_rounds_what_it_saves_and_multiplies(mode):
    """q, k, v and p are held on the 16-bit grid, and the output is exactly their float32 product."""
    q, k, v, g, km = _inputs(2, 2, 5, 8, 8, True, True)
    r = lambda a: amp.round_to_compute(a, mode)  # noqa: E731
    ts = [Tensor(a, requires_grad=True) for a in (q, k, v)]
    with amp.autocast(mode):
        y = F.scaled_dot_product_attention(*ts, causal=True, key_mask=km)
    sq, sk, sv, sp = y._ctx.ctx.saved_tensors
    for saved, raw in ((sq, q), (sk, k), (sv, v)):
        np.testing.assert_array_equal(saved, r(raw))
    np.testing.assert_array_equal(sp, r(sp))  # p is on the grid ...
    p = amp_attention.masked_softmax(r(q) @ r(k).swapaxes(-1, -2), 1 / np.sqrt(8), True, km)
    np.testing.assert_array_equal(sp, r(p))  # ... and is the rounded softmax of the rounded scores
    np.testing.assert_allclose(y.data, sp @ sv, rtol=1e-6, atol=1e-7)
    assert y.dtype == np.float32


@pytest.mark.parametrize("mode", ["float16", "bfloat16"])
@pytest.mark.parametrize("B,H,Tq,Tk,D,causal,masked", CASES)
def test_twin_gradients_follow_float32_attention(B, H, Tq, Tk, D, causal, masked, mode):
    """Normwise relative error of dq, dk, dv below 4u (2e-3 for float16, 1.6e-2 for bfloat16):
    each gradient is a product of a rounded gradient (g or ds) and a rounded operand, after a
    softmax whose rounded scores and probabilities add about two more roundings."""
    q, k, v, g, km = _inputs(B, H, Tq, Tk, D, causal, masked, seed=1)
    tol = 4 * UNIT_ROUNDOFF[mode]
    y32, grads32, _ = _run(np, q, k, v, g, km, causal, "float32")
    y16, grads16, _ = _run(np, q, k, v, g, km, causal, mode)
    assert rel_err(y16, y32) < tol
    for name, got, ref in zip("qkv", grads16, grads32):
        assert got.dtype == np.float32
        assert rel_err(got, ref) < tol, (name, rel_err(got, ref))
        assert not np.array_equal(got, ref)


def test_twin_computes_only_the_gradients_asked_for():
    q, k, v, g, km = _inputs(2, 2, 4, 6, 8, True, True)
    _, full, _ = _run(np, q, k, v, g, km, True, "bfloat16")
    for needs in ((False, False, True), (True, False, False), (False, True, True)):
        _, part, _ = _run(np, q, k, v, g, km, True, "bfloat16", needs=needs)
        for n, got, ref in zip(needs, part, full):
            if n:
                np.testing.assert_array_equal(got, ref)  # the same arithmetic, whatever else is asked
            else:
                assert got is None


def test_registry_picks_16bit_attention_only_under_autocast(monkeypatch):
    q = np.zeros((1, 2, 3, 4), np.float32)
    args = (q, q, q, True, None, 0.5)
    assert fast.choose(Attention, *args) is Attention
    with amp.autocast("bfloat16"):
        assert fast.choose(Attention, *args) is AmpAttention
        assert fast.choose(Attention, q.astype(np.float64), q, q, True, None, 0.5) is Attention  # gradient checks
        assert fast.choose(Attention, q, q[:1, :1], q[:1, :1], True, None, 0.5) is Attention  # broadcast k, v
        monkeypatch.setenv("MINIPEFT_KERNELS", "0")  # a precision mode: the switch leaves it on
        assert fast.choose(Attention, *args) is AmpAttention
    with amp.autocast("float16", enabled=False):
        assert fast.choose(Attention, *args) is Attention
    assert not amp_attention.uses_tensor_cores(q)


def test_saved_bytes_are_what_the_memory_calculator_counts():
    """AmpAttention saves q, k, v and p: float32 values in the twin (4 bytes each), 16-bit arrays
    on the GPU (2 bytes each, checked below); the calculator's attention terms at 2 bytes per
    activation (StepSetup(compute_dtype='bfloat16')) are those elements at 2 bytes."""
    B, H, T, D = 2, 3, 5, 4
    C = H * D
    q, k, v, g, _ = _inputs(B, H, T, T, D, True, False)
    leaf = [Tensor(a, requires_grad=True) for a in (q, k, v)]
    qkv = [t * 1.0 for t in leaf]  # activations, as c_attn's output is (leaves are not counted)
    before = engine.saved_bytes()
    with amp.autocast("bfloat16"):
        y = F.scaled_dot_product_attention(*qkv, causal=True)
        attn_bytes = engine.saved_bytes() - before
    elements = 3 * B * H * T * D + B * H * T * T  # q, k, v and p
    assert attn_bytes == 4 * elements
    terms = activation_bytes(B, T, 1, C, H, 4 * C, 11, 2, trainable_linears=("attn.c_attn",))
    assert terms["h.0.attn: q, k, v"] + terms["h.0.attn: probs"] == 2 * elements
    del y


def test_batched_gemm_checks_its_operands():
    a16 = np.zeros((2, 3, 4), np.float16)
    with pytest.raises(TypeError, match="two float16 or two bfloat16"):
        batched_gemm(a16.astype(np.float32), a16.astype(np.float32))
    with pytest.raises(ValueError, match="same leading axes"):
        batched_gemm(a16, np.zeros((3, 4, 5), np.float16))
    with pytest.raises(ValueError, match="inner sizes differ"):
        batched_gemm(a16, a16)
    with pytest.raises(ValueError, match="C-contiguous"):
        batched_gemm(a16, np.zeros((2, 5, 4), np.float16).swapaxes(-1, -2))


class _DeviceArray(np.ndarray):
    """A NumPy array that shows a CuPy-style ``.data.ptr`` (its address), for the cuBLAS model below."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)


class _CublasModel:
    """cuBLAS's ``gemmStridedBatchedEx`` as its documentation states it, in NumPy, standing in for
    CuPy and for :func:`minipeft.kernels.cublas.gemm_strided_batched` (alpha 1, beta 0).

    Column-major: element (r, c) of a matrix with leading dimension ld sits at r + c * ld;
    op(A) is M x K, op(B) is K x N, C = op(A) op(B) is M x N; matrix i of a batch starts
    i * stride elements after the first. Buffers are found by address.
    """

    CODES = {0: np.float32, 2: np.float16}

    def __init__(self):
        self.buffers, self.calls = {}, 0

    def put(self, a):
        a = np.ascontiguousarray(a).view(_DeviceArray)
        self.buffers[a.ctypes.data] = a
        return a

    def empty(self, shape, dtype):
        return self.put(np.empty(shape, dtype))

    def _matrix(self, ptr, code, i, stride, rows, cols, ld):
        flat = self.buffers[ptr].reshape(-1)
        assert flat.dtype == np.dtype(self.CODES.get(code, "bfloat16")), (flat.dtype, code)
        r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        return i * stride + r + c * ld, flat

    def gemm_strided_batched(self, transa, transb, M, N, K, A, Atype, lda, strideA,
                             B, Btype, ldb, strideB, C, Ctype, ldc, strideC, batch, compute, algo):
        self.calls += 1
        assert compute == 68 and algo == -1  # CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT
        for i in range(batch):
            ia, fa = self._matrix(A, Atype, i, strideA, *((M, K) if transa == 0 else (K, M)), lda)
            ib, fb = self._matrix(B, Btype, i, strideB, *((K, N) if transb == 0 else (N, K)), ldb)
            ic, fc = self._matrix(C, Ctype, i, strideC, M, N, ldc)
            opa = fa[ia].astype(np.float64) if transa == 0 else fa[ia].astype(np.float64).T
            opb = fb[ib].astype(np.float64) if transb == 0 else fb[ib].astype(np.float64).T
            fc[ic] = opa @ opb


@pytest.mark.parametrize("mode", ["float16", "bfloat16"])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_batched_gemm_passes_cublas_the_row_major_product(trans_a, trans_b, mode, monkeypatch):
    """On the CPU, against a model of cuBLAS's column-major contract: the operand order, transpose
    flags, leading dimensions, strides, dtype codes and float32 alpha/beta batched_gemm passes."""
    from minipeft.kernels import gemm16

    model = _CublasModel()
    monkeypatch.setattr(gemm16, "cupy", lambda: model)
    monkeypatch.setattr(gemm16, "cublas", model)
    rng = np.random.default_rng(5)
    batch, m, k, n = (2, 3), 4, 5, 3
    a = rng.standard_normal(batch + ((k, m) if trans_a else (m, k))).astype(_dtype(mode))
    b = rng.standard_normal(batch + ((n, k) if trans_b else (k, n))).astype(_dtype(mode))
    c = batched_gemm(model.put(a), model.put(b), trans_a=trans_a, trans_b=trans_b)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    ref = (a64.swapaxes(-1, -2) if trans_a else a64) @ (b64.swapaxes(-1, -2) if trans_b else b64)
    assert model.calls == 1 and c.shape == batch + (m, n) and c.dtype == np.float32
    np.testing.assert_allclose(np.asarray(c), ref, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------- GPU: the tensor cores


def _dtype(mode):
    if mode == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.float16


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["float16", "bfloat16"])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("batch,m,k,n", [((3,), 5, 7, 9), ((2, 3), 17, 33, 1), ((1,), 64, 64, 64),
                                         ((2, 2), 1, 130, 31)])
def test_batched_gemm_is_the_float32_sum_of_16bit_products(batch, m, k, n, trans_a, trans_b, mode):
    """Against float64 products of the same 16-bit values: within float32 accumulation's bound
    k 2^-24 (|a| |b|) (plus one float32 rounding), for every transpose combination."""
    import cupy as cp

    rng = np.random.default_rng(m * k + n)
    a = rng.standard_normal(batch + ((k, m) if trans_a else (m, k))).astype(_dtype(mode))
    b = rng.standard_normal(batch + ((n, k) if trans_b else (k, n))).astype(_dtype(mode))
    c = batched_gemm(cp.asarray(a), cp.asarray(b), trans_a=trans_a, trans_b=trans_b)
    assert c.dtype == cp.float32 and c.shape == batch + (m, n) and c.flags.c_contiguous
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    a64, b64 = (a64.swapaxes(-1, -2) if trans_a else a64), (b64.swapaxes(-1, -2) if trans_b else b64)
    ref = a64 @ b64
    bound = (k + 1) * 2.0 ** -24 * (np.abs(a64) @ np.abs(b64)) + 1e-30
    err = np.abs(c.get() - ref)
    assert np.all(err <= bound), f"max err / bound = {np.max(err / bound):.3f}"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["float16", "bfloat16"])
@pytest.mark.parametrize("B,H,Tq,Tk,D,causal,masked", CASES + [(2, 12, 128, 128, 64, True, True)])
def test_tensor_core_attention_matches_the_twin(B, H, Tq, Tk, D, causal, masked, mode, monkeypatch):
    """The same rounded operands on both sides; only the order of float32 sums differs, which moves
    a 16-bit rounding of p or ds by one step in rare elements: normwise below u / 4 (against
    float32 attention the error is about u: the tensor-core path is the twin's arithmetic)."""
    import cupy as cp

    from minipeft.kernels import attention_softmax

    gemms = Counter(monkeypatch, amp_attention, "batched_gemm")
    soft = Counter(monkeypatch, attention_softmax, "attn_softmax_forward")
    q, k, v, g, km = _inputs(B, H, Tq, Tk, D, causal, masked, seed=2)
    y_twin, grads_twin, _ = _run(np, q, k, v, g, km, causal, mode)
    y_gpu, grads_gpu, fn = _run(cp, q, k, v, g, km, causal, mode)
    assert fn is AmpAttention and gemms.n == 2 + 4 and soft.n == 1  # it ran on the tensor cores
    tol = UNIT_ROUNDOFF[mode] / 4
    assert rel_err(y_gpu, y_twin) < tol, rel_err(y_gpu, y_twin)
    for name, got, ref in zip("qkv", grads_gpu, grads_twin):
        assert rel_err(got, ref) < tol, (name, rel_err(got, ref))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["float16", "bfloat16"])
def test_tensor_core_attention_saves_16bit_arrays(mode, monkeypatch):
    import cupy as cp

    B, H, T, D = 2, 3, 8, 16
    q, k, v, _, _ = _inputs(B, H, T, T, D, True, False)
    qkv = [Tensor(cp.asarray(a), requires_grad=True) * 1.0 for a in (q, k, v)]
    before = engine.saved_bytes()
    with amp.autocast(mode):
        y = F.scaled_dot_product_attention(*qkv, causal=True)
    assert engine.saved_bytes() - before == 2 * (3 * B * H * T * D + B * H * T * T)
    assert all(a.dtype == np.dtype(_dtype(mode)) for a in y._ctx.ctx.saved_tensors)
    monkeypatch.setenv("MINIPEFT_KERNELS", "0")  # kernels off: the twin's arithmetic, on CuPy
    with amp.autocast(mode):
        y_off = F.scaled_dot_product_attention(*qkv, causal=True)
    assert y_off._ctx.ctx.saved_tensors[0].dtype == np.float32
    with amp.autocast(mode):
        y_np = F.scaled_dot_product_attention(*(Tensor(a) for a in (q, k, v)), causal=True)
    assert rel_err(y_off.data.get(), y_np.data) < UNIT_ROUNDOFF[mode] / 4  # a rare p may round the other way
    del y


@pytest.mark.gpu
@pytest.mark.parametrize("rows,n", [(1, 1), (7, 3), (4096, 768), (513, 2304), (0, 5), (3, 0)])
def test_sum_rows_is_the_column_sum(rows, n):
    """backend.sum_rows on the GPU (one cuBLAS product ones @ a through kernels.cublas): the float32
    column sums within float32 accumulation's bound rows 2^-24 sum |a|, and a fresh (n,) array."""
    import cupy as cp

    from minipeft.backend import sum_rows

    a = np.random.default_rng(rows + n).standard_normal((rows, n)).astype(np.float32)
    got = sum_rows(cp.asarray(a))
    assert got.shape == (n,) and got.dtype == cp.float32
    ref = a.astype(np.float64).sum(axis=0)
    bound = (rows + 1) * 2.0 ** -24 * np.abs(a).astype(np.float64).sum(axis=0) + 1e-30
    assert np.all(np.abs(got.get() - ref) <= bound)


class _FakeCublasLib:
    """Records the cuBLAS calls a Handle makes (a stand-in for libcublas, on the CPU)."""

    def __init__(self):
        self.calls = []

    def cublasSetStream_v2(self, handle, stream):
        self.calls.append(("stream", stream.value))
        return 0

    def cublasSetWorkspace_v2(self, handle, ptr, nbytes):
        self.calls.append(("workspace", ptr.value, nbytes))
        return 0


def test_cublas_handle_sets_its_workspace_after_every_change_of_stream():
    """cublasSetStream resets a handle's workspace to cuBLAS's own pool (cuBLAS docs), which a CUDA
    graph cannot record allocations from: the Handle sets its workspace again after each change of
    stream, and calls neither while the stream stays the same."""
    from minipeft.kernels import cublas

    h = cublas.Handle.__new__(cublas.Handle)  # no GPU: the bookkeeping only
    h.lib, h.handle, h.stream = _FakeCublasLib(), None, None
    h.workspace = types.SimpleNamespace(ptr=4096)
    for s in (0, 0, 7, 7, 0):
        h.on_stream(s)
    ws = ("workspace", 4096, cublas.WORKSPACE_BYTES)
    assert h.lib.calls == [("stream", None), ws, ("stream", 7), ws, ("stream", None), ws]


def test_cublas_status_errors_name_the_call():
    from minipeft.kernels import cublas

    cublas._check(0, "cublasGemmStridedBatchedEx")
    with pytest.raises(RuntimeError, match="cublasGemmStridedBatchedEx failed: CUBLAS_STATUS_NOT_SUPPORTED"):
        cublas._check(15, "cublasGemmStridedBatchedEx")
