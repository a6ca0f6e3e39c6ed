"""The training loop: exact resume on the CPU, gradient accumulation, eval, errors."""
from types import SimpleNamespace

import numpy as np
import pytest

from minipeft import functional as F
from minipeft.checkpoint import latest_checkpoint, list_checkpoints
from minipeft.engine import Tensor
from minipeft.nn import Dropout, Linear, Module
from minipeft.optim import SGD, AdamW
from minipeft.train import TrainConfig, count_tokens, train

D, V = 8, 5


class Tiny(Module):
    """Two linear layers with dropout between them; forward(x, targets) -> .loss/.logits."""

    def __init__(self, p=0.2, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.fc1 = Linear(D, 16, rng=rng)
        self.drop = Dropout(p)
        self.fc2 = Linear(16, V, rng=rng)

    def forward(self, x, targets=None):
        logits = self.fc2(self.drop(F.relu(self.fc1(Tensor(x)))))  # (B, T, V)
        loss = None if targets is None else F.cross_entropy(logits, targets)
        return SimpleNamespace(logits=logits, loss=loss)


def get_batch(rng, batch_size=4, T=3):
    x = rng.standard_normal((batch_size, T, D)).astype(np.float32)
    return x, x[..., :V].argmax(-1)  # a learnable rule


def cfg(tmp_path=None, **kw):
    base = dict(max_steps=12, batch_size=4, grad_accum_steps=2, lr=1e-2, schedule="cosine", warmup_steps=2,
                grad_clip=1.0, seed=3, progress=False)
    if tmp_path is not None:
        base.update(checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=4)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_falls_and_result_fields():
    res = train(Tiny(), get_batch, config=cfg(max_steps=40, schedule="constant", warmup_steps=0, lr=3e-2))
    assert len(res.history) == 40 and [h.step for h in res.history] == list(range(1, 41))
    assert np.mean(res.losses[-5:]) < 0.7 * np.mean(res.losses[:5])
    assert all(h.tokens_per_sec > 0 for h in res.history)
    assert len(res.grad_norms) == 40 and res.wall_time > 0
    assert res.final["steps"] == 40 and res.final["train_loss"] == res.losses[-1]
    assert res.final["tokens_per_sec"] > 0 and res.final["sec_per_step"] > 0


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_resume_reproduces_losses_exactly(tmp_path, opt):
    make = (lambda m: AdamW(m, lr=1.0)) if opt == "adamw" else (lambda m: SGD(m, lr=1.0, momentum=0.9))
    m_full = Tiny()
    full = train(m_full, get_batch, make(m_full), cfg())

    m1 = Tiny()
    part = train(m1, get_batch, make(m1), cfg(tmp_path, max_steps=12),
                 callbacks=[lambda step, info: step == 6])  # "killed" after step 6; last checkpoint at 4
    assert len(part.losses) == 6 and part.losses == full.losses[:6]
    assert latest_checkpoint(tmp_path / "ck").name == "step_00000004"

    m2 = Tiny(seed=123)  # different init: everything must come from the checkpoint
    resumed = train(m2, get_batch, make(m2), cfg(tmp_path), resume=True)
    assert resumed.resumed_from == 4
    assert resumed.losses == full.losses  # exact, not approximate
    assert [h.lr for h in resumed.history] == [h.lr for h in full.history]
    for (n, a), (_, b) in zip(m_full.state_dict().items(), m2.state_dict().items()):
        assert np.array_equal(a, b), n


def test_dropout_is_active_and_seeded():
    a = train(Tiny(p=0.5), get_batch, config=cfg(max_steps=3))
    b = train(Tiny(p=0.5), get_batch, config=cfg(max_steps=3))
    c = train(Tiny(p=0.0), get_batch, config=cfg(max_steps=3))
    assert a.losses == b.losses and a.losses != c.losses


def test_grad_accumulation_averages_micro_batches():
    # k micro-batches of size b give the gradient of one batch of size k*b (equal-size batches).
    def one_big(rng):
        xs, ys = zip(*(get_batch(rng) for _ in range(3)))
        return np.concatenate(xs), np.concatenate(ys)

    common = dict(max_steps=4, schedule="constant", warmup_steps=0, grad_clip=None, lr=0.05)
    ma, mb = Tiny(p=0.0), Tiny(p=0.0)
    ra = train(ma, get_batch, SGD(ma, lr=1.0), cfg(grad_accum_steps=3, **common))
    rb = train(mb, one_big, SGD(mb, lr=1.0), cfg(grad_accum_steps=1, **common))
    np.testing.assert_allclose(ra.losses, rb.losses, rtol=1e-5)
    np.testing.assert_allclose(ma.fc1.weight.data, mb.fc1.weight.data, rtol=1e-5, atol=1e-7)


def test_eval_every_and_eval_does_not_change_training():
    calls = []

    def eval_fn(model):
        calls.append(model.training)
        return {"acc": 0.5}

    res = train(Tiny(), get_batch, config=cfg(max_steps=10, eval_every=3, eval_batches=2), eval_fn=eval_fn,
                get_eval_batch=get_batch)
    assert [s for s, _ in res.eval_history] == [3, 6, 9, 10]  # every 3 steps and at the end
    assert calls == [False] * 4  # eval mode during evaluation
    assert set(res.eval_history[0][1]) == {"val_loss", "acc"} and res.final["acc"] == 0.5
    assert res.eval_history[1][1]["val_loss"] < res.eval_history[0][1]["val_loss"] + 1.0
    plain = train(Tiny(), get_batch, config=cfg(max_steps=10))
    assert plain.losses == res.losses


def test_custom_loss_fn_and_token_count():
    seen = []

    def loss_fn(model, batch):
        seen.append(sorted(batch))
        return model(batch["input_ids"], targets=batch["labels"]).loss

    def dict_batch(rng):
        x, y = get_batch(rng)
        return {"input_ids": x, "labels": y}

    res = train(Tiny(), dict_batch, config=cfg(max_steps=2, grad_accum_steps=1), loss_fn=loss_fn)
    assert len(res.losses) == 2 and seen[0] == ["input_ids", "labels"]
    assert count_tokens((np.zeros((4, 7)), None)) == 28 and count_tokens({"input_ids": np.zeros((2, 3))}) == 6


def test_checkpoints_written_and_pruned(tmp_path):
    train(Tiny(), get_batch, config=cfg(tmp_path, max_steps=10, checkpoint_every=3, keep_checkpoints=2))
    assert [s for s, _ in list_checkpoints(tmp_path / "ck")] == [9, 10]  # every 3 and at the end, newest 2


def test_resume_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(Tiny(), get_batch, config=cfg(tmp_path), resume=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(Tiny(), get_batch, config=cfg(), resume=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="checkpoint_dir"):
        train(Tiny(), get_batch, config=cfg(), resume=True)
    fresh = train(Tiny(), get_batch, config=cfg(tmp_path, max_steps=4), resume="auto")  # nothing yet: fresh start
    assert fresh.resumed_from is None and len(fresh.losses) == 4
    with pytest.raises(ValueError, match="different config.*lr"):
        train(Tiny(), get_batch, config=cfg(tmp_path, lr=0.5), resume=True)


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step")
    with pytest.raises(ValueError, match="checkpoint_dir"):
        TrainConfig(checkpoint_every=5)
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({"max_step": 3})
    with pytest.raises(TypeError, match="get_batch"):
        train(Tiny(), [1, 2], config=cfg())
    with pytest.raises(TypeError, match="loss_fn must return"):
        train(Tiny(), get_batch, config=cfg(), loss_fn=lambda m, b: 1.0)
    with pytest.raises(FloatingPointError, match="lower lr"):
        train(Tiny(), get_batch, config=cfg(), loss_fn=lambda m, b: m(*b).logits.sum() * float("nan"))
