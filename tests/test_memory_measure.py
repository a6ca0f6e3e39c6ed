"""The measured breakdown of a real step agrees with the calculator's prediction."""
import numpy as np
import pytest

from minipeft.gpt import GPT, GPTConfig
from minipeft.memory import MethodConfig, StepSetup, estimate_memory
from minipeft.memory_measure import CATEGORIES, compare, measure_training_step, model_bytes
from minipeft.optim import AdamW
from minipeft.peft import LoraConfig, get_peft_model

B, T = 3, 32


def _batch():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (B, T)), rng.integers(0, 256, (B, T))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_measured_step_matches_prediction(method):
    cfg = GPTConfig.preset("T0")
    model = GPT(cfg, seed=0)
    targets = ("attn.c_attn", "mlp.c_fc")
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]))
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    meas = measure_training_step(model, _batch(), opt)
    pred = estimate_memory(cfg, MethodConfig(method=method, targets=targets, r=4),
                           StepSetup(batch_size=B, seq_len=T, ledger_view=True))
    for name, p, m, _ in compare(pred, meas):
        assert m == pytest.approx(p, rel=0.10), f"{method} {name}: measured {m} vs predicted {p}"
    assert meas.activations > 0 and np.isfinite(meas.loss)


def test_lora_holds_fewer_activations_than_full():
    cfg = GPTConfig.preset("T0")
    full = GPT(cfg, seed=0)
    lora = get_peft_model(GPT(cfg, seed=0), LoraConfig(r=4, target_modules=["c_attn"]))
    a = measure_training_step(full, _batch(), AdamW(list(full.parameters()), lr=1e-3))
    b = measure_training_step(lora, _batch(), AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-3))
    assert b.activations < a.activations
    assert b.optimizer_state < a.optimizer_state / 10


def test_model_bytes_counts_tied_weights_once():
    m = GPT(GPTConfig.preset("T0"), seed=0)
    assert sum(model_bytes(m).values()) == sum(p.data.nbytes for p in m.parameters())
    assert set(CATEGORIES) >= set(model_bytes(m))


def _qlora_step(compute_dtype, device):
    from minipeft.backend import to_device
    from minipeft.quant.modules import quantize_model

    model = GPT(GPTConfig.preset("T0"), seed=0)
    quantize_model(model, quant_type="nf4", blocksize=64, compress_statistics=True, compute_dtype=compute_dtype,
                   verbose=False)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"])).to(device)
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return measure_training_step(model, tuple(to_device(a, device) for a in _batch()), opt)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_qlora_step_matches_prediction(compute_dtype, device, monkeypatch):
    """The 4-bit layers save nothing for backward in any compute dtype, and the LoRA branches
    outside autocast stay float32: the calculator's float32 activations hold for the QLoRA
    lesson's GPU run in bfloat16 as for its CPU run in float32."""
    cfg = GPTConfig.preset("T0")
    meas = _qlora_step(compute_dtype, device)
    pred = estimate_memory(cfg, MethodConfig(method="qlora", targets=("c_attn", "c_proj", "c_fc"), r=4),
                           StepSetup(batch_size=B, seq_len=T, ledger_view=True))
    for name, p, m, _ in compare(pred, meas):
        assert m == pytest.approx(p, rel=0.10), f"qlora {name}: measured {m} vs predicted {p}"
    assert meas.weights_frozen < GPT(cfg, seed=0).num_parameters() * 4 / 2  # 4-bit codes, not fp32
    if compute_dtype != "float32":  # the very bytes the float32 step holds for backward, op for op: the
        # fused LoRA op (peft/lora_fused.py), which runs only where base and adapter share a dtype, holds
        # no 0-d scaling (4 bytes a layer less), so the float32 step runs the reference ops here too
        monkeypatch.setenv("MINIPEFT_KERNELS", "0")
        assert meas.activations == _qlora_step("float32", device).activations
