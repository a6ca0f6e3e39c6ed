"""Side-Tuning, LST and QST: a frozen backbone that saves nothing, gradients, QST's identity, files."""
import copy

import numpy as np
import pytest

from minipeft import engine
from minipeft.engine import no_grad
from minipeft.memory import MethodConfig, StepSetup, estimate_memory
from minipeft.peft import (LSTConfig, PeftConfig, QSTConfig, SideTuningConfig, get_peft_model, held_leaf_bytes,
                           load_adapter, save_adapter, set_alpha)
from minipeft.peft.side_tuning import SideTuningMethod
from minipeft.quant.modules import Linear4bit, quantize_model
from minipeft.testing import gradcheck_module

from . import batch, perturb, tiny_gpt, train

CONFIGS = {"SIDE_TUNING": lambda **kw: SideTuningConfig(**kw), "LST": lambda **kw: LSTConfig(**kw),
           "QST": lambda **kw: QSTConfig(**kw)}
# backbone hidden states each method's graph keeps: LST/QST read h_0..h_L (QST's mix reuses h_L);
# Side-Tuning reads h_0 and mixes with h_L
HELD_STATES = {"SIDE_TUNING": lambda L: 2, "LST": lambda L: L + 1, "QST": lambda L: L + 1}


def side_model(kind, dtype="float32", n_embd=16, **kw):
    base = tiny_gpt(dtype, n_embd=n_embd)
    return base, get_peft_model(copy.deepcopy(base), CONFIGS[kind](**kw))


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_backbone_gets_no_gradient_and_saves_nothing(kind):
    _, model = side_model(kind)
    idx, tg = batch()
    base = model.get_base_model()
    s0 = engine.saved_bytes()
    with no_grad():
        hidden = base(idx, output_hidden_states=True).hidden_states
    assert engine.saved_bytes() == s0  # the backbone's forward records nothing
    side_loss = SideTuningMethod.side_logits(model, hidden).sum()  # the side path alone, on constant states
    side_only = engine.saved_bytes() - s0
    del side_loss
    s0 = engine.saved_bytes()
    loss = model(idx, tg).loss
    whole = engine.saved_bytes() - s0
    # everything saved for backward is the side network's (+ the loss op's probabilities and targets)
    ce = 2 * 8 * (23 * 4 + 8 + 1)  # cross_entropy: float32 probs (N, V), int64 targets, bool valid
    assert whole == side_only + ce
    B, T, C = 2, 8, 16
    assert held_leaf_bytes(loss, model) == HELD_STATES[kind](2) * B * T * C * 4  # backbone states, measured
    loss.backward()
    for n, p in model.named_parameters():
        is_side = n.startswith("side_network.")
        assert p.requires_grad == is_side, n
        assert (p.grad is not None) == is_side, n
    assert engine.saved_bytes() == s0  # backward released everything


def test_lst_memory_equals_the_calculator():
    """LST's structure is the calculator's: same trainable count, ledger within a few scalar gates' bytes."""
    base = tiny_gpt(n_embd=32, vocab_size=23, block_size=32)
    model = get_peft_model(base, LSTConfig())
    idx, tg = batch(B=3, T=16)
    s0 = engine.saved_bytes()
    loss = model(idx, tg).loss
    ledger, held = engine.saved_bytes() - s0, held_leaf_bytes(loss, model)
    kw = dict(method="side", reduction_factor=8)
    pred = estimate_memory(base.config, MethodConfig(**kw), StepSetup(batch_size=3, seq_len=16, ledger_view=True))
    full = estimate_memory(base.config, MethodConfig(**kw), StepSetup(batch_size=3, seq_len=16))
    assert sum(p.size for p in model.parameters() if p.requires_grad) == pred.n_trainable
    assert 0 <= ledger - pred.activations <= 64  # the gates' scalars
    assert held == full.activations - pred.activations  # the calculator's "down_i inputs (backbone states)"


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_side_network_gradcheck_float64(kind):
    _, model = side_model(kind, dtype="float64", n_embd=16, seed=3, downsample_rank=2)  # rank: QST's adapters
    perturb(model, scale=0.3, seed=1)  # gates, alpha (QST: off 1, so the side path has gradient) and weights
    idx, _ = batch(T=5)
    gradcheck_module(model, lambda m: m(idx).logits)


@pytest.mark.parametrize("cfg", [QSTConfig(), SideTuningConfig(alpha=1.0)])
def test_alpha_one_returns_the_base_model_output_exactly(cfg):
    base = tiny_gpt()
    ref = copy.deepcopy(base)
    if cfg.peft_type == "QST":
        quantize_model(ref, quant_type="nf4", blocksize=64, compress_statistics=True)  # what QST does
    model = get_peft_model(base, cfg)
    idx, tg = batch()
    out, want = model(idx, tg), ref(idx, tg)
    np.testing.assert_array_equal(out.logits.data, want.logits.data)
    assert out.loss.item() == want.loss.item()
    with model.disable_adapter():
        np.testing.assert_array_equal(model(idx).logits.data, want.logits.data)


def test_qst_quantizes_the_backbone_and_starts_at_it():
    base = tiny_gpt()
    float_logits = base(batch()[0]).logits.data
    model = get_peft_model(base, QSTConfig())
    assert sum(isinstance(m, Linear4bit) for m in base.modules()) == 8  # 2 blocks x 4 Linear; lm_head stays
    net = model.side_network["default"]
    assert net.alpha.data.tolist() == [1.0] and net.gates.data.tolist() == [0.0, 0.0]
    assert net.h[0].attn.c_attn.weight.shape == (3 * 1, 1)  # width 16 / 16 = 1
    # the NF4 base is close to the float one, and QST reproduces the NF4 base
    assert np.abs(model(batch()[0]).logits.data - float_logits).max() < 0.05
    unquantized = get_peft_model(tiny_gpt(), QSTConfig(quantize_backbone=False))
    np.testing.assert_array_equal(unquantized(batch()[0]).logits.data, float_logits)


def test_lst_gates_start_at_one_half_and_lst_is_not_the_base():
    base, model = side_model("LST")
    net = model.side_network["default"]
    assert len(net.downsample) == 3 and len(net.h) == 2 and net.h[0].ln_1.weight.shape == (2,)  # 16 / 8
    mu = 1 / (1 + np.exp(-net.gates.data / 0.1))
    np.testing.assert_allclose(mu, 0.5)
    idx, _ = batch()
    assert not np.allclose(model(idx).logits.data, base(idx).logits.data)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_training_lowers_the_loss_and_leaves_the_backbone(kind):
    base, model = side_model(kind)
    frozen = {n: p.data.copy() for n, p in model.get_base_model().named_parameters()}
    losses = train(model, steps=4, lr=0.5)
    assert losses[-1] < losses[0]
    for n, p in model.get_base_model().named_parameters():
        np.testing.assert_array_equal(p.data, frozen[n])


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_save_load_round_trip_gives_identical_outputs(kind, tmp_path):
    base, model = side_model(kind)
    perturb(model, scale=0.1, seed=2)
    idx, _ = batch()
    want = model(idx).logits.data.copy()
    save_adapter(model, tmp_path)
    loaded = load_adapter(copy.deepcopy(base), tmp_path)
    assert loaded.peft_config["default"].to_dict() == {**model.peft_config["default"].to_dict(),
                                                       "inference_mode": True}
    np.testing.assert_array_equal(loaded(idx).logits.data, want)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference
    again = load_adapter(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert all(p.requires_grad == n.startswith("side_network.") for n, p in again.named_parameters())


def test_config_json_round_trip_and_minipeft_keys():
    for cfg in (SideTuningConfig(alpha=0.3, num_side_layers=1), LSTConfig(reduction_factor=4),
                QSTConfig(downsample="avgpool", quant_type="fp4")):
        d = cfg.to_dict()
        assert PeftConfig.from_dict(d) == cfg
        assert "target_modules" not in d
    assert "alpha" not in LSTConfig().to_dict() and "gate_init" not in SideTuningConfig().to_dict()


def test_avgpool_downsample_holds_only_pooled_states():
    _, model = side_model("LST", downsample="avgpool")
    assert not any("downsample" in n for n, _ in model.named_parameters())
    loss = model(*batch()).loss
    # only the pooled states (B, T, d/r) stay for the gates' backward: r times less than the states themselves
    assert held_leaf_bytes(loss, model) == 3 * 2 * 8 * (16 // 8) * 4


def test_adapters_switch_and_only_the_active_one_trains():
    base, model = side_model("QST")
    model.add_adapter("other", QSTConfig(seed=1))
    perturb(model, scale=0.2, seed=0)
    idx, _ = batch()
    a = model(idx).logits.data.copy()
    model.set_adapter("other")
    assert not np.array_equal(model(idx).logits.data, a)
    trainable = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"other"}
    set_alpha(model, 1.0)
    ref = copy.deepcopy(base)
    quantize_model(ref)
    np.testing.assert_array_equal(model(idx).logits.data, ref(idx).logits.data)
    model.delete_adapter("default")
    assert list(model.side_network.keys()) == ["other"]


def test_generate_uses_the_side_network():
    base, model = side_model("LST")
    perturb(model, scale=0.5)
    idx, _ = batch(T=4)
    out = model.generate(idx, 5, greedy=True)
    assert out.shape == (2, 9) and np.array_equal(out[:, :4], idx)
    step = model(out[:, :4]).logits.data[:, -1].argmax(-1)
    np.testing.assert_array_equal(out[:, 4], step)


def test_bad_input_says_what_to_do():
    with pytest.raises(ValueError, match="side width"):
        get_peft_model(tiny_gpt(), LSTConfig(reduction_factor=32))
    with pytest.raises(ValueError, match="does not divide"):
        get_peft_model(tiny_gpt(), LSTConfig(reduction_factor=2, side_num_heads=3))
    with pytest.raises(ValueError, match="target_modules must be None"):
        LSTConfig(target_modules=["c_attn"])
    with pytest.raises(ValueError, match="downsample must be one of"):
        QSTConfig(downsample="conv")
    with pytest.raises(ValueError, match="quant_type must be one of"):
        QSTConfig(quant_type="int8")
    _, model = side_model("LST")
    with pytest.raises(ValueError, match="key/value cache"):
        model(batch()[0], past_key_values=[(np.zeros(1), np.zeros(1))] * 2)
    with pytest.raises(ValueError, match="no output mix"):
        set_alpha(model, 0.5)
