"""Gradient checkpointing (minipeft.checkpointing): same gradients, fewer saved bytes."""
import copy

import numpy as np
import pytest

from minipeft import engine
from minipeft import random as mp_random
from minipeft.engine import Tensor
from minipeft.gpt import GPT, GPTConfig
from minipeft.memory import MethodConfig, StepSetup, estimate_memory
from minipeft.memory_activations import activation_bytes
from minipeft.peft import LoraConfig, PrefixTuningConfig, get_peft_model
from minipeft.quant.modules import quantize_model

B, T = 2, 16
TARGETS = ["c_attn", "c_proj", "c_fc"]


def _model(dropout=0.1, dtype="float64", n_layer=3):
    cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=n_layer, n_head=2, n_embd=32, dropout=dropout, dtype=dtype)
    return GPT(cfg, seed=1).train()


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 64, (B, T)), rng.integers(0, 64, (B, T))


def _step(model, checkpointing: bool):
    """One forward + backward from a fixed random stream: grads, loss, peak saved bytes, next draw."""
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.zero_grad()
    mp_random.manual_seed(7)
    idx, tg = _batch()
    engine.reset_peak_saved_bytes()
    base = engine.saved_bytes()
    loss = model(idx, tg).loss
    loss.backward()
    grads = {n: p.grad.copy() for n, p in model.named_parameters() if p.requires_grad}
    return grads, loss.item(), engine.peak_saved_bytes() - base, float(mp_random.generator("cpu").random())


def _same_step(make):
    plain, ckpt = _step(make(), False), _step(make(), True)
    assert plain[1] == ckpt[1]
    assert plain[0].keys() == ckpt[0].keys() and plain[0]
    for name in plain[0]:
        np.testing.assert_array_equal(ckpt[0][name], plain[0][name], err_msg=name)
    assert ckpt[3] == plain[3]  # the random stream continues where the plain step leaves it
    assert ckpt[2] < plain[2]
    return plain, ckpt


def test_full_fine_tuning_with_dropout_gives_identical_gradients():
    _same_step(lambda: _model(dropout=0.2))


def test_lora_with_dropout_gives_identical_gradients():
    def make():
        return get_peft_model(_model(dropout=0.1), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3,
                                                              target_modules=TARGETS))
    _same_step(make)


def test_qlora_gives_identical_gradients():
    def make():
        m = _model(dropout=0.1, dtype="float32")
        quantize_model(m, quant_type="nf4", blocksize=64, compress_statistics=True, compute_dtype="float32",
                       verbose=False)
        return get_peft_model(m, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS))
    _same_step(make)


def test_prefix_tuning_passes_its_keys_and_values_through_the_checkpoint():
    _same_step(lambda: get_peft_model(_model(dropout=0.1), PrefixTuningConfig(num_virtual_tokens=4)))


def test_without_dropout_the_stream_is_untouched_and_eval_runs_plainly():
    model = _model(dropout=0.0)
    model.gradient_checkpointing_enable()
    idx, _ = _batch()
    with engine.no_grad():
        a = model(idx).logits.data
    model.gradient_checkpointing_disable()
    with engine.no_grad():
        b = model(idx).logits.data
    np.testing.assert_array_equal(a, b)
    assert not model.is_gradient_checkpointing


def test_use_cache_in_checkpointed_training_is_refused():
    model = _model()
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="use_cache=True with gradient checkpointing"):
        model(_batch()[0], use_cache=True)
    model.eval()
    assert model(_batch()[0], use_cache=True).past_key_values is not None  # decoding still caches


def test_peft_model_enables_it_on_its_base():
    model = get_peft_model(_model(), LoraConfig(r=2, target_modules=["c_attn"]))
    model.gradient_checkpointing_enable()
    assert model.base_model.model.is_gradient_checkpointing


def test_grad_refuses_to_lose_a_leaf_gradient():
    w = Tensor(np.ones(3), requires_grad=True)
    x = Tensor(np.arange(3.0), requires_grad=True)
    with pytest.raises(RuntimeError, match="not among the inputs"):
        engine.grad((x * w).sum(), [x], np.ones(()))
    y = (x * w).sum()
    gx, gw = engine.grad(y, [x, w], np.ones(()))
    np.testing.assert_array_equal(gx, np.ones(3))
    np.testing.assert_array_equal(gw, np.arange(3.0))
    assert x.grad is None and w.grad is None  # returned, not accumulated


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_measured_peak_is_the_calculators(method):
    """The engine's peak, plain and checkpointed, is the calculator's prediction to the byte (but LoRA's scalars)."""
    m = _model(dropout=0.1, dtype="float32")
    targets = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # "c_proj" matches both
    if method == "qlora":
        quantize_model(m, quant_type="nf4", blocksize=64, compress_statistics=True, compute_dtype="float32",
                       verbose=False)
    if method != "full":
        m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS))
    plain = _step(copy.deepcopy(m), False)[2]
    ckpt = _step(m, True)[2]
    cfg = m.config
    mcfg = MethodConfig(method=method, targets=targets, r=4, lora_dropout=0.1)
    for on, measured in ((False, plain), (True, ckpt)):
        t = StepSetup(batch_size=B, seq_len=T, ledger_view=True, resid_pdrop=0.1, embd_pdrop=0.1,
                        gradient_checkpointing=on)
        predicted = estimate_memory(cfg, mcfg, t).activations
        # LoRA's `* scaling` keeps its 0-d float32 scalar (4 bytes a layer), which the calculator leaves out
        scalars = 0 if method == "full" else 4 * len(targets) * (cfg.n_layer if not on else 1)
        assert measured - predicted == scalars, (method, on, predicted, measured)


def test_checkpointed_terms_are_inputs_plus_the_larger_of_head_and_one_block():
    kw = dict(B=4, T=64, n_layer=6, n_embd=64, n_head=4, n_inner=256, vocab=256, act_bytes=4,
              lora_ranks={"attn.c_attn": 8})
    plain = activation_bytes(**kw)
    ckpt = activation_bytes(**kw, gradient_checkpointing=True)
    inputs = {k: v for k, v in ckpt.items() if k.endswith("kept by the checkpoint")}
    assert len(inputs) == 6 and set(inputs.values()) == {4 * 64 * 64 * 4}
    block5 = sum(v for k, v in plain.items() if k.startswith("h.5."))
    head = sum(v for k, v in plain.items() if k.startswith(("ln_f", "lm_head", "cross_entropy")))
    assert sum(ckpt.values()) == sum(inputs.values()) + max(block5, head)
    assert sum(ckpt.values()) < sum(plain.values())


# ---- the GPU: the same replay through CuPy's generator and the RawKernels ------------------
@pytest.mark.gpu
def test_cuda_rng_state_round_trips():
    from minipeft.checkpointing import rng_state, set_rng_state

    mp_random.manual_seed(3)
    state = rng_state("cuda")
    a = mp_random.generator("cuda").random(1000)
    set_rng_state("cuda", state)
    b = mp_random.generator("cuda").random(1000)
    assert bool((a == b).all())


@pytest.mark.gpu
def test_cuda_checkpointed_gradients_match_the_plain_backward():
    def make():
        m = get_peft_model(_model(dropout=0.1, dtype="float32"),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=TARGETS))
        return m.to("cuda")

    def step(model, on):
        if on:
            model.gradient_checkpointing_enable()
        mp_random.manual_seed(7)
        idx, tg = _batch()
        model(idx, tg).loss.backward()
        grads = {n: p.grad.get() for n, p in model.named_parameters() if p.requires_grad}
        return grads, float(mp_random.generator("cuda").random(1).get()[0])

    (plain, r1), (ckpt, r2) = step(make(), False), step(make(), True)
    assert r1 == r2 and plain.keys() == ckpt.keys()
    for name in plain:  # the same kernels on the same inputs; atomics may reorder a sum
        np.testing.assert_allclose(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_a_block_run_under_autocast_is_recomputed_under_it():
    from minipeft import amp

    def step(model, on):
        if on:
            model.gradient_checkpointing_enable()
        mp_random.manual_seed(7)
        idx, tg = _batch()
        with amp.autocast("float16"):
            loss = model(idx, tg).loss
        loss.backward()  # outside the autocast block, as train() does
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    def make():
        return get_peft_model(_model(dropout=0.1, dtype="float32"), LoraConfig(r=4, target_modules=TARGETS))

    plain, ckpt = step(make(), False), step(make(), True)
    for name in plain:
        np.testing.assert_array_equal(ckpt[name], plain[name], err_msg=name)
