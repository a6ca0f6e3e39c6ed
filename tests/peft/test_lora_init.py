"""LoRA's initialisations from the base weight (lora_init.py): PiSSA, OLoRA, LoftQ; against peft.

Fixtures (tests/fixtures/make_peft_init_merge_fixtures.py, made by peft 0.21 on the CPU):
``peft_lora_init.safetensors`` (residual weights and s·B·A of two nn.Linear layers for each
init) and ``peft_pissa*`` (PiSSA on the tiny GPT-2: init, "trained", and converted to plain
LoRA by peft's ``path_initial_model_for_weight_conversion``). Factors are compared through
s·B·A only: the signs of singular vectors and QR columns are arbitrary.
"""
import json
import os
import tempfile
import warnings

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from minipeft.engine import Tensor
from minipeft.backend import to_numpy
from minipeft.gpt import GPT
from minipeft.nn import Linear, Parameter
from minipeft.peft import LoraConfig, from_pretrained, get_peft_model, save_adapter
from minipeft.peft.lora import LoraLayer
from minipeft.peft.lora_init import LoftQConfig, loftq, quantize_roundtrip, svd_lowrank
from minipeft.quant.modules import Linear4bit

from . import batch, logits, perturb, tiny_gpt

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")
HF_DIR = os.path.join(FIXTURES, "hf_gpt2_tiny")
INIT_FILE = os.path.join(FIXTURES, "peft_lora_init.safetensors")
PISSA_DIR = os.path.join(FIXTURES, "peft_pissa")


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def init_layer(weight, **fields) -> LoraLayer:
    layer = LoraLayer(Linear.from_weight(Parameter(np.array(weight))))
    layer.update_layer("default", LoraConfig(**fields), np.random.default_rng(0), name="fc")
    layer.set_adapter("default")
    return layer


def residual_and_delta(layer):
    return layer.base_layer.weight.data, layer.get_delta_weight("default").data


# ------------------------------------------------------------------ against peft: layer level

REF = load_file(INIT_FILE)
CASES = json.loads(safe_open(INIT_FILE, "np").metadata()["fixture"])["cases"]


@pytest.mark.parametrize("case", [c for c in CASES if c != "pissa_niter_4"])
@pytest.mark.parametrize("fc", ["fc1", "fc2"])
def test_init_matches_peft(case, fc):
    """Residual base weight and s·B·A equal peft's (LoftQ's NF4 / int8 grid values bit for bit or nearly)."""
    res, delta = residual_and_delta(init_layer(REF[f"in.{fc}.weight"], target_modules=[fc], **CASES[case]))
    tol = 1e-4 if case.startswith("pissa_niter") else 1e-5  # a converged randomized SVD; float32 rounding
    assert rel_err(res, REF[f"{case}.{fc}.residual"]) < tol
    assert rel_err(delta, REF[f"{case}.{fc}.delta"]) < tol
    assert rel_err(delta, 0 * delta + 1e-30) > 0.01  # the adapter is far from zero


@pytest.mark.parametrize("fc", ["fc1", "fc2"])
def test_pissa_niter_4_is_as_close_to_pissa_as_peft(fc):
    """Few subspace iterations: torch's and NumPy's random projections differ, so compare errors, not values."""
    W = REF[f"in.{fc}.weight"]
    exact = REF[f"pissa.{fc}.delta"]  # U_r S_r V_rᵀ whatever the scaling
    _, ours = residual_and_delta(init_layer(W, target_modules=[fc], **CASES["pissa_niter_4"]))
    theirs_err = rel_err(REF[f"pissa_niter_4.{fc}.delta"], exact)
    ours_err = rel_err(ours, exact)
    assert 0 < ours_err < max(5 * theirs_err, 1e-3) and ours_err < 0.2, (ours_err, theirs_err)


def test_svd_lowrank_converges_to_the_truncated_svd():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((30, 50)) @ np.diag(0.5 ** np.arange(50)) @ np.linalg.qr(rng.standard_normal((50, 50)))[0]
    U, S, V = svd_lowrank(W, 3, niter=20, rng=np.random.default_rng(1))  # error ~ (s_4/s_3)^(2 niter+1)
    u, s, vh = np.linalg.svd(W)
    np.testing.assert_allclose(S, s[:3], rtol=1e-8)
    np.testing.assert_allclose(U * S @ V.T, (u[:, :3] * s[:3]) @ vh[:3], atol=1e-8)
    assert U.shape == (30, 3) and V.shape == (50, 3)


# ------------------------------------------------------------------ invariants


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_identity_at_init_and_principal_part(init):
    """W_res + s·B·A = W; PiSSA's s·B·A is the best rank-r approximation of W, W_res the rest."""
    W = np.random.default_rng(2).standard_normal((12, 20))
    layer = init_layer(W, r=3, lora_alpha=6, init_lora_weights=init)
    res, delta = residual_and_delta(layer)
    np.testing.assert_allclose(res + delta, W, atol=1e-12)
    u, s, vh = np.linalg.svd(W)
    if init == "pissa":
        np.testing.assert_allclose(delta, (u[:, :3] * s[:3]) @ vh[:3], atol=1e-12)
        np.testing.assert_allclose(np.linalg.svd(res, compute_uv=False)[:9], s[3:], atol=1e-12)
    if init == "olora":  # B has orthonormal columns: Q of W's QR
        B = layer.lora_B["default"].weight.data
        np.testing.assert_allclose(B.T @ B, np.eye(3), atol=1e-12)
    x = np.random.default_rng(3).standard_normal((4, 20))
    np.testing.assert_allclose(layer(Tensor(x)).data, x @ W.T, atol=1e-12)


def test_loftq_beats_plain_quantization_and_leaves_the_base_on_the_nf4_grid():
    W = np.random.default_rng(4).standard_normal((48, 64)).astype(np.float32)
    q_err = np.linalg.norm(W - quantize_roundtrip(W, 4))
    errs = []
    for T in (1, 2, 4):
        A, B, Q = loftq(W, r=8, bits=4, num_iter=T)
        errs.append(np.linalg.norm(W - Q - B @ A))
        np.testing.assert_array_equal(quantize_roundtrip(Q, 4), Q)  # requantizing the base is exact
    assert max(errs) < 0.9 * q_err and errs[-1] <= errs[0] * 1.01, (errs, q_err)
    layer = init_layer(W, r=8, lora_alpha=8, init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4))
    res, delta = residual_and_delta(layer)
    np.testing.assert_array_equal(res, loftq(W, 8)[2])
    assert np.linalg.norm(W - res - delta) == pytest.approx(errs[0], rel=1e-5)


def test_gaussian_init_has_peft_spread():
    layer = init_layer(np.zeros((64, 256)), r=4, lora_alpha=8, init_lora_weights="gaussian")
    A, B = layer.lora_A["default"].weight.data, layer.lora_B["default"].weight.data
    assert A.std() == pytest.approx(1 / 4, rel=0.05) and not B.any()


def test_pissa_model_save_load_and_disable():
    """Saved with init "pissa", the adapter reloads onto a fresh base (the init re-runs, then the file's factors)."""
    model = get_peft_model(tiny_gpt(), LoraConfig(r=2, init_lora_weights="pissa", target_modules=["c_attn", "c_fc"]))
    idx, _ = batch()
    np.testing.assert_allclose(logits(model, idx), logits(tiny_gpt(), idx), atol=1e-5)
    with model.disable_adapter():  # the residual model, as in peft
        assert np.abs(logits(model, idx) - logits(tiny_gpt(), idx)).max() > 1e-2
    assert [n for n, p in model.named_parameters() if p.requires_grad and "lora" not in n] == []
    perturb(model, 0.05)
    y = logits(model, idx)
    with tempfile.TemporaryDirectory() as d:
        save_adapter(model, d)
        assert json.load(open(os.path.join(d, "adapter_config.json")))["init_lora_weights"] == "pissa"
        np.testing.assert_allclose(logits(from_pretrained(tiny_gpt(), d), idx), y, atol=1e-5)
    model.merge_adapter()
    np.testing.assert_allclose(logits(model, idx), y, atol=1e-5)


# ------------------------------------------------------------------ PiSSA on GPT-2 and the conversion, against peft

PISSA = load_file(os.path.join(FIXTURES, "peft_pissa_logits.safetensors"))


def test_pissa_gpt2_matches_peft():
    ids = PISSA["input_ids"]
    model = get_peft_model(GPT.from_hf(HF_DIR), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                           init_lora_weights="pissa"))
    for i, block in enumerate(model.base_model.model.transformer.h):
        res, delta = block.attn.c_attn.base_layer.weight.data, block.attn.c_attn.get_delta_weight("default").data
        assert rel_err(res, PISSA[f"h{i}.residual"]) < 1e-5 and rel_err(delta, PISSA[f"h{i}.delta"]) < 1e-5
    assert rel_err(logits(model, ids), PISSA["init_logits"]) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's newer config keys
        trained = from_pretrained(GPT.from_hf(HF_DIR), os.path.join(PISSA_DIR, "trained"))
    assert rel_err(logits(trained, ids), PISSA["trained_logits"]) < 1e-5
    assert rel_err(PISSA["trained_logits"], PISSA["base_logits"]) > 0.05


def test_conversion_to_plain_lora_writes_peft_file(tmp_path):
    """With peft's own initial folder, the converted file equals peft's, tensor for tensor and field for field;
    with minipeft's initial folder, the converted adapter on the *original* base gives the trained logits."""
    ids = PISSA["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = from_pretrained(GPT.from_hf(HF_DIR), os.path.join(PISSA_DIR, "trained"))
        save_adapter(trained, tmp_path / "c", path_initial_model_for_weight_conversion=os.path.join(PISSA_DIR, "init"))
    theirs = load_file(os.path.join(PISSA_DIR, "converted", "adapter_model.safetensors"))
    ours = load_file(str(tmp_path / "c" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    c_theirs = json.load(open(os.path.join(PISSA_DIR, "converted", "adapter_config.json")))
    c_ours = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert {k: c_theirs[k] for k in c_ours} == c_ours and c_ours["r"] == 8 and c_ours["init_lora_weights"] is True

    model = get_peft_model(GPT.from_hf(HF_DIR), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                           init_lora_weights="pissa"))
    save_adapter(model, tmp_path / "init")
    model.load_peft_state_dict(load_file(os.path.join(PISSA_DIR, "trained", "adapter_model.safetensors")))
    save_adapter(model, tmp_path / "ours", path_initial_model_for_weight_conversion=tmp_path / "init")
    plain = from_pretrained(GPT.from_hf(HF_DIR), tmp_path / "ours")
    assert rel_err(logits(plain, ids), logits(model, ids)) < 1e-5


# ------------------------------------------------------------------ errors


def test_bad_init_arguments_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="pissa_niter_K"):
        LoraConfig(init_lora_weights="pissa_niter_x")
    with pytest.raises(ValueError, match="needs loftq_config"):
        LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ValueError, match="only with init_lora_weights='loftq'"):
        LoraConfig(loftq_config={"loftq_bits": 4})
    with pytest.raises(ValueError, match="loftq_bits must be 4"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 2, "loftq_iter": 1})
    with pytest.raises(ValueError, match="enable_lora"):
        LoraConfig(init_lora_weights="olora", enable_lora=[True, False, True])
    q = LoraLayer(Linear4bit(Linear(16, 8, rng=0)))
    with pytest.raises(TypeError, match="quantize the residual"):
        q.update_layer("default", LoraConfig(init_lora_weights="pissa"), np.random.default_rng(0))
    model = get_peft_model(tiny_gpt(), LoraConfig(r=2, target_modules=["c_attn"]))
    save_adapter(model, tmp_path / "lora")
    with pytest.warns(UserWarning, match="change the base weights"):
        model.add_adapter("r4", LoraConfig(r=4, init_lora_weights="pissa", target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="initial factors"):
        save_adapter(model, tmp_path / "x", "r4", path_initial_model_for_weight_conversion=tmp_path / "lora")


# ------------------------------------------------------------------ live, against peft on the CPU


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_live_against_peft(init):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    W = np.random.default_rng(5).standard_normal((14, 22)).astype(np.float32)
    lin = torch.nn.Sequential(torch.nn.Linear(22, 14))
    with torch.no_grad():
        lin[0].weight.copy_(torch.from_numpy(W))
    pm = peft.get_peft_model(lin, peft.LoraConfig(r=3, lora_alpha=5, target_modules=["0"], init_lora_weights=init))
    lay = pm.base_model.model[0]
    res, delta = residual_and_delta(init_layer(W, r=3, lora_alpha=5, init_lora_weights=init))
    assert rel_err(res, lay.base_layer.weight.detach().numpy()) < 1e-5
    assert rel_err(delta, lay.get_delta_weight("default").detach().numpy()) < 1e-5


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3", "olora", "loftq"])
def test_inits_on_every_backend(xp, to_xp, init):
    """The same init on NumPy and (marked gpu) CuPy: the same residual and s·B·A (LoftQ's grid exactly)."""
    W = np.random.default_rng(6).standard_normal((16, 24)).astype(np.float32)
    fields = dict(r=3, lora_alpha=6, init_lora_weights=init,
                  loftq_config={"loftq_bits": 4, "loftq_iter": 2} if init == "loftq" else {})
    want = residual_and_delta(init_layer(W, **fields))
    layer = LoraLayer(Linear.from_weight(Parameter(to_xp(W))))
    layer.update_layer("default", LoraConfig(**fields), np.random.default_rng(0), name="fc")
    got = [to_numpy(a) for a in residual_and_delta(layer)]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
