"""The training loop: exact resume on the CPU, gradient accumulation, eval, errors."""
from types import SimpleNamespace

import numpy as np
import pytest

from minipeft import functional as F
from minipeft.checkpoint import latest_checkpoint, list_checkpoints
from minipeft.early_stopping import EarlyStopping
from minipeft.engine import Tensor, no_grad
from minipeft.nn import Dropout, Linear, Module
from minipeft.optim import SGD, AdamW
from minipeft.train import TrainConfig, count_tokens, random_batches, train, validation_loss

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


# ------------------------------------------------------------------ label smoothing


class SmoothTiny(Tiny):
    """Tiny whose forward takes ``label_smoothing`` as GPT.forward does."""

    def forward(self, x, targets=None, label_smoothing=0.0):
        logits = self.fc2(self.drop(F.relu(self.fc1(Tensor(x)))))  # (B, T, V)
        loss = None if targets is None else F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
        return SimpleNamespace(logits=logits, loss=loss)


def _hand_ce(logits, t, eps):
    """(1 - eps) * CE(y) + eps * mean_j(-log p_j), averaged over the tokens (NumPy, float64)."""
    z = logits.reshape(-1, V).astype(np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    t = t.reshape(-1)
    return float(np.mean(-(1 - eps) * logp[np.arange(len(t)), t] - eps * logp.mean(-1)))


def test_label_smoothing_trains_on_smoothed_targets_and_evaluates_plain_ce():
    import copy

    m = SmoothTiny(p=0.0)
    m0 = copy.deepcopy(m)
    one_step = cfg(max_steps=1, warmup_steps=0, grad_accum_steps=1, label_smoothing=0.2, eval_batches=2)
    res = train(m, get_batch, config=one_step, get_eval_batch=get_batch)
    x, y = get_batch(np.random.default_rng(3))  # the first batch train() draws (seed 3)
    logits = m0(x).logits.data
    assert res.losses[0] == pytest.approx(_hand_ce(logits, y, 0.2), rel=1e-5)
    assert res.losses[0] != pytest.approx(_hand_ce(logits, y, 0.0), rel=1e-3)  # smoothing changed the loss
    plain = validation_loss(m, random_batches(get_batch, 2, seed=4))  # the evaluation's batches: Generator(seed + 1)
    assert res.eval_history[-1][1]["val_loss"] == pytest.approx(plain, rel=1e-6)
    smoothed = validation_loss(m, random_batches(get_batch, 2, seed=4),
                               loss_fn=lambda mm, b: mm(b[0], b[1], label_smoothing=0.2).loss)
    assert smoothed != pytest.approx(plain, rel=1e-3)  # so the evaluation really is the plain one


def test_label_smoothing_changes_the_trajectory_and_zero_is_the_default():
    a = train(SmoothTiny(p=0.0), get_batch, config=cfg(max_steps=4))
    b = train(SmoothTiny(p=0.0), get_batch, config=cfg(max_steps=4, label_smoothing=0.0))
    c = train(SmoothTiny(p=0.0), get_batch, config=cfg(max_steps=4, label_smoothing=0.1))
    assert a.losses == b.losses and a.losses != c.losses
    assert TrainConfig().label_smoothing == 0.0


def test_label_smoothing_reaches_a_custom_loss_fn_only_in_training():
    seen = []

    def loss_fn(model, batch, label_smoothing=0.0):
        seen.append(label_smoothing)
        return model(*batch, label_smoothing=label_smoothing).loss

    train(SmoothTiny(), get_batch, config=cfg(max_steps=2, grad_accum_steps=1, eval_batches=1, label_smoothing=0.1),
          loss_fn=loss_fn, get_eval_batch=get_batch)
    assert seen == [0.1, 0.1, 0.0]  # two training steps, one evaluation at the end
    with pytest.raises(ValueError, match="takes no label_smoothing keyword"):
        train(SmoothTiny(), get_batch, config=cfg(label_smoothing=0.1), loss_fn=lambda m, b: m(*b).loss)


@pytest.mark.parametrize("eps", [1.0, -0.1, 1.5, True, "0.1"])
def test_label_smoothing_must_be_in_0_1(eps):
    with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0, 1\)"):
        TrainConfig(label_smoothing=eps)


# ------------------------------------------------------------------- early stopping


def _history(*pairs):
    return {"result": SimpleNamespace(eval_history=[(s, {"val_loss": v}) for s, v in pairs])}


def test_early_stopping_ignores_evaluations_before_min_step():
    es = EarlyStopping(patience=2, min_step=10)
    seq = [(2, 1.0), (4, 2.0), (6, 3.0), (8, 4.0)]  # worse and worse, but inside warm-up
    for k in range(1, len(seq) + 1):
        assert es(seq[k - 1][0], _history(*seq[:k])) is None
    assert es.best_step is None and es.bad_evals == 0
    seq += [(10, 3.5), (12, 3.6), (14, 3.4), (16, 3.5), (18, 3.6)]
    got = {s: es(s, _history(*seq[:k + 1])) for k, (s, _) in enumerate(seq) if s >= 10}
    assert got == {10: None, 12: None, 14: None, 16: None, 18: True}  # best 3.4 at 14, then 2 bad evaluations
    assert es.best == 3.4 and es.best_step == 14 and es.stopped_at == 18
    assert es(19, _history(*seq)) is None  # no evaluation at step 19


def test_early_stopping_min_delta_and_errors():
    es = EarlyStopping(patience=1, min_delta=0.1)
    assert es(1, _history((1, 2.0))) is None
    assert es(2, _history((1, 2.0), (2, 1.95))) is True  # 0.05 better is not better than min_delta
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=0)
    with pytest.raises(ValueError, match="min_step"):
        EarlyStopping(patience=2, min_step=-1)
    with pytest.raises(KeyError, match="'acc'"):
        EarlyStopping(patience=1, metric="acc")(1, _history((1, 2.0)))
    with pytest.raises(ValueError, match="keep_best=True"):
        EarlyStopping(patience=1).restore_best(Tiny())
    with pytest.raises(ValueError, match="no evaluation at step >= min_step"):
        EarlyStopping(patience=1, min_step=5, keep_best=True).restore_best(Tiny())


def test_early_stopping_in_train_cannot_fire_in_warmup_and_restores_the_best_weights():
    flat = lambda model: 1.0  # noqa: E731  a metric that never improves
    es_none = EarlyStopping(patience=2)
    r = train(Tiny(), get_batch, config=cfg(max_steps=30, eval_every=1), eval_fn=flat, callbacks=[es_none])
    assert len(r.losses) == 3  # best at step 1, two flat evaluations: stops inside a warm-up of 5
    es = EarlyStopping(patience=2, min_step=5)
    r = train(Tiny(), get_batch, config=cfg(max_steps=30, eval_every=1, warmup_steps=5), eval_fn=flat, callbacks=[es])
    assert len(r.losses) == 7 and es.best_step == 5 and es.stopped_at == 7

    curve = {s: abs(s - 12) for s in range(31)}  # the metric is best at step 12
    snapshots = {}

    def snapshot(step, info):
        snapshots[step] = {n: p.data.copy() for n, p in info["model"].named_parameters()}

    m = Tiny()
    es = EarlyStopping(patience=3, min_step=4, keep_best=True)
    r = train(m, get_batch, config=cfg(max_steps=30, eval_every=2, warmup_steps=4),
              eval_fn=lambda model: float(curve[len(snapshots)]), callbacks=[snapshot, es])
    assert es.best_step == 12 and es.stopped_at == 18 and len(r.losses) == 18
    assert not np.array_equal(m.fc1.weight.data, snapshots[12]["fc1.weight"])
    assert es.restore_best(m) == 12
    for n, p in m.named_parameters():
        np.testing.assert_array_equal(p.data, snapshots[12][n], err_msg=n)


def test_validation_loss_weights_batches_by_tokens_in_eval_mode_and_restores_the_mode():
    m = Tiny(p=0.5)  # in training mode: its dropout would change every call
    rng = np.random.default_rng(0)
    batches = [get_batch(rng, batch_size=4), get_batch(rng, batch_size=1)]
    m.eval()
    with no_grad():
        losses = [float(m(x, targets=y).loss.item()) for x, y in batches]
    m.train()
    expected = (4 * losses[0] + 1 * losses[1]) / 5  # a batch counts with its tokens
    assert validation_loss(m, iter(batches)) == pytest.approx(expected, rel=1e-12)
    assert validation_loss(m, iter(batches)) == validation_loss(m, iter(batches))  # no dropout
    assert m.training  # the mode it was in
    with pytest.raises(ValueError, match="validation_loss got no batches"):
        validation_loss(m, [])
