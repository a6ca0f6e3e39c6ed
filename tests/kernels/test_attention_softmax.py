"""minipeft/kernels/attention_softmax.cu agrees with its NumPy twin, minipeft.functional.Attention."""
from __future__ import annotations

import numpy as np
import pytest

from minipeft import functional as F

from ._twin import Counter, rel_err, run

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("B,H,Tq,Tk,D,causal,masked", [
    (2, 3, 5, 5, 8, True, False),
    (2, 4, 64, 64, 16, True, True),
    (1, 2, 7, 12, 8, True, False),        # prefix / cache: Tk > Tq
    (3, 2, 33, 33, 4, False, True),
    (2, 12, 128, 128, 64, True, False),
])
def test_attention_kernel_matches_twin(B, H, Tq, Tk, D, causal, masked, monkeypatch):
    import cupy

    from minipeft.kernels import attention_softmax as K

    fwd = Counter(monkeypatch, K, "attn_softmax_forward")
    bwd = Counter(monkeypatch, K, "attn_softmax_backward")
    rng = np.random.default_rng(Tq * Tk + D)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((B, H, Tq, D), (B, H, Tk, D), (B, H, Tk, D)))
    km = None
    if masked:
        km = rng.random((B, Tk)) > 0.3
        km[:, -1] = True
        if not causal:
            km[0, :] = False                                             # no key at all: uniform, as the twin
    g = rng.standard_normal((B, H, Tq, D)).astype(np.float32)

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, causal=causal, key_mask=km)

    y_ref, grads_ref = run(f, [q, k, v], np, g)
    y, grads = run(f, [q, k, v], cupy, g)
    assert fwd.n == 1 and bwd.n == 1, "the fused kernels did not run"
    assert rel_err(y, y_ref) < 1e-5
    for got, ref in zip(grads, grads_ref):
        assert rel_err(got, ref) < 1e-5, rel_err(got, ref)


def test_softmax_rows_sum_to_one_and_respect_the_mask():
    import cupy

    from minipeft.kernels.attention_softmax import attn_softmax_forward

    rng = np.random.default_rng(1)
    s = cupy.asarray(rng.standard_normal((2, 2, 6, 9)).astype(np.float32))
    p = attn_softmax_forward(s, 0.5, True, None).get()
    assert np.allclose(p.sum(-1), 1, atol=1e-6)
    i, j = np.indices((6, 9))
    assert np.all(p[..., j > (9 - 6) + i] == 0)
