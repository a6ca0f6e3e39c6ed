"""LoRA on slices of a fused projection (``LoraConfig.enable_lora``, loralib's MergedLinear).

Gradients, identity at init, merge/unmerge, zero rows of disabled slices (also after
training), parameter count, save -> load (as the equivalent plain LoRA), peft loading
the file (where peft is installed), bad input.
"""
import json
import math
import os

import numpy as np
import pytest

from minipeft.gpt import GPT, GPTConfig
from minipeft.optim import AdamW
from minipeft.peft import LoraConfig, LoraLayer, get_peft_model, load_adapter, save_adapter
from minipeft.peft.lora_slices import block_lora_B
from minipeft.testing import gradcheck_module

from . import base_weights, batch, linear, logits, perturb, tiny_gpt, x_input
from .test_io import HF_DIR, REL_TOL, rel_err

QV = [True, False, True]  # W_q and W_v of GPT-2's c_attn, as the LoRA paper adapts


def sliced_layer(n_in=5, n_out=9, r=2, enable_lora=QV, seed=0, **kw) -> LoraLayer:
    layer = LoraLayer(linear(n_in, n_out, seed=seed))
    layer.update_layer("default", LoraConfig(r=r, enable_lora=enable_lora, **kw), np.random.default_rng(seed))
    layer.set_adapter("default")
    return layer


def c_attn(model, i=0):
    return model.get_base_model().transformer.h[i].attn.c_attn


def qv_model(r=2, lora_alpha=8, **kw):
    return get_peft_model(tiny_gpt(), LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=["c_attn"],
                                                 enable_lora=QV, **kw))


# ----------------------------------------------------------------- shapes, count, gradients


def test_shapes_and_trainable_count_formula():
    layer = sliced_layer(n_in=5, n_out=9, r=2)  # 3 slices of q = 3 rows, 2 enabled
    assert layer.lora_A["default"].weight.shape == (2 * 2, 5)  # (n r, in)
    assert layer.lora_B["default"].weight.shape == (2 * 3, 2)  # (n q, r)
    model = qv_model(r=2)  # tiny GPT: C = 16, c_attn (48, 16), 2 layers
    trainable, _ = model.get_nb_trainable_parameters()
    n, r, d_in, q = 2, 2, 16, 48 // 3
    assert trainable == 2 * n * r * (d_in + q) == 256
    plain = get_peft_model(tiny_gpt(), LoraConfig(r=2, target_modules=["c_attn"]))
    assert plain.get_nb_trainable_parameters()[0] == 2 * r * (d_in + 48)  # the whole layer, for contrast


@pytest.mark.parametrize("enable_lora", [QV, [False, True], [True, True, True]])
def test_sliced_layer_gradcheck_float64(enable_lora):
    n_out = 3 * len(enable_lora)
    layer = sliced_layer(n_out=n_out, enable_lora=enable_lora)
    B = layer.lora_B["default"].weight
    B.data = np.random.default_rng(2).standard_normal(B.shape)  # B != 0: A and x get a gradient through it
    x = x_input((2, 4, 5))
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert names == ["lora_A.default.weight", "lora_B.default.weight"]
    gradcheck_module(layer, lambda m: m(x), extra_inputs=[x])


def test_init_identity_and_kaiming_A():
    base = tiny_gpt()
    idx, _ = batch()
    y0 = logits(base, idx)
    model = qv_model(r=4, lora_alpha=32)
    np.testing.assert_array_equal(logits(model, idx), y0)
    layer = c_attn(model)
    assert not layer.lora_B["default"].weight.data.any()  # B_i = 0
    A = layer.lora_A["default"].weight.data
    assert np.abs(A).max() <= 1 / math.sqrt(16) and np.abs(A).max() > 0.5 / math.sqrt(16)  # U(±1/sqrt(in))
    assert layer.scaling["default"] == 32 / 4
    assert c_attn(qv_model(r=4, lora_alpha=32, use_rslora=True)).scaling["default"] == 32 / 2


def test_forward_is_base_plus_block_delta():
    """y = W0 x + b + s [B_1 A_1 x; 0; B_3 A_3 x]: checked against the block matrix B' (out, n r)."""
    layer = sliced_layer(n_in=5, n_out=9, r=2, lora_alpha=3)
    B = layer.lora_B["default"].weight
    B.data = np.random.default_rng(3).standard_normal(B.shape)
    x = x_input((3, 5), requires_grad=False)
    Bp = block_lora_B(B.data, QV, 2)  # (9, 4)
    assert Bp.shape == (9, 4) and not Bp[3:6].any() and not Bp[:3, 2:].any() and not Bp[6:, :2].any()
    W0, b = layer.base_layer.weight.data, layer.base_layer.bias.data
    want = x.data @ W0.T + b + 1.5 * x.data @ (Bp @ layer.lora_A["default"].weight.data).T
    np.testing.assert_allclose(layer(x).data, want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------- merging


def test_merge_equals_unmerged_and_unmerge_restores_base():
    model = qv_model()
    perturb(model, 0.3)
    idx, _ = batch()
    y = logits(model, idx)
    w0 = base_weights(model)
    model.merge_adapter()
    np.testing.assert_allclose(logits(model, idx), y, rtol=1e-5, atol=1e-5)
    w, w0_attn = c_attn(model).base_layer.weight.data, w0["base_model.model.transformer.h.0.attn.c_attn.base_layer.weight"]
    assert not np.array_equal(w[:16], w0_attn[:16]) and not np.array_equal(w[32:], w0_attn[32:])  # W_q, W_v moved
    np.testing.assert_array_equal(w[16:32], w0_attn[16:32])  # W_k: merging added exact zeros
    model.unmerge_adapter()
    for n, a in base_weights(model).items():
        np.testing.assert_allclose(a, w0[n], rtol=0, atol=1e-6, err_msg=n)
    np.testing.assert_array_equal(c_attn(model).base_layer.weight.data[16:32], w0_attn[16:32])
    np.testing.assert_allclose(logits(model, idx), y, rtol=1e-5, atol=1e-5)
    merged = model.merge_and_unload()
    np.testing.assert_allclose(logits(merged, idx), y, rtol=1e-5, atol=1e-5)


def test_disabled_rows_are_zero_and_stay_zero_after_training():
    model = get_peft_model(GPT(GPTConfig.preset("T0"), seed=0).eval(),
                           LoraConfig(r=4, lora_alpha=32, target_modules=["c_attn"], enable_lora=QV))
    C = model.config.n_embd
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    rng = np.random.default_rng(0)
    V, T = model.config.vocab_size, min(16, model.config.block_size)
    idx, losses = rng.integers(0, V, (2, T)), []
    for _ in range(4):
        opt.zero_grad()
        out = model(idx, idx)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    for block in model.get_base_model().transformer.h:
        layer = block.attn.c_attn
        delta = layer.get_delta_weight("default").data  # (3C, C)
        assert delta.shape == (3 * C, C)
        assert not delta[C:2 * C].any()  # W_k: exactly zero
        assert np.abs(delta[:C]).max() > 1e-4 and np.abs(delta[2 * C:]).max() > 1e-4  # W_q, W_v trained
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------- files


def test_save_writes_plain_lora_and_load_gives_same_logits(tmp_path):
    model = qv_model(r=2, lora_alpha=8)
    perturb(model, 0.3)
    idx, _ = batch()
    y = logits(model, idx)
    save_adapter(model, tmp_path)
    d = json.load(open(os.path.join(tmp_path, "adapter_config.json")))
    assert "enable_lora" not in d
    assert (d["r"], d["lora_alpha"]) == (4, 16)  # r' = 2 r, alpha' = alpha r'/r: scaling 4 kept
    from safetensors.numpy import load_file
    t = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"
    assert t[key].shape == (48, 4) and not t[key][16:32].any()
    assert t[key.replace("lora_B", "lora_A")].shape == (4, 16)
    loaded = load_adapter(tiny_gpt(), tmp_path)
    np.testing.assert_array_equal(logits(loaded, idx), y)
    layer = c_attn(loaded)
    assert layer.enable_lora["default"] is None and layer.r["default"] == 4  # a plain rank-r' LoRA now
    np.testing.assert_allclose(layer.get_delta_weight("default").data, c_attn(model).get_delta_weight("default").data,
                               rtol=1e-6, atol=1e-7)


def test_save_rslora_and_rank_pattern_keep_every_scaling(tmp_path):
    cfg = LoraConfig(r=2, lora_alpha=8, use_rslora=True, target_modules=["c_attn"], enable_lora=QV,
                     rank_pattern={"h.1.attn.c_attn": 4}, alpha_pattern={"h.0.attn.c_attn": 5})
    model = get_peft_model(tiny_gpt(), cfg)
    perturb(model, 0.3)
    idx, _ = batch()
    y = logits(model, idx)
    save_adapter(model, tmp_path)
    d = json.load(open(os.path.join(tmp_path, "adapter_config.json")))
    assert d["r"] == 4 and d["rank_pattern"] == {"h.1.attn.c_attn": 8}
    assert d["lora_alpha"] == pytest.approx(8 * math.sqrt(2)) and d["alpha_pattern"]["h.0.attn.c_attn"] == (
        pytest.approx(5 * math.sqrt(2)))
    loaded = load_adapter(tiny_gpt(), tmp_path)
    for i in (0, 1):
        assert c_attn(loaded, i).scaling["default"] == pytest.approx(c_attn(model, i).scaling["default"])
    np.testing.assert_allclose(logits(loaded, idx), y, rtol=1e-6, atol=1e-6)
    # the config in memory still says slices; only the file is plain
    assert model.peft_config["default"].enable_lora == QV and model.peft_config["default"].r == 2


def test_minipeft_sliced_file_loads_into_peft(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from transformers import GPT2LMHeadModel

    model = get_peft_model(GPT.from_hf(HF_DIR), LoraConfig(r=4, lora_alpha=32, target_modules=["c_attn"],
                                                           enable_lora=QV))
    perturb(model, 0.3, seed=3)
    ids = np.random.default_rng(4).integers(0, 100, (2, 10))
    ours = logits(model, ids)
    save_adapter(model, tmp_path, base_model_name_or_path=HF_DIR)
    hf = GPT2LMHeadModel.from_pretrained(HF_DIR).eval()
    theirs_model = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    with torch.no_grad():
        theirs = theirs_model(input_ids=torch.tensor(ids)).logits.float().numpy()
    assert rel_err(ours, theirs) < REL_TOL
    with theirs_model.disable_adapter(), torch.no_grad():
        plain = theirs_model(input_ids=torch.tensor(ids)).logits.float().numpy()
    assert rel_err(ours, plain) > 100 * REL_TOL  # the adapter changed the outputs: the check above is not vacuous


# ----------------------------------------------------------------- bad input


def test_bad_enable_lora_raises():
    with pytest.raises(ValueError, match="enables no slice"):
        LoraConfig(enable_lora=[False, False, False])
    with pytest.raises(ValueError, match="use_dora"):
        LoraConfig(enable_lora=QV, use_dora=True)
    with pytest.raises(TypeError, match="list of bools"):
        LoraConfig(enable_lora=[1, 0, 1])
    with pytest.raises(TypeError, match="list of bools"):
        LoraConfig(enable_lora="qv")
    with pytest.raises(ValueError, match=r"out_features=64, which is not divisible by 3"):
        get_peft_model(tiny_gpt(), LoraConfig(target_modules=["c_fc"], enable_lora=QV))  # c_fc: (4C, C)
    with pytest.raises(ValueError, match=r"r=17 is larger .* out=16 per slice"):
        get_peft_model(tiny_gpt(), LoraConfig(r=17, target_modules=["c_attn"], enable_lora=QV))
    model = qv_model()
    with pytest.raises(ValueError, match="enable_lora"):
        model.add_weighted_adapter(["default"], [1.0], "combo", combination_type="cat")


def test_tuple_accepted_and_delete_adapter_cleans_up():
    model = get_peft_model(tiny_gpt(), LoraConfig(r=2, target_modules=["c_attn"], enable_lora=(False, True, True)))
    assert model.peft_config["default"].enable_lora == [False, True, True]
    model.add_adapter("whole", LoraConfig(r=2, target_modules=["c_attn"]))
    layer = c_attn(model)
    assert layer.enable_lora == {"default": [False, True, True], "whole": None}
    assert layer.lora_B["whole"].weight.shape == (48, 2)
    model.delete_adapter("whole")
    assert layer.enable_lora == {"default": [False, True, True]}
