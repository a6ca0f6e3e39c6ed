"""The training step recorded as a CUDA graph (minipeft/graph_train.py, minipeft/capture.py).

On the CPU: the pieces a recording relies on — per-replay scalar slots, AdamW reading its
step's scalars from an array (bit for bit the eager update), a recorded AdamW advancing its
step counts only before replays, checks that are skipped while recording — and the
refusals. Marked ``gpu``: replayed steps against eager steps of the same model (full
fine-tuning, LoRA, QLoRA; a learning rate changed between steps), and the errors on a bad
batch.
"""
from __future__ import annotations

import numpy as np
import pytest

from minipeft.capture import CAPACITY, Recording, capturing, recording
from minipeft.engine import Tensor
from minipeft.gpt import GPT, GPTConfig
from minipeft.graph_train import GraphTrainStep, graph_trainable
from minipeft.optim import SGD, AdamW
from minipeft.optim.core import adamw_scalars, adamw_update, adamw_update_from

CFG = dict(vocab_size=67, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def _moments(rng, n):
    m = rng.standard_normal(n).astype(np.float32) * 0.01
    return m, np.abs(rng.standard_normal(n)).astype(np.float32) * 1e-4


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_adamw_from_float32_scalars_is_the_eager_update(dtype, wd):
    """The device buffer holds the step's scalars as float32: for float32 moments that is the
    rounding the eager update makes anyway (bit for bit); float64 moments take the float64 values."""
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(257).astype(dtype)
    g = rng.standard_normal(257).astype(dtype)
    m0, v0 = (a.astype(dtype) for a in _moments(rng, 257))
    for step in (1, 7, 1000):
        a = [x.copy() for x in (p0, m0, v0)]
        b = [x.copy() for x in (p0, m0, v0)]
        adamw_update(a[0], g, a[1], a[2], step, 3e-4, (0.9, 0.999), 1e-8, wd)
        s = adamw_scalars(step, 3e-4, (0.9, 0.999), wd)
        adamw_update_from(b[0], g, b[1], b[2], s.astype(np.float32) if dtype == np.float32 else s,
                          (0.9, 0.999), 1e-8, wd)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
        assert not np.array_equal(a[0], p0)  # the update did something


def test_adamw_scalars_are_the_bias_corrections():
    keep, bc2, step_size = adamw_scalars(3, 0.01, (0.9, 0.99), 0.1)
    assert keep == pytest.approx(1 - 0.01 * 0.1)
    assert bc2 == pytest.approx((1 - 0.99 ** 3) ** 0.5)
    assert step_size == pytest.approx(0.01 / (1 - 0.9 ** 3))


def test_per_replay_slots_and_refresh():
    rec = Recording(np.zeros(CAPACITY, np.float32))
    counter = {"n": 0}

    def advance():
        counter["n"] += 1
        return [counter["n"], 2 * counter["n"]]

    view = rec.per_replay(advance, 2)
    other = rec.per_replay(lambda: [7.0], 1)
    assert view.shape == (2,) and other.shape == (1,) and rec.used == 3
    assert counter["n"] == 0  # nothing computed while recording
    rec.refresh()
    rec.refresh()
    assert counter["n"] == 2 and list(rec.host[:3]) == [2.0, 4.0, 7.0]
    with pytest.raises(RuntimeError, match="per-replay values"):
        rec.per_replay(lambda: [], CAPACITY)


def test_recordings_do_not_nest_and_end():
    rec = Recording(np.zeros(CAPACITY, np.float32))
    with recording(rec):
        assert capturing() is rec
        with pytest.raises(RuntimeError, match="do not nest"):
            with recording(Recording(np.zeros(CAPACITY, np.float32))):
                pass
    assert capturing() is None


def _param_with_grad(rng, n=5):
    p = Tensor(rng.standard_normal(n).astype(np.float32), requires_grad=True)
    p.grad = rng.standard_normal(n).astype(np.float32)
    return p


def test_recorded_adamw_advances_its_steps_only_before_replays():
    """Recording an AdamW step hands out one 3-value slot per parameter and leaves the step counts;
    each refresh (before a replay) advances them by one and writes that step's scalars."""
    rng = np.random.default_rng(1)
    params = [("a", _param_with_grad(rng)), ("b", _param_with_grad(rng, 3))]
    opt = AdamW(params, lr=1e-3, weight_decay=0.1)
    opt.step()  # eager: makes the state, step 1
    rec = Recording(np.ones(CAPACITY, np.float32))
    with recording(rec):
        opt.step()  # on the CPU this runs now, reading the buffer's ones: only the bookkeeping is checked
    assert rec.used == 6 and [opt.state[n]["step"] for n in "ab"] == [1, 1]
    rec.refresh()
    assert [opt.state[n]["step"] for n in "ab"] == [2, 2]
    want = adamw_scalars(2, 1e-3, opt.betas, 0.1).astype(np.float32)
    np.testing.assert_array_equal(rec.host[:6], np.concatenate([want, want]))
    opt.lr = 5e-4  # a schedule's new rate is read at the next refresh
    rec.refresh()
    np.testing.assert_array_equal(rec.host[:3], adamw_scalars(3, 5e-4, opt.betas, 0.1).astype(np.float32))


def test_recorded_adamw_refuses_to_make_state():
    rng = np.random.default_rng(2)
    opt = AdamW([("w", _param_with_grad(rng))])
    with recording(Recording(np.zeros(CAPACITY, np.float32))):
        with pytest.raises(RuntimeError, match="take one eager step first"):
            opt.step()


def test_checks_that_read_the_device_are_skipped_only_while_recording():
    model = GPT(GPTConfig(**CFG), seed=0)
    bad = np.full((1, 4), CFG["vocab_size"] + 5)
    with pytest.raises(ValueError, match="token ids must be in"):
        model._check_idx(bad)
    with recording(Recording(np.zeros(CAPACITY, np.float32))):
        assert model._check_idx(bad).shape == (1, 4)  # GraphTrainStep checks every batch itself


def test_refusals_name_the_reason():
    model = GPT(GPTConfig(**CFG), seed=0)
    opt = AdamW(model, lr=1e-3)
    assert "CPU" in graph_trainable(model, opt, "bfloat16")
    with pytest.raises(ValueError, match="cannot record this step: the model is on the CPU"):
        GraphTrainStep(model, opt)
    with pytest.raises(ValueError, match="compute dtype|compute_dtype"):
        graph_trainable(model, opt, "int8")


# ---------------------------------------------------------------------------------- GPU


def _gpu_model(mode: str, seed: int = 0):
    model = GPT(GPTConfig(**CFG), seed=seed)
    model.train()
    if mode == "qlora":
        from minipeft.quant.modules import Linear4bit

        model.to("cuda")
        for name, lin in [(n, m) for n, m in model.named_modules() if n.startswith("transformer.h.")
                          and type(m).__name__ == "Linear"]:
            q = Linear4bit(lin, quant_type="nf4", blocksize=64, compress_statistics=True)
            q.train(True)
            model.set_submodule(name, q)
    if mode in ("lora", "qlora"):
        from minipeft.peft import LoraConfig, get_peft_model

        targets = ["c_attn"] if mode == "lora" else ["c_attn", "c_proj", "c_fc"]
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets),
                               rng=np.random.default_rng(seed))
        model.train()
    return model.to("cuda")


def _batches(n, B=2, T=16, seed=3):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, CFG["vocab_size"], size=(n, B, T + 1))
    return [(d[:, :-1].copy(), d[:, 1:].copy()) for d in data]


def _eager_step(model, opt, idx, tgt, dtype="bfloat16", scaler=None):
    """What minipeft.train does without clipping (and benchmarks/train_step.py's minipeft_step)."""
    import cupy as cp

    from minipeft import amp

    opt.zero_grad()
    with amp.autocast(dtype):
        loss = model(cp.asarray(idx), targets=cp.asarray(tgt)).loss
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale_loss(loss).backward()
        found = scaler.unscale_(opt.params)
        if not found:
            opt.step()
        scaler.update(found)
    return float(loss.item())


def _trainable(model):
    return {n: p.data.get() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.gpu
@pytest.mark.parametrize("mode,dtype", [("full", "bfloat16"), ("lora", "bfloat16"), ("qlora", "bfloat16"),
                                        ("full", "float16"), ("qlora", "float16")])
def test_replayed_steps_are_the_eager_steps(mode, dtype):
    """Six steps (one eager warm-up, the recording's replay, four more replays, the learning rate
    changed before the last) against six eager steps of an identical model: the same losses and
    trained weights, up to the order of atomic float32 sums in the embedding's backward. In
    float16 the loss scale starts at 2^60 and backs off by 2^-16, so the first steps overflow
    and are skipped (the warm-up runs eagerly until AdamW has its state) until the scale fits:
    the replays skip exactly the eager steps' skips."""
    from minipeft import amp

    batches = _batches(6)
    ref, rec_model = _gpu_model(mode), _gpu_model(mode)
    opt_ref, opt = AdamW(ref, lr=1e-3, weight_decay=0.01), AdamW(rec_model, lr=1e-3, weight_decay=0.01)
    half = dtype == "float16"
    scaler_ref, scaler = [amp.GradScaler(init_scale=2.0 ** 60, backoff_factor=2.0 ** -16) if half else None
                          for _ in range(2)]
    step = GraphTrainStep(rec_model, opt, dtype, scaler=scaler)
    losses_ref, losses = [], []
    for i, (idx, tgt) in enumerate(batches):
        if i == 5:
            opt_ref.lr = opt.lr = 2e-4
        losses_ref.append(_eager_step(ref, opt_ref, idx, tgt, dtype, scaler_ref))
        losses.append(float(step(idx, tgt).item()))
        assert step.recorded == (i >= 1) or half
        if half:
            assert (scaler.scale, scaler.skipped_steps) == (scaler_ref.scale, scaler_ref.skipped_steps)
    np.testing.assert_allclose(losses, losses_ref, rtol=1e-5)
    want, got = _trainable(ref), _trainable(rec_model)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=2e-6, err_msg=name)
    steps_ref = {st["step"] for st in opt_ref.state.values()}
    assert {st["step"] for st in opt.state.values()} == steps_ref
    if half:
        assert 0 < scaler.skipped_steps < 6 and steps_ref == {6 - scaler.skipped_steps}


@pytest.mark.gpu
def test_a_recorded_step_checks_every_batch():
    model = _gpu_model("full")
    step = GraphTrainStep(model, AdamW(model, lr=1e-3), "bfloat16")
    (idx, tgt), = _batches(1)
    step(idx, tgt)
    step(idx, tgt)  # recorded
    bad = idx.copy()
    bad[0, 0] = CFG["vocab_size"]
    with pytest.raises(ValueError, match=r"must be in \[0, 67\)"):
        step(bad, tgt)
    with pytest.raises(ValueError, match="recorded for batches of shape"):
        step(idx[:1], tgt[:1])
    import cupy as cp

    with pytest.raises(ValueError, match="must be in"):
        step(cp.asarray(idx), cp.asarray(bad))  # device batches are checked on the device


@pytest.mark.gpu
def test_steps_that_cannot_be_recorded_are_refused_on_the_gpu():
    model = _gpu_model("full")
    assert "float32" in graph_trainable(model, AdamW(model), "float32")
    assert graph_trainable(model, AdamW(model), "float16") is None  # with its loss scaler
    assert "SGD" in graph_trainable(model, SGD(model, lr=0.1), "bfloat16")
    dropped = GPT(GPTConfig(**{**CFG, "dropout": 0.1}), seed=0).to("cuda")
    dropped.train()
    assert "dropout" in graph_trainable(dropped, AdamW(dropped), "bfloat16")
