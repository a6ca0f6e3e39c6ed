"""Tests for minipeft/data/batches.py: LM windows, eval order, prompt masking, unigram baseline."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft.data.batches import (
    IGNORE_INDEX,
    PromptTargetBatches,
    eval_batches,
    iter_lm_batches,
    lm_batches,
    num_eval_windows,
    pack_prompt_target,
    unigram_cross_entropy,
)
from minipeft.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def test_lm_batches_are_shifted_windows():
    tokens = np.arange(1000, dtype=np.int64)
    x, y = lm_batches(tokens, 8, 16, np.random.default_rng(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == np.int64
    assert np.array_equal(y, x + 1)  # y is x shifted by one token
    assert np.array_equal(np.diff(x, axis=1), np.ones((8, 15)))  # contiguous windows
    assert x.min() >= 0 and y.max() <= 999
    x2, _ = lm_batches(tokens, 8, 16, np.random.default_rng(0))
    assert np.array_equal(x, x2)  # same seed, same batch


def test_lm_batches_reach_every_window_start():
    tokens = np.arange(6, dtype=np.int32)  # only starts 0 and 1 fit a T=4 window + target
    x, y = lm_batches(tokens, 200, 4, np.random.default_rng(1))
    assert set(x[:, 0].tolist()) == {0, 1} and y.max() == 5 and x.dtype == np.int64
    batches = list(iter_lm_batches(tokens, 2, 4, np.random.default_rng(1), num_batches=3))
    assert len(batches) == 3


def test_lm_batches_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="block_size \\+ 1"):
        lm_batches(np.arange(10), 2, 10, rng)
    with pytest.raises(TypeError, match="Generator"):
        lm_batches(np.arange(100), 2, 4, 0)
    with pytest.raises(TypeError, match="1-D integer"):
        lm_batches(np.zeros(100), 2, 4, rng)
    with pytest.raises(ValueError, match="batch_size"):
        lm_batches(np.arange(100), 0, 4, rng)


def test_eval_batches_cover_in_order():
    tokens = np.arange(103, dtype=np.int64)
    batches = list(eval_batches(tokens, 3, 10))
    assert num_eval_windows(103, 10) == 10
    assert [b[0].shape for b in batches] == [(3, 10), (3, 10), (3, 10), (1, 10)]
    xs = np.concatenate([b[0] for b in batches]).ravel()
    ys = np.concatenate([b[1] for b in batches]).ravel()
    assert np.array_equal(xs, np.arange(100)) and np.array_equal(ys, np.arange(1, 101))
    assert len(list(eval_batches(tokens, 3, 10, max_batches=2))) == 2
    again = list(eval_batches(tokens, 3, 10))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(batches, again))


def test_pack_masks_prompt_and_padding():
    x, y = pack_prompt_target(TOK, [("ab", "cd"), ("hello ", "world")], block_size=16)
    assert x.shape == y.shape == (2, 16) and x.dtype == y.dtype == np.int64
    # row 0: ids = a b c d EOS -> x = a b c d, y = [ign] c d EOS
    assert x[0, :4].tolist() == list(b"abcd") and (x[0, 4:] == TOK.pad_id).all()
    assert y[0, :4].tolist() == [IGNORE_INDEX, ord("c"), ord("d"), TOK.eos_id]
    assert (y[0, 4:] == IGNORE_INDEX).all()
    scored = y[1][y[1] != IGNORE_INDEX]
    assert TOK.decode(scored, skip_special=False) == "world<|endoftext|>"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=12), st.text(max_size=12)), min_size=1, max_size=5))
def test_pack_scores_exactly_the_target(pairs):
    x, y = pack_prompt_target(TOK, pairs, block_size=80)
    for i, (prompt, target) in enumerate(pairs):
        scored = y[i][y[i] != IGNORE_INDEX]
        assert scored.tolist() == TOK.encode(target, add_eos=True).tolist()
        n = len(TOK.encode(prompt)) + len(scored) - 1
        assert TOK.decode(x[i, :n]) == prompt + target
        assert (x[i, n:] == TOK.pad_id).all()


def test_pack_truncation():
    pairs = [("p" * 30, "target")]
    with pytest.raises(ValueError, match="truncate='left'"):
        pack_prompt_target(TOK, pairs, block_size=16)
    x, y = pack_prompt_target(TOK, pairs, block_size=16, truncate="left")
    assert (x != TOK.pad_id).all()
    assert TOK.decode(y[0][y[0] != IGNORE_INDEX], skip_special=False) == "target<|endoftext|>"
    with pytest.raises(ValueError, match="truncate must be"):
        pack_prompt_target(TOK, pairs, block_size=16, truncate="right")


@pytest.mark.parametrize("pairs, err, message", [
    ([], ValueError, "pairs is empty"),
    ("ab", TypeError, "pairs must be a list of .* pairs, got str"),
    ([("a", 1)], TypeError, r"pairs\[0\] must be a \(prompt: str, target: str\) pair, got \('a', 1\)"),
    ([("a",)], TypeError, r"pairs\[0\] must be a \(prompt: str, target: str\) pair, got \('a',\)"),
])
def test_pack_bad_pairs(pairs, err, message):
    with pytest.raises(err, match=message):
        pack_prompt_target(TOK, pairs, block_size=8)


def test_prompt_target_batches():
    pairs = [("q" * i, "a" * (i % 3)) for i in range(1, 11)]
    data = PromptTargetBatches.from_pairs(TOK, pairs, block_size=32)
    assert len(data) == 10
    x, y = data.sample(4, np.random.default_rng(0))
    assert x.shape[0] == 4 and x.shape[1] <= 32 and x.shape == y.shape
    assert (x[:, -1] != TOK.pad_id).any()  # trimmed: the last column is used by some row
    x_full, _ = data.sample(4, np.random.default_rng(0), trim=False)
    assert x_full.shape == (4, 32) and np.array_equal(x_full[:, : x.shape[1]], x)
    seen = np.concatenate([b[0][:, 0] for b in data.epoch(3)])
    assert len(seen) == 10  # every row once, in order
    shuffled = [b[0].shape[0] for b in data.epoch(3, np.random.default_rng(0), drop_last=True)]
    assert shuffled == [3, 3, 3]
    order1 = [b[1].tolist() for b in data.epoch(4, np.random.default_rng(5), trim=False)]
    order2 = [b[1].tolist() for b in data.epoch(4, np.random.default_rng(5), trim=False)]
    assert order1 == order2


def test_unigram_cross_entropy():
    V = 4
    train = np.array([0, 0, 1, 2])  # counts + 1 = [3, 2, 2, 1] / 8
    val = np.array([0, 3])
    expected = -(np.log(3 / 8) + np.log(1 / 8)) / 2
    assert unigram_cross_entropy(train, val, V) == pytest.approx(expected)
    uniform = unigram_cross_entropy(np.array([], dtype=np.int64), np.array([1, 2]), V)
    assert uniform == pytest.approx(np.log(V))  # no data: add-one gives the uniform model
    with pytest.raises(ValueError, match="outside"):
        unigram_cross_entropy(train, np.array([4]), V)
    with pytest.raises(ValueError, match="empty"):
        unigram_cross_entropy(train, np.array([], dtype=np.int64), V)
    with pytest.raises(TypeError, match="integer"):
        unigram_cross_entropy(train, np.array([0.5]), V)


@pytest.mark.gpu
def test_lm_batches_on_gpu_match_cpu():
    cp = pytest.importorskip("cupy")
    tokens = np.arange(500, dtype=np.int64)
    x, y = lm_batches(tokens, 4, 8, np.random.default_rng(3))
    xg, yg = lm_batches(cp.asarray(tokens), 4, 8, np.random.default_rng(3))
    assert isinstance(xg, cp.ndarray)
    assert np.array_equal(cp.asnumpy(xg), x) and np.array_equal(cp.asnumpy(yg), y)
    (xe, _), = eval_batches(cp.asarray(tokens[:20]), 4, 8)
    assert np.array_equal(cp.asnumpy(xe), np.arange(16).reshape(2, 8))
