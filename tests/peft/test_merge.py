"""``add_weighted_adapter`` with every peft combination type (merge.py), against peft.

The fixture (tests/fixtures/make_peft_init_merge_fixtures.py, peft 0.21 on the CPU) holds two
LoRA adapters on the tiny GPT-2 and, per combination type, peft's logits of the combined
adapter and, for the DARE types, the Bernoulli masks peft drew: replayed through
``dare_masks``, minipeft must give peft's logits.
"""
import json
import os
import warnings

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from minipeft.backend import to_numpy
from minipeft.gpt import GPT
from minipeft.peft import LoraConfig, from_pretrained, get_peft_model, load_adapter
from minipeft.peft.merge import COMBINATIONS, combine, disjoint_merge, magnitude_prune_one, majority_sign_mask

from . import batch, logits, tiny_gpt

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")
HF_DIR = os.path.join(FIXTURES, "hf_gpt2_tiny")
MERGE_FILE = os.path.join(FIXTURES, "peft_merge_logits.safetensors")
REF = load_file(MERGE_FILE)
META = json.loads(safe_open(MERGE_FILE, "np").metadata()["fixture"])
WEIGHTS, DENSITY = META["weights"], META["density"]
KEYS = sorted(k[: -len(".logits")] for k in REF if k.endswith(".logits"))
REL_TOL = 1e-5


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def peft_adapters():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's newer config keys
        model = from_pretrained(GPT.from_hf(HF_DIR), os.path.join(FIXTURES, "peft_merge"), adapter_name="a1")
        load_adapter(model, os.path.join(FIXTURES, "peft_merge"), adapter_name="a2")
    return model


def masks_of(key: str) -> dict:
    return {k[len(key) + len(".mask."):]: v for k, v in REF.items() if k.startswith(key + ".mask.")}


def combined_logits(model, key: str, **kw) -> np.ndarray:
    t = key.replace("_frequency", "")
    sign = "frequency" if key.endswith("_frequency") else "total"
    model.add_weighted_adapter(["a1", "a2"], WEIGHTS, key, combination_type=t, density=DENSITY,
                               majority_sign_method=sign, **kw)
    model.set_adapter(key)
    return logits(model, REF["input_ids"])


def test_fixture_has_every_combination_type():
    assert {k.replace("_frequency", "") for k in KEYS} == set(COMBINATIONS)


@pytest.mark.parametrize("key", KEYS)
def test_logits_equal_peft(key):
    """Deterministic types as they are; DARE with peft's masks injected."""
    model = peft_adapters()
    masks = masks_of(key)
    assert bool(masks) == key.startswith("dare")
    got = combined_logits(model, key, **({"dare_masks": masks} if masks else {}))
    assert rel_err(got, REF[f"{key}.logits"]) < REL_TOL
    others = [k for k in KEYS if k != key and rel_err(REF[f"{k}.logits"], REF[f"{key}.logits"]) > 1e-3]
    assert len(others) >= len(KEYS) - 2  # the types really differ (ties/frequency may coincide with one other)


def test_dare_masks_come_from_the_seed():
    """Same seed, same adapter; another seed, another; a dropped entry is exactly 0 in A."""
    model = peft_adapters()
    for name, seed in (("s0", 0), ("s0b", 0), ("s1", 1)):
        model.add_weighted_adapter(["a1", "a2"], WEIGHTS, name, combination_type="dare_linear", density=0.5, seed=seed)
    lay = model.base_model.model.transformer.h[0].attn.c_attn
    a = {n: lay.lora_A[n].weight.data for n in ("s0", "s0b", "s1")}
    np.testing.assert_array_equal(a["s0"], a["s0b"])
    assert not np.array_equal(a["s0"], a["s1"])
    assert 0.1 < np.mean(a["s0"] == 0) < 0.5  # both adapters' entries dropped: about (1 - p)^2 = 0.25


# ------------------------------------------------------------------ the rules by hand


def test_ties_by_hand():
    """TIES on three task vectors (Yadav et al., Fig. 2): trim to the top 2 of 3, elect, disjoint mean."""
    t = [np.array([1.0, -2.0, 0.5]), np.array([-3.0, 1.0, 0.1]), np.array([2.0, 0.2, -4.0])]
    trimmed = [magnitude_prune_one(x, 2 / 3) for x in t]
    np.testing.assert_array_equal(trimmed[0], [1.0, -2.0, 0.0])
    np.testing.assert_array_equal(trimmed[2], [2.0, 0.0, -4.0])
    got = combine("ties", t, [1.0, 1.0, 1.0], density=2 / 3)
    # entry 0: 1 - 3 + 2 = 0 -> "+" wins ties: mean of 1, 2; entry 1: -2 + 1 = -1 -> "-": -2; entry 2: only -4
    np.testing.assert_allclose(got, [1.5, -2.0, -4.0])
    freq = combine("ties", t, [1.0, 1.0, 1.0], density=2 / 3, majority_sign_method="frequency")
    np.testing.assert_allclose(freq, [1.5, 1.0, -4.0])  # entry 1: signs -, +, 0 (trimmed): a tie, "+" wins
    t2 = [np.array([-5.0]), np.array([1.0]), np.array([1.0])]
    assert combine("ties", t2, [1, 1, 1], density=1.0)[0] == -5.0  # total: -3 -> "-"
    assert combine("ties", t2, [1, 1, 1], density=1.0, majority_sign_method="frequency")[0] == 1.0  # 2 of 3 are +


def test_sign_mask_and_disjoint_mean():
    stacked = np.array([[1.0, -1.0, 0.0], [2.0, 3.0, -1.0]])
    agree = majority_sign_mask(stacked)
    np.testing.assert_array_equal(agree, [[True, False, False], [True, True, True]])  # 0 never agrees
    np.testing.assert_allclose(disjoint_merge(stacked, agree), [1.5, 3.0, -1.0])


def test_dare_rescales_kept_entries():
    t = [np.array([1.0, 2.0, 3.0, 4.0])]
    got = combine("dare_linear", t, [2.0], density=0.5, masks=[np.array([1, 0, 0, 1])])
    np.testing.assert_allclose(got, [4.0, 0.0, 0.0, 16.0])  # 2 * t * m / 0.5


def test_magnitude_prune_keeps_int_density_times_size():
    x = np.arange(1.0, 11.0) * np.array([1, -1] * 5)
    kept = magnitude_prune_one(x, 0.35)  # int(3.5) = 3
    np.testing.assert_array_equal(np.nonzero(kept)[0], [7, 8, 9])


def test_svd_clamp_and_rank():
    model = peft_adapters()
    model.add_weighted_adapter(["a1", "a2"], WEIGHTS, "r2", combination_type="svd", svd_rank=2)
    model.add_weighted_adapter(["a1", "a2"], WEIGHTS, "cl", combination_type="svd", svd_clamp=0.5)
    lay = model.base_model.model.transformer.h[0].attn.c_attn
    assert lay.lora_A["r2"].weight.shape == (2, 32) and lay.r["r2"] == 2
    A, B = lay.lora_A["cl"].weight.data, lay.lora_B["cl"].weight.data
    hi = np.quantile(np.concatenate([B.ravel(), A.ravel()]), 1.0)
    assert np.abs(A).max() <= hi + 1e-7 and np.isclose(np.abs(np.concatenate([A.ravel(), B.ravel()])).max(), hi)


def test_negative_weight_linear_keeps_the_sign_on_A():
    model = get_peft_model(tiny_gpt(), LoraConfig(r=2, lora_alpha=4), adapter_name="a")
    for t in model.adapter_state_dict("a").values():
        t.data = np.random.default_rng(0).standard_normal(t.shape).astype(t.dtype)
    model.add_weighted_adapter(["a"], [-0.5], "neg", combination_type="ties")  # one adapter: linear (peft)
    lay = model.base_model.model.transformer.h[0].attn.c_attn
    np.testing.assert_allclose(lay.get_delta_weight("neg").data, -0.5 * lay.get_delta_weight("a").data, atol=1e-6)


def test_errors_leave_the_model_unchanged():
    model = peft_adapters()
    idx, _ = batch(T=6)
    before = logits(model, idx)
    cases = [
        (dict(combination_type="ties"), "needs density"),
        (dict(combination_type="dare_ties", density=0.0), "density must be > 0"),
        (dict(combination_type="nope"), "combination_type must be one of"),
        (dict(combination_type="ties", density=0.5, majority_sign_method="mean"), "majority_sign_method"),
        (dict(combination_type="svd", svd_driver="gesvdj"), "svd_driver"),
        (dict(combination_type="dare_linear", density=0.5, dare_masks={}), "dare_masks has no mask"),
        (dict(combination_type="dare_linear", density=0.5,
              dare_masks={**masks_of("dare_linear"), "x.lora_A.a1": np.ones(3)}), "masks for no tensor"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            model.add_weighted_adapter(["a1", "a2"], WEIGHTS, "bad", **kw)
        assert "bad" not in model.peft_config
    bad_shape = {k: v[:1] for k, v in masks_of("dare_linear").items()}
    with pytest.raises(ValueError, match="has shape"):
        model.add_weighted_adapter(["a1", "a2"], WEIGHTS, "bad", combination_type="dare_linear", density=0.5,
                                   dare_masks=bad_shape)
    assert not any("bad" in n for n, _ in model.named_parameters())
    np.testing.assert_array_equal(logits(model, idx), before)


# ------------------------------------------------------------------ live, against peft on the CPU


@pytest.mark.parametrize("combination_type", ["ties_svd", "magnitude_prune", "dare_ties", "cat"])
def test_live_against_peft(combination_type):
    """Other weights, density and svd_rank than the fixture's, peft running beside minipeft.

    (Not svd_clamp: it clamps to a quantile of the *signed* entries of U S and Vᵀ, whose
    signs are LAPACK's choice, so torch and NumPy may clamp different entries.)
    """
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import GPT2LMHeadModel
    weights, kw = [1.3, 0.6], dict(density=0.3, majority_sign_method="frequency", svd_rank=3)
    theirs = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(HF_DIR).eval(),
                                            os.path.join(FIXTURES, "peft_merge", "a1"), adapter_name="a1").eval()
    theirs.load_adapter(os.path.join(FIXTURES, "peft_merge", "a2"), adapter_name="a2")
    # DARE's masks come from torch's global generator: seeded, so the test is the same on every run. Unseeded,
    # 40 draws gave relative errors from 1e-7 to 1.1e-5 (median 8.8e-7) and one CI run 3.6e-5: float32 rounding
    # that some masks amplify (kept entries are rescaled by 1/density before the sign election).
    torch.manual_seed(0)
    drawn, real = [], torch.bernoulli
    torch.bernoulli = lambda p, *a, **k: drawn.append(real(p, *a, **k)) or drawn[-1]
    try:
        theirs.add_weighted_adapter(["a1", "a2"], weights, "m", combination_type=combination_type, **kw)
    finally:
        torch.bernoulli = real
    theirs.set_adapter("m")
    ids = np.random.default_rng(9).integers(0, 100, (2, 7))
    with torch.no_grad():
        want = theirs(input_ids=torch.tensor(ids)).logits.float().numpy()
    masks, it = {}, iter(drawn)
    for name, m in theirs.named_modules():  # peft's draw order: module by module, A's then B's, adapter by adapter
        if hasattr(m, "lora_A") and "m" in m.lora_A and drawn:
            for part in ("lora_A", "lora_B"):
                for a in (x for x in ("a1", "a2") if x in m.lora_A):
                    masks[f"{name}.{part}.{a}"] = next(it).numpy()
    model = peft_adapters()
    model.add_weighted_adapter(["a1", "a2"], weights, "m", combination_type=combination_type,
                               **kw, **({"dare_masks": masks} if masks else {}))
    model.set_adapter("m")
    assert rel_err(logits(model, ids), want) < REL_TOL


@pytest.mark.parametrize("rule", ["task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_rules_on_every_backend(xp, to_xp, rule):
    """The same merge on NumPy and (marked gpu) CuPy: the same numbers."""
    rng = np.random.default_rng(0)
    t = [rng.standard_normal((6, 5)).astype(np.float32) for _ in range(3)]
    masks = [rng.random((6, 5)) < 0.6 for _ in range(3)]
    kw = dict(density=0.6, majority_sign_method="frequency")
    want = combine(rule, t, [0.5, -1.0, 2.0], masks=masks, **kw)
    got = combine(rule, [to_xp(x) for x in t], [0.5, -1.0, 2.0], masks=[to_xp(m) for m in masks], **kw)
    np.testing.assert_allclose(to_numpy(got), want, rtol=1e-6, atol=1e-6)
