"""The loss of 16-bit logits (minipeft/kernels/amp_cross_entropy.py, cross_entropy.cu's 16-bit entry points).

CPU: the twin against the float32 loss on the same (16-bit) logits, forward within float32
rounding and the gradient within one 16-bit rounding; the padded layout of its gradient; what it
saves, and what the memory calculator counts for it (plain, prompt-tuned rows, batch of one); the
registry; a GPT under autocast whose LM head writes logits on the 16-bit grid. GPU: the kernels
against the float32 loss on the same logits (float16 and bfloat16, ignored rows, label smoothing,
V = 50257 and small odd V, a padded view with NaN in its padding, an unaligned view), and a GPT step
under autocast against float32 and against the float32-logits path, with 16-bit logits and no pass
over the gradient before the LM head's backward GEMMs.

Tolerances, stated once: the forward loss is float32 arithmetic on the same values as the float32
loss, in another order: relative 1e-5. A gradient entry is the float32 loss's value up to ~1e-6
relative, rounded once to 16 bits: within one 16-bit step of it, ``ULP[dtype] * |ref|`` (2^-10 for
float16, 2^-7 for bfloat16), plus the float32 errors of the terms it is the difference of (which cancel
where p is near eps / V or 1 - eps: :func:`_assert_one_rounding`) and float16's subnormal spacing 2^-24.
"""
from __future__ import annotations

import numpy as np
import pytest

from minipeft import amp, engine, fast
from minipeft import functional as F
from minipeft.backend import xp_of
from minipeft.engine import Tensor
from minipeft.gpt import GPT, GPTConfig
from minipeft.kernels import amp_cross_entropy as ace
from minipeft.kernels.amp_cross_entropy import AmpCrossEntropy
from minipeft.memory_activations import activation_bytes
from minipeft.ops.loss import CrossEntropy

from ._twin import Counter, rel_err

ULP = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}  # one step of the 16-bit grid, relative to the value
TINY = {"float16": 2.0 ** -24, "bfloat16": 1e-37}  # float16's subnormal spacing

# (N, V, label smoothing, ignored rows)
CASES = [(1, 2, 0.0, 0), (5, 259, 0.0, 0), (37, 1000, 0.1, 5), (9, 67, 0.1, 2), (64, 50257, 0.0, 3),
         (16, 50257, 0.2, 0)]


def _logits(N, V, mode, ignored, seed=0):
    """float32 logits on the 16-bit grid (N, V) and targets (N,) with ``ignored`` rows of -100."""
    rng = np.random.default_rng(seed + N + V)
    z = amp.round_to_compute((rng.standard_normal((N, V)) * 4).astype(np.float32), mode)
    t = rng.integers(0, V, N)
    t[:ignored] = -100
    return z, t


def _loss_and_grad(z, t, smoothing, mode=None, scale=1.0):
    """F.cross_entropy of z (N, V) (under autocast(mode), if given), backward from ``scale``; loss, grad, op."""
    xp = xp_of(z)
    zt = Tensor(z, requires_grad=True)
    with amp.autocast(mode or "float32"):
        loss = F.cross_entropy(zt, t, label_smoothing=smoothing)
    fn = loss._ctx.fn
    loss.backward(xp.full((), scale, np.float32))
    return loss.data, zt.grad, fn


def _terms(z, t, smoothing, scale):
    """The size of the float32 terms each gradient entry is the sum of: (p + (1 - eps) onehot + eps / V) |g| / count."""
    z = np.asarray(z, np.float64)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    valid = t != -100
    onehot = np.zeros_like(p)
    onehot[np.arange(len(t)), np.where(valid, t, 0)] = 1 - smoothing
    return (p + onehot + smoothing / z.shape[1]) * valid[:, None] * abs(scale) / max(int(valid.sum()), 1)


def _assert_one_rounding(got, ref, mode, terms):
    """Within one 16-bit step of ``ref``, plus the float32 errors of the terms before they cancel (2^-19 of
    them: exp(x - lse) with lse off by an ulp of a log-sum-exp of about 10-20 is off by ~2^-20 relative)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    err = np.abs(got - ref)
    bound = ULP[mode] * np.abs(ref) + 2.0 ** -19 * terms + TINY[mode]
    assert np.all(err <= bound), f"{np.mean(err > bound):.2%} of the entries differ by more than one 16-bit step"


# ------------------------------------------------------------------- CPU: the twin


@pytest.mark.parametrize("mode", ["float16", "bfloat16"])
@pytest.mark.parametrize("N,V,smoothing,ignored", CASES[:4])
def test_twin_is_the_float32_loss_on_the_same_logits(N, V, smoothing, ignored, mode):
    z, t = _logits(N, V, mode, ignored)
    loss32, g32, fn32 = _loss_and_grad(z, t, smoothing, scale=3.0)
    loss16, g16, fn16 = _loss_and_grad(z, t, smoothing, mode, scale=3.0)
    assert fn32 is CrossEntropy and fn16 is AmpCrossEntropy
    assert loss16.dtype == np.float32 and abs(float(loss16) - float(loss32)) <= 1e-5 * abs(float(loss32))
    assert g16.dtype == np.float32
    np.testing.assert_array_equal(g16, amp.round_to_compute(g16, mode))  # on the 16-bit grid
    _assert_one_rounding(g16, g32, mode, _terms(z, t, smoothing, 3.0))
    assert np.all(g16[:ignored] == 0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_twin_on_real_16bit_arrays_writes_the_padded_layout(dtype):
    """What the twin does on CuPy with MINIPEFT_KERNELS=0, here on NumPy's float16 / ml_dtypes' bfloat16 arrays:
    float32 statistics, the gradient in the logits' dtype, (N, V) of a zero-padded (N, aligned(V)) array."""
    z, t = _logits(6, 45, dtype, 2)
    dt = amp.device_dtype(dtype)
    loss, lse, safe_t, valid, count = ace.cross_entropy16_forward(z.astype(dt), t, -100, 0.1)
    ref_loss, ref_lse = ace.cross_entropy16_forward(z, t, -100, 0.1)[:2]
    assert loss.dtype == lse.dtype == np.float32 and int(count) == 4
    np.testing.assert_array_equal(loss, ref_loss)  # the 16-bit values widen exactly
    np.testing.assert_array_equal(lse, ref_lse)
    g = ace.cross_entropy16_backward(np.float32(2.0), z.astype(dt), lse, safe_t, valid, count, 0.1, dtype)
    assert g.dtype == dt and g.shape == (6, 45)
    whole = amp.padded_parent(g, 48)
    assert whole is not None and whole.shape == (6, 48) and np.all(whole[:, 45:].astype(np.float32) == 0)
    ref = ace.cross_entropy16_backward(np.float32(2.0), z, lse, safe_t, valid, count, 0.1, dtype)
    np.testing.assert_array_equal(g.astype(np.float32), ref)


def test_all_ignored_is_nan_and_zero_grad():
    z = np.zeros((4, 10), np.float32)
    loss, g, fn = _loss_and_grad(z, np.full(4, -100), 0.0, "bfloat16")
    assert fn is AmpCrossEntropy and np.isnan(float(loss)) and np.all(g == 0)


def test_registry_picks_the_16bit_loss_for_16bit_logits(monkeypatch):
    z, t = np.zeros((3, 5), np.float32), np.zeros(3, np.int64)
    args = (z, t, -100, 0.0)
    assert fast.choose(CrossEntropy, *args) is CrossEntropy
    assert fast.choose(CrossEntropy, z.astype(np.float16), t, -100, 0.0) is CrossEntropy  # a float16 model on the CPU
    with amp.autocast("bfloat16"):
        assert fast.choose(CrossEntropy, *args) is AmpCrossEntropy  # the emulation's 16-bit logits
        assert fast.choose(CrossEntropy, z.astype(np.float64), t, -100, 0.0) is CrossEntropy  # gradient checks
        monkeypatch.setenv("MINIPEFT_KERNELS", "0")  # a precision mode: the switch leaves it on (its twin runs)
        assert fast.choose(CrossEntropy, *args) is AmpCrossEntropy
    with amp.autocast("float16", enabled=False):
        assert fast.choose(CrossEntropy, *args) is CrossEntropy


def test_padded_parent_finds_only_a_leading_column_view():
    whole = np.arange(6 * 16, dtype=np.float32).reshape(6, 16)
    view = whole[:, :13].reshape(2, 3, 13)  # what the loss's gradient looks like after the reshape's backward
    got = amp.padded_parent(view, 16)
    assert got is not None and got.shape == (2, 3, 16) and np.shares_memory(got, whole)
    np.testing.assert_array_equal(got[..., :13], view)
    assert amp.padded_parent(whole[:, 1:14], 16) is None  # not the leading columns
    assert amp.padded_parent(whole[:, :13], 24) is None  # another padding
    assert amp.padded_parent(whole[:3, :13], 16) is None  # not all of the rows
    assert amp.padded_parent(np.ascontiguousarray(whole[:, :13]), 16) is None  # a copy


def _cfg(V=67):
    return GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=16, vocab_size=V)


def _step(model, idx, t, mode, xp=np, **kw):
    """One forward + backward of ``model`` (under autocast(mode)); logits, loss, loss op, wte's gradient."""
    for p in model.parameters():
        p.grad = None
    with amp.autocast(mode):
        out = model(xp.asarray(idx), targets=xp.asarray(t), **kw)
    fn = out.loss._ctx.fn
    out.loss.backward()
    host = lambda a: a.get() if hasattr(a, "get") else np.asarray(a)  # noqa: E731
    return out.logits.data, float(out.loss.item()), fn, host(model.transformer.wte.weight.grad)


@pytest.mark.parametrize("mode", ["float16", "bfloat16"])
def test_gpt_lm_head_writes_logits_on_the_16bit_grid_under_autocast(mode):
    """The CPU emulation: float32 logits on the 16-bit grid, the (B, T, V) view of the head's (B, T, V8) product;
    the loss follows the float32 step (16-bit products everywhere: 16 u on the loss and gradients)."""
    model = GPT(_cfg(), seed=0)
    assert model.lm_head.output_16bit and not model.transformer.h[0].mlp.c_fc.output_16bit
    rng = np.random.default_rng(1)
    idx, t = rng.integers(0, 67, (2, 8)), rng.integers(0, 67, (2, 8))
    t[0, :3] = -100
    z32, l32, fn32, g32 = _step(model, idx, t, "float32")
    z16, l16, fn16, g16 = _step(model, idx, t, mode)
    assert fn32 is CrossEntropy and fn16 is AmpCrossEntropy
    assert z32.flags.c_contiguous and z16.dtype == np.float32 and z16.shape == (2, 8, 67)
    assert z16.strides == (8 * 72 * 4, 72 * 4, 4)  # rows of aligned(67) = 72 values: no copy to cut the padding
    np.testing.assert_array_equal(z16, amp.round_to_compute(z16, mode))
    u = ULP[mode] / 2
    assert abs(l16 - l32) <= 16 * u * abs(l32) and rel_err(g16, g32) < 16 * u
    assert not np.array_equal(g16, g32)


@pytest.mark.parametrize("B,n_prompt", [(2, 0), (2, 3), (1, 3)])
def test_saved_bytes_are_what_the_memory_calculator_counts(B, n_prompt):
    """Under autocast the loss keeps the logits (the head's padded product, or prompt tuning's copy of the token
    rows), lse, targets and valid: the calculator's logits_16bit terms, at 4 bytes in the emulation (2 on a GPU)."""
    V, T, C = 67, 6, 32
    model = GPT(_cfg(V), seed=0)
    rng = np.random.default_rng(2)
    idx, t = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
    kw = {}
    if n_prompt:
        kw["inputs_embeds_prefix"] = Tensor(rng.standard_normal((1, n_prompt, C)).astype(np.float32),
                                            requires_grad=True)
    with amp.autocast("bfloat16"):
        logits = model(idx, **kw).logits  # (B, P + T, V)
        before = engine.saved_bytes()
        loss = F.cross_entropy(logits[:, n_prompt:, :], t)  # as ForwardCall.loss
        saved = engine.saved_bytes() - before
    terms = activation_bytes(B, T, 2, C, 2, 4 * C, V, 4, n_prompt=n_prompt, embeddings_trainable=True,
                             logits_16bit=True)
    want = sum(v for k, v in terms.items() if k.startswith("cross_entropy"))
    assert "cross_entropy: probs" not in terms and saved == want
    float32_terms = activation_bytes(B, T, 2, C, 2, 4 * C, V, 4, n_prompt=n_prompt, embeddings_trainable=True)
    assert float32_terms["cross_entropy: probs"] == B * T * V * 4  # the float32 step: unchanged
    del loss


def test_calculator_counts_16bit_logits_for_an_autocast_step_only():
    """estimate_memory takes a 16-bit compute dtype with float32 weights for amp.autocast (16-bit logits kept);
    float32 steps, and float16 weights without autocast, keep probs as before."""
    from minipeft.memory import MethodConfig, StepSetup, estimate_memory

    cfg = GPTConfig.preset("gpt2")
    full = dict(trainable_linears=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), ln_trainable=True,
                embeddings_trainable=True)

    def predicted(**setup):
        return estimate_memory(cfg, MethodConfig("full"), StepSetup(batch_size=8, seq_len=512, **setup)).activations

    def terms(act_bytes, logits_16bit):
        return activation_bytes(8, 512, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.d_ff, cfg.vocab_size, act_bytes,
                                logits_16bit=logits_16bit, **full)

    t16 = terms(2, True)
    assert t16["cross_entropy: 16-bit logits"] == 8 * 512 * 50264 * 2  # aligned(50257) columns
    assert t16["cross_entropy: log-sum-exp"] == 8 * 512 * 4 and "cross_entropy: probs" not in t16
    assert predicted(compute_dtype="bfloat16") == sum(t16.values())
    assert predicted() == sum(terms(4, False).values())
    assert predicted(weight_dtype="float16") == sum(terms(2, False).values())


# ---------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["contiguous", "padded", "unaligned"])
@pytest.mark.parametrize("N,V,smoothing,ignored", CASES)
def test_kernels_match_the_float32_loss_on_the_same_logits(N, V, smoothing, ignored, mode, layout, monkeypatch):
    """``padded``: the (N, V) view of an (N, aligned(V)) array with NaN in the padding (the LM head's output, whose
    padding the kernels must not read); ``unaligned``: rows that do not start on 16 bytes (one value at a time)."""
    import cupy as cp

    from minipeft.kernels import cross_entropy as K

    fwd, bwd = Counter(monkeypatch, K, "cross_entropy16_forward"), Counter(monkeypatch, K, "cross_entropy16_backward")
    z, t = _logits(N, V, mode, ignored)
    dt = amp.device_dtype(mode)
    z16 = cp.asarray(z).astype(dt)
    if layout != "contiguous":
        off = 0 if layout == "padded" else 1
        big = cp.full((N, amp.aligned(V) + 8), np.nan, np.float32).astype(dt)
        big[:, off:off + V] = z16
        z16 = big[:, off:off + V]
    loss32, g32, _ = _loss_and_grad(cp.asarray(z), cp.asarray(t), smoothing, scale=3.0)  # the fused float32 loss
    zt = Tensor(z16, requires_grad=True)
    loss = F.cross_entropy(zt, cp.asarray(t), label_smoothing=smoothing)  # 16-bit logits: no autocast needed
    assert loss._ctx.fn is AmpCrossEntropy and loss.dtype == np.float32
    (g,) = engine.grad(loss, [zt], cp.full((), 3.0, np.float32))  # the gradient as written (.grad is a copy)
    assert fwd.n == 1 and bwd.n == 1, "the 16-bit kernels did not run"
    assert abs(float(loss.item()) - float(loss32)) <= 1e-5 * abs(float(loss32)) + 1e-7
    assert g.dtype == dt and g.shape == (N, V)
    whole = amp.padded_parent(g, amp.aligned(V))
    assert whole is not None and not bool(whole[:, V:].astype(cp.float32).any())  # zeros in the padding
    _assert_one_rounding(g.astype(cp.float32).get(), g32.get(), mode, _terms(z, t, smoothing, 3.0))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["float16", "bfloat16"])
def test_kernels_and_the_twin_on_cupy_agree(mode, monkeypatch):
    import cupy as cp

    z, t = _logits(33, 50257, mode, 4)
    z16, tc = cp.asarray(z).astype(amp.device_dtype(mode)), cp.asarray(t)
    res = []
    for kernels in ("1", "0"):
        monkeypatch.setenv("MINIPEFT_KERNELS", kernels)
        zt = Tensor(z16, requires_grad=True)
        loss = F.cross_entropy(zt, tc, label_smoothing=0.1)
        loss.backward()
        res.append((float(loss.item()), zt.grad.astype(cp.float32).get()))
    (lk, gk), (lt, gt) = res
    assert abs(lk - lt) <= 1e-5 * abs(lt)
    _assert_one_rounding(gk, gt, mode, _terms(z, t, 0.1, 1.0))


@pytest.mark.gpu
def test_all_ignored_is_nan_and_zero_grad_on_the_gpu():
    import cupy as cp

    zt = Tensor(cp.zeros((4, 10), amp.bfloat16_dtype()), requires_grad=True)
    loss = F.cross_entropy(zt, cp.full(4, -100))
    assert np.isnan(loss.item())
    loss.backward()
    assert not bool(zt.grad.astype(cp.float32).any())


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["float16", "bfloat16"])
@pytest.mark.parametrize("V", [67, 259])
def test_gpt_under_autocast_has_16bit_logits_and_follows_float32(mode, V, monkeypatch):
    """A GPT step on the GPU: 16-bit logits (float16 / bfloat16 arrays), the loss and wte's gradient within 4 u
    of the same autocast step with float32 logits (the path before) and within 16 u of the float32 step; the
    loss's gradient goes into the LM head's backward GEMMs as written (no 16-bit -> padded cast)."""
    import cupy as cp

    model = GPT(_cfg(V), seed=0).to("cuda")
    rng = np.random.default_rng(3)
    idx, t = rng.integers(0, V, (4, 16)), rng.integers(0, V, (4, 16))
    t[1, :5] = -100
    casts = []
    inner = amp.cast_16bit

    def counting(a, dtype, n=None, axis=-1):
        casts.append(a.dtype.itemsize)
        return inner(a, dtype, n, axis)

    z32, l32, fn32, g32 = _step(model, idx, t, "float32", cp)
    monkeypatch.setattr(amp, "cast_16bit", counting)
    z16, l16, fn16, g16 = _step(model, idx, t, mode, cp)
    assert 2 not in casts, "a 16-bit gradient was copied into the padded layout"
    monkeypatch.setattr(model.lm_head, "output_16bit", False)
    zf, lf, fnf, gf = _step(model, idx, t, mode, cp)
    assert z16.dtype == amp.device_dtype(mode) and z16.shape == (4, 16, V) and zf.dtype == np.float32
    assert fn16 is AmpCrossEntropy and fnf is not AmpCrossEntropy and fn32 is not AmpCrossEntropy
    u = ULP[mode] / 2
    assert abs(l16 - lf) <= 4 * u * abs(lf) and rel_err(g16, gf) < 4 * u
    assert abs(l16 - l32) <= 16 * u * abs(l32) and rel_err(g16, g32) < 16 * u


@pytest.mark.gpu
def test_decoding_under_autocast_reads_16bit_logits():
    import cupy as cp

    from minipeft.decoding import sequence_log_prob

    model = GPT(_cfg(), seed=0).to("cuda")
    idx = cp.asarray(np.random.default_rng(4).integers(0, 67, (2, 5)))
    with amp.autocast("bfloat16"):
        out = model.generate(idx, 4, greedy=True)
        lp = sequence_log_prob(model, idx[0].get(), [3, 4])
    assert out.shape == (2, 9) and np.isfinite(lp)
