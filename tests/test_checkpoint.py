"""Checkpoint round trips (safetensors + JSON) and their errors."""
import json

import numpy as np
import pytest

from minipeft import random as mp_random
from minipeft.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, checkpoint_path
from minipeft.nn import Linear, Module
from minipeft.optim import SGD, AdamW, LRScheduler, cosine_schedule


class Net(Module):
    def __init__(self, hidden=6, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.fc1 = Linear(4, hidden, rng=rng)
        self.fc2 = Linear(hidden, 3, rng=rng)


def _stepped(seed=0, opt_cls=AdamW, **kw):
    net = Net(seed=seed)
    opt = opt_cls(net, lr=0.1, **kw)
    sch = LRScheduler(opt, cosine_schedule(0.1, 2, 20))
    for _ in range(3):
        for p in net.parameters():
            p.grad = np.full(p.shape, 0.5, np.float32)
        opt.step()
        sch.step()
    return net, opt, sch


def test_round_trip(tmp_path):
    net, opt, sch = _stepped()
    gen = np.random.default_rng(7)
    gen.random(5)
    mp_random.manual_seed(3)
    mp_random.generator("cpu").random(4)
    path = save_checkpoint(tmp_path / "ck", net, opt, sch, step=3, extra={"note": "hi", "losses": [1.5, 0.25]},
                           rng_state={"batch": gen})
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]
    expect_gen, expect_mp = gen.random(3), mp_random.generator("cpu").random(3)

    net2 = Net(seed=1)
    opt2 = AdamW(net2, lr=0.5)
    sch2 = LRScheduler(opt2, cosine_schedule(0.1, 2, 20))
    gen2 = np.random.default_rng(0)
    mp_random.manual_seed(99)
    state = load_checkpoint(path, net2, opt2, sch2, rng_state={"batch": gen2})
    assert state["step"] == 3 and state["extra"] == {"note": "hi", "losses": [1.5, 0.25]}
    for (n, a), (_, b) in zip(net.state_dict().items(), net2.state_dict().items()):
        assert np.array_equal(a, b), n
    assert opt2.lr == opt.lr and sch2.last_step == 3
    for name, st in opt.state.items():
        assert opt2.state[name]["step"] == st["step"] == 3
        assert np.array_equal(opt2.state[name]["exp_avg"], st["exp_avg"])
        assert np.array_equal(opt2.state[name]["exp_avg_sq"], st["exp_avg_sq"])
    assert np.array_equal(gen2.random(3), expect_gen)
    assert np.array_equal(mp_random.generator("cpu").random(3), expect_mp)
    assert "pickle" not in (path / "state.json").read_text()
    json.loads((path / "state.json").read_text())  # plain JSON


def test_model_only_and_sgd_without_buffers(tmp_path):
    net, opt, _ = _stepped(opt_cls=SGD)  # no momentum: no arrays at all
    save_checkpoint(tmp_path / "a", net, opt, step=1)
    opt2 = SGD(Net(), lr=0.1)
    load_checkpoint(tmp_path / "a", Net(), opt2)
    assert opt2.state_bytes() == 0 and all(st["step"] == 3 for st in opt2.state.values())
    save_checkpoint(tmp_path / "b", net)
    fresh = Net(seed=5)
    load_checkpoint(tmp_path / "b", fresh)
    assert np.array_equal(fresh.fc1.weight.data, net.fc1.weight.data)
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(tmp_path / "b", Net(), AdamW(Net()))


def test_errors(tmp_path):
    net, opt, sch = _stepped()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope", net)
    path = save_checkpoint(tmp_path / "ck", net, opt, sch, step=3)
    with pytest.raises(ValueError, match=r"(?s)does not fit this model.*shape mismatches.*fc1.weight"):
        load_checkpoint(path, Net(hidden=7))
    other = Net(hidden=7)
    with pytest.raises(ValueError, match="exp_avg: saved"):
        load_checkpoint(path, Net(hidden=6), AdamW(other))
    with pytest.raises(ValueError, match="no state for generators"):
        load_checkpoint(path, net, rng_state={"batch": np.random.default_rng(0)})
    with pytest.raises(TypeError, match="JSON-able"):
        save_checkpoint(tmp_path / "bad", net, extra={"x": object()})
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        save_checkpoint(tmp_path / "bad2", net, rng_state={"batch": 3})
    (path / "state.json").unlink()
    with pytest.raises(FileNotFoundError, match="state.json is missing"):
        load_checkpoint(path, net)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file; expected a directory"):
        load_checkpoint(tmp_path / "file", net)


def test_failed_load_changes_nothing(tmp_path):
    net, opt, _ = _stepped()
    path = save_checkpoint(tmp_path / "ck", net, opt, step=3)
    small = Net(hidden=7)
    before = {k: v.copy() for k, v in small.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit this optimizer"):
        load_checkpoint(path, small, AdamW(small))
    assert all(np.array_equal(before[k], v) for k, v in small.state_dict().items())


def test_latest_checkpoint(tmp_path):
    net = Net()
    assert latest_checkpoint(tmp_path) is None and latest_checkpoint(tmp_path / "missing") is None
    for s in (2, 10, 4):
        save_checkpoint(checkpoint_path(tmp_path, s), net, step=s)
    (checkpoint_path(tmp_path, 12)).mkdir()  # interrupted save: no state.json
    assert latest_checkpoint(tmp_path).name == "step_00000010"
