"""minipeft.kv_cache: the cache GPT.forward returns, its padding mask, row selection and the position formula."""
import numpy as np
import pytest

from minipeft.engine import Tensor, no_grad
from minipeft.gpt import GPT, GPTConfig
from minipeft.kv_cache import KVCache, positions


def gpt():
    return GPT(GPTConfig(n_layer=2, n_embd=16, n_head=2, block_size=24, vocab_size=23, dtype="float64"), seed=0).eval()


def test_positions_count_only_kept_entries():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 1, 1]], bool)
    assert positions(mask, 3).tolist() == [[3, 3, 3, 4, 5], [3, 4, 5, 6, 7], [3, 3, 3, 4, 5]]
    # per-row offsets: each row continues after its own kept positions
    assert positions(np.ones((3, 2), bool), np.array([2, 5, 0])).tolist() == [[2, 3], [5, 6], [0, 1]]


def test_forward_returns_the_cache_of_every_position_with_its_mask():
    m = gpt()
    x = np.random.default_rng(0).integers(0, 23, (2, 5))
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    prefix = [(Tensor(np.zeros((1, 2, 3, 8))),) * 2] * 2
    with no_grad():
        cache = m(x, attention_mask=mask, prefix_key_values=prefix, use_cache=True).past_key_values
    assert isinstance(cache, KVCache) and len(cache) == 2 and cache[0][0].shape == (2, 2, 8, 8)
    assert cache.length == 8 and cache.batch_size == 2
    assert cache.next_positions().tolist() == [6, 8]  # 3 prefix positions + the kept tokens
    assert [kv[0].shape for kv in cache] == [(2, 2, 8, 8)] * 2  # reads like the list of (k, v) it replaces
    with no_grad():
        plain = m(x, use_cache=True).past_key_values
    assert plain.mask is None and plain.next_positions() == 5


def test_a_padded_cache_continues_each_row_as_a_full_run():
    m = gpt()
    rng = np.random.default_rng(1)
    short, long = rng.integers(0, 23, 3), rng.integers(0, 23, 6)
    idx = np.stack([np.r_[np.zeros(3, np.int64), short], long])
    mask = np.array([[0, 0, 0, 1, 1, 1], [1] * 6], bool)
    nxt = rng.integers(0, 23, (2, 1))
    with no_grad():
        cache = m(idx, attention_mask=mask, position_ids=positions(mask, 0), use_cache=True).past_key_values
        # the cache brings its own padding mask: only the new positions are given
        got = m(nxt, past_key_values=cache, position_ids=positions(np.ones((2, 1), bool), cache.next_positions()))
        want_short = m(np.r_[short, nxt[0]][None]).logits.data[0, -1]
        want_long = m(np.r_[long, nxt[1]][None]).logits.data[0, -1]
    np.testing.assert_allclose(got.logits.data[0, -1], want_short, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.logits.data[1, -1], want_long, rtol=1e-10, atol=1e-12)


def test_select_repeats_and_reorders_rows():
    k = np.arange(2 * 1 * 3 * 1, dtype=float).reshape(2, 1, 3, 1)
    cache = KVCache([(k, -k)], mask=np.array([[1, 1, 1], [0, 1, 1]], bool))
    sel = cache.select([1, 1, 0])
    assert np.array_equal(sel[0][0], k[[1, 1, 0]]) and np.array_equal(sel[0][1], -k[[1, 1, 0]])
    assert sel.next_positions().tolist() == [2, 2, 3]
    assert cache.batch_size == 2  # a value: the original is unchanged


def test_bad_caches_are_explained():
    k = np.zeros((2, 1, 3, 1))
    with pytest.raises(ValueError, match=r"mask must be \(B, S\) = \(2, 3\)"):
        KVCache([(k, k)], mask=np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="one \\(k, v\\) pair per layer, got none"):
        KVCache([])
    with pytest.raises(ValueError, match="past_key_values must hold one \\(k, v\\) pair per layer"):
        gpt()(np.zeros((2, 1), np.int64), past_key_values=KVCache([(np.zeros((2, 2, 3, 8)),) * 2]))
