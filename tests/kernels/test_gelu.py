"""minipeft/kernels/gelu.cu agrees with its NumPy twin, minipeft.functional.GELU."""
from __future__ import annotations

import numpy as np
import pytest

from minipeft import functional as F

from ._twin import Counter, rel_err, run

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("shape", [(1,), (7, 33), (4, 64, 3072), (3, 5, 257)])
def test_gelu_kernel_matches_twin(shape, monkeypatch):
    import cupy

    from minipeft.kernels import gelu as K

    fwd, bwd = Counter(monkeypatch, K, "gelu_forward"), Counter(monkeypatch, K, "gelu_backward")
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    x.reshape(-1)[:3] = [0.0, -20.0, 20.0][: x.size]
    g = rng.standard_normal(shape).astype(np.float32)
    y_ref, (gx_ref,) = run(F.gelu, [x], np, g)
    y, (gx,) = run(F.gelu, [x], cupy, g)
    assert fwd.n == 1 and bwd.n == 1, "the fused kernels did not run"
    assert y.dtype == gx.dtype == np.float32
    assert rel_err(y, y_ref) < 3e-6 and np.allclose(y, y_ref, rtol=1e-4, atol=1e-5)
    assert rel_err(gx, gx_ref) < 3e-6 and np.allclose(gx, gx_ref, rtol=1e-4, atol=1e-5)


def test_gelu_off_switch_and_float64_use_twin(monkeypatch):
    import cupy

    from minipeft.kernels import gelu as K

    fwd = Counter(monkeypatch, K, "gelu_forward")
    x = np.linspace(-4, 4, 101)
    run(F.gelu, [x], cupy, np.ones_like(x))                           # float64: the twin's code
    monkeypatch.setenv("MINIPEFT_KERNELS", "0")
    run(F.gelu, [x.astype(np.float32)], cupy, np.ones(101, np.float32))
    assert fwd.n == 0
