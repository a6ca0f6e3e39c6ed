"""minipeft/kernels/adamw.cu agrees bit for bit with its NumPy twin, minipeft.optim.core.adamw_update."""
from __future__ import annotations

import numpy as np
import pytest

from minipeft.optim.core import adamw_update

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("n,wd,step", [(1, 0.0, 1), (1000, 0.01, 1), (3 * 768 * 768 + 5, 0.1, 7), (4099, 0.0, 1000)])
def test_adamw_kernel_bit_for_bit(n, wd, step, monkeypatch):
    import cupy

    from minipeft.kernels import adamw as K

    from ._twin import Counter

    calls = Counter(monkeypatch, K, "adamw_update_cuda")
    rng = np.random.default_rng(n)
    p = rng.standard_normal(n).astype(np.float32)
    g = (rng.standard_normal(n) * np.exp(rng.uniform(-8, 2, n))).astype(np.float32)
    m = (rng.standard_normal(n) * 0.01).astype(np.float32)
    v = (rng.random(n) * 1e-4).astype(np.float32)
    ref = [a.copy() for a in (p, g, m, v)]
    gpu = [cupy.asarray(a) for a in (p, g, m, v)]
    for _ in range(3):
        adamw_update(*ref, step=step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, wd=wd)
        adamw_update(*gpu, step=step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, wd=wd)
        step += 1
    assert calls.n == 3
    for name, r, x in zip("pgmv", ref, gpu):
        np.testing.assert_array_equal(x.get().view(np.uint32), r.view(np.uint32), err_msg=name)


def test_adamw_non_float32_uses_twin(monkeypatch):
    import cupy

    from minipeft.kernels import adamw as K

    from ._twin import Counter

    calls = Counter(monkeypatch, K, "adamw_update_cuda")
    p = cupy.ones(10, cupy.float16)
    m, v = cupy.zeros(10, cupy.float32), cupy.zeros(10, cupy.float32)
    adamw_update(p, cupy.ones(10, cupy.float16), m, v, 1, 1e-3, (0.9, 0.999), 1e-8, 0.0)
    assert calls.n == 0 and float(p[0]) < 1.0
