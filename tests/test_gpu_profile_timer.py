"""benchmarks/gpu_profile.py's OpTimer wraps every Function's forward and backward, whatever kind of method
it is (amp.AmpLinear.forward is a classmethod), and puts each back as it was. Checked on the CPU with a
stand-in for CuPy's events."""
from __future__ import annotations

import importlib.util
import pathlib
import types

import numpy as np

from minipeft import amp
from minipeft.engine import Tensor
from minipeft.optim.core import Optimizer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _gpu_profile():
    spec = importlib.util.spec_from_file_location("gpu_profile", ROOT / "benchmarks" / "gpu_profile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Event:
    def record(self):
        pass


FAKE_CP = types.SimpleNamespace(cuda=types.SimpleNamespace(Event=_Event))


def test_op_timer_times_classmethod_forwards_and_restores_them():
    before = {name: amp.AmpLinearOut16.__dict__.get(name) for name in ("forward", "backward")}
    before_base = amp.AmpLinear.__dict__["forward"]
    step = Optimizer.__dict__["step"]
    timer = _gpu_profile().OpTimer(FAKE_CP, [amp])
    try:
        assert isinstance(amp.AmpLinear.__dict__["forward"], classmethod)  # still a classmethod, now timed
        x = Tensor(np.ones((2, 8), np.float32), requires_grad=True)
        w = Tensor(np.full((3, 8), 0.5, np.float32), requires_grad=True)
        with amp.autocast("bfloat16"):
            y = amp.AmpLinear.apply(x, w)
        y.backward(np.ones((2, 3), np.float32))
        assert np.allclose(y.data, 4.0) and np.allclose(x.grad, 1.5)
        names = [r[0] for r in timer.records]
        assert "AmpLinear.forward" in names and "AmpLinear.backward" in names
    finally:
        timer.restore()
    assert amp.AmpLinear.__dict__["forward"] is before_base and Optimizer.__dict__["step"] is step
    assert {name: amp.AmpLinearOut16.__dict__.get(name) for name in ("forward", "backward")} == before
