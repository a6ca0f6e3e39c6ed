"""minipeft/kernels/cross_entropy.cu agrees with its NumPy twin, minipeft.functional.CrossEntropy."""
from __future__ import annotations

import numpy as np
import pytest

from minipeft import engine
from minipeft import functional as F

from ._twin import Counter, rel_err, run

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("N,V,smoothing,ignored", [
    (1, 2, 0.0, 0), (5, 259, 0.0, 0), (37, 1000, 0.1, 5), (64, 50257, 0.0, 3), (16, 50257, 0.2, 0),
])
def test_cross_entropy_kernel_matches_twin(N, V, smoothing, ignored, monkeypatch):
    import cupy

    from minipeft.kernels import cross_entropy as K

    fwd = Counter(monkeypatch, K, "cross_entropy_forward")
    bwd = Counter(monkeypatch, K, "cross_entropy_backward")
    rng = np.random.default_rng(N + V)
    logits = (rng.standard_normal((N, V)) * 4).astype(np.float32)
    t = rng.integers(0, V, N)
    t[:ignored] = -100
    f = lambda z: F.cross_entropy(z, t, ignore_index=-100, label_smoothing=smoothing)  # noqa: E731
    loss_ref, (g_ref,) = run(f, [logits], np)
    loss, (g,) = run(f, [logits], cupy)
    assert fwd.n == 1 and bwd.n == 1, "the fused kernels did not run"
    assert loss.shape == () and loss.dtype == np.float32
    assert abs(float(loss) - float(loss_ref)) <= 1e-5 * abs(float(loss_ref)) + 1e-7
    assert g.dtype == np.float32 and rel_err(g, g_ref) < 1e-5


def test_cross_entropy_all_ignored_is_nan_and_zero_grad():
    import cupy

    t = np.full(4, -100)
    z = np.zeros((4, 10), np.float32)
    for xp in (np, cupy):
        zt = engine.Tensor(xp.asarray(z), requires_grad=True)
        loss = F.cross_entropy(zt, t)
        assert np.isnan(loss.item())
        loss.backward()
        assert float(abs(zt.grad).max()) == 0.0


def test_cross_entropy_upstream_gradient_scales():
    import cupy

    rng = np.random.default_rng(3)
    z = rng.standard_normal((8, 33)).astype(np.float32)
    t = rng.integers(0, 33, 8)
    grads = []
    for xp in (np, cupy):
        zt = engine.Tensor(xp.asarray(z), requires_grad=True)
        (F.cross_entropy(zt, t) * 3.0).backward()
        grads.append(F.Tensor(zt.grad).numpy())
    assert rel_err(grads[1], grads[0]) < 1e-5
