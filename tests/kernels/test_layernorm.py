"""minipeft/kernels/layernorm.cu agrees with its NumPy twin, minipeft.functional.LayerNorm."""
from __future__ import annotations

import numpy as np
import pytest

from minipeft import engine
from minipeft import functional as F

from ._twin import Counter, rel_err, run

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 768), (4096, 64), (2, 3, 1000)])
def test_layernorm_kernel_matches_twin(shape, monkeypatch):
    import cupy

    from minipeft.kernels import layernorm as K

    calls = [Counter(monkeypatch, K, n) for n in ("layernorm_forward", "layernorm_backward_x",
                                                   "layernorm_backward_params")]
    rng = np.random.default_rng(shape[-1])
    C = shape[-1]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(C)).astype(np.float32)
    b = (0.1 * rng.standard_normal(C)).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    f = lambda x, w, b: F.layer_norm(x, w, b, 1e-5)  # noqa: E731
    y_ref, grads_ref = run(f, [x, w, b], np, g)
    engine.reset_peak_saved_bytes()
    y, grads = run(f, [x, w, b], cupy, g)
    assert [c.n for c in calls] == [1, 1, 1], "the fused kernels did not run"
    tol = 1e-5 if C > 1 else 1e-6
    assert rel_err(y, y_ref) < tol
    floor = 1e-6 * float(np.linalg.norm(g)) * 316.0  # rounding noise of rstd * g when a row is constant
    for got, ref in zip(grads, grads_ref):
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert rel_err(got, ref, floor) < 2e-5, (rel_err(got, ref), got.ravel()[:4], ref.ravel()[:4])


def test_layernorm_frozen_weight_saves_what_twin_saves():
    """LoRA freezes LayerNorm: only dx is needed; saved bytes equal the twin's."""
    import cupy

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 16, 32)).astype(np.float32)
    w, b = np.ones(32, np.float32), np.zeros(32, np.float32)
    saved = []
    for xp in (np, cupy):
        xt = engine.Tensor(xp.asarray(x), requires_grad=True)
        before = engine.saved_bytes()
        y = F.layer_norm(xt, engine.Tensor(xp.asarray(w)), engine.Tensor(xp.asarray(b)))
        saved.append(engine.saved_bytes() - before)
        y.sum().backward()
    assert saved[0] == saved[1] > 0
