"""Tests for minipeft.memory: exact counts, course figures, breakdown sums, bad input."""
import pytest

from minipeft import memory as M
from minipeft import memory_course
from minipeft.gpt import GPT, GPTConfig
from minipeft.memory import MethodConfig, StepSetup, estimate_memory
from minipeft.peft import FullFineTuningConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig, QSTConfig

HF_COUNTS = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}


@pytest.mark.parametrize("name, count", HF_COUNTS.items())
def test_gpt2_param_counts(name, count):
    assert M.gpt2_param_count(name) == count
    assert estimate_memory(name).n_params == count


def test_gpt2_counts_agree_with_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for name in ("gpt2", "gpt2-xl"):
        s = GPTConfig.preset(name)
        cfg = transformers.GPT2Config(n_layer=s.n_layer, n_embd=s.n_embd, n_head=s.n_head,
                                      vocab_size=s.vocab_size, n_positions=s.block_size)
        with torch.device("meta"):  # shapes only, no memory
            model = transformers.GPT2LMHeadModel(cfg)
        assert model.num_parameters() == M.gpt2_param_count(s) == HF_COUNTS[name]
        assert M.gpt2_param_count(cfg) == HF_COUNTS[name]  # a config object is read duck-typed


def test_gpt3_count_and_shape_inputs():
    assert M.gpt2_param_count("gpt3-175b") == 174_604_259_328  # GPT2LMHeadModel on that shape
    d = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, block_size=1024)
    assert M.gpt2_param_count(d) == HF_COUNTS["gpt2"]


def test_lora_counts():
    assert M.lora_param_count("gpt2", ("c_attn",), 8) == 294_912
    assert M.lora_param_count("gpt2", ["attn.c_attn"], 8) == 294_912
    assert M.lora_matrix_param_count(512, 64, 8) == 4608
    # 'c_proj' matches attn.c_proj and mlp.c_proj, as peft's suffix match does
    assert M.lora_param_count("gpt2", ("c_proj",), 2) == 12 * 2 * ((768 + 768) + (3072 + 768))
    # q and v slices of the fused c_attn: the LoRA paper's Wq, Wv
    assert M.lora_param_count("gpt3-175b", ("c_attn.q", "c_attn.v"), 4) == 96 * 2 * 4 * 2 * 12288
    b = estimate_memory("gpt2", MethodConfig("lora", targets=("c_attn",), r=8))
    assert b.n_trainable == 294_912 and b.n_params == HF_COUNTS["gpt2"] + 294_912


def test_quant_constant_bits_match_reference_table():
    # quantization.md §5: bits/param (4-bit codes + constants) for NF4 block sizes
    plain = {32: 5.0, 64: 4.5, 128: 4.25, 256: 4.125}
    dq = {32: 4.2539, 64: 4.1270, 128: 4.0635, 256: 4.0317}
    for bs in plain:
        assert 4 + M.quant_constant_bits(bs) == plain[bs]
        assert 4 + M.quant_constant_bits(bs, double_quant=True) == pytest.approx(dq[bs], abs=5e-5)
    assert M.quant_constant_bits(64) == 0.5
    assert M.quant_constant_bits(64, double_quant=True) == 0.126953125


def test_course_figures_all_within_tolerance():
    rows = memory_course.course_figures()
    assert len(rows) >= 20
    bad = [r for r in rows if not r.ok]
    assert not bad, memory_course.format_course_figures(bad)
    assert len(memory_course.format_course_figures(rows).splitlines()) == len(rows) + 1
    by_case = {r.case: r for r in rows}
    assert by_case["1.5B params, fp32 AdamW: weights 4 + grads 4 + m,v 8 B/param"].minipeft == pytest.approx(24.0)


def test_breakdown_adds_up_and_fp32_adam_is_16_bytes_per_param():
    b = estimate_memory(1.5e9, MethodConfig("full"), StepSetup())
    assert b.total == 16 * 1_500_000_000 and b.activations == 0 and not b.activations_known
    for method in M.METHODS:
        b = estimate_memory("gpt2", MethodConfig(method), StepSetup(batch_size=2, seq_len=64))
        parts = (b.weights_trainable + b.weights_frozen + b.gradients + b.optimizer_state
                 + b.activations + b.quant_constants)
        assert b.total == parts == b.as_dict()["total"]
        assert "total" in b.table(method)
        assert b.gradients == 4 * b.n_trainable  # fp32 grads, trainable parameters only
        assert b.weights_trainable + b.weights_frozen + b.quant_constants <= 4 * b.n_params


def test_qlora_base_storage():
    lora = estimate_memory("gpt2", MethodConfig("lora", targets=("c_attn", "c_proj", "c_fc")))
    q = estimate_memory("gpt2", MethodConfig("qlora", targets=("c_attn", "c_proj", "c_fc")))
    n_lin = 12 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072)  # block linear weights: the quantized ones
    assert lora.weights_frozen - q.weights_frozen == 4 * n_lin - n_lin // 2
    per_layer_blocks = [768 * 2304 // 64, 768 * 768 // 64, 768 * 3072 // 64, 768 * 3072 // 64]
    # per tensor: absmax codes, nested absmax, offset, its 16-entry code table and the
    # 256-entry dynamic map of the nested absmax
    assert q.quant_constants == 12 * sum(nb + 4 * -(-nb // 256) + 4 + 64 + 1024 for nb in per_layer_blocks)
    plain = estimate_memory("gpt2", MethodConfig("qlora", double_quant=False))
    assert plain.quant_constants == 12 * sum(4 * nb + 64 for nb in per_layer_blocks)
    assert q.activations == lora.activations and q.gradients == lora.gradients


def test_optimizers():
    n = 10_000_000
    m = MethodConfig("full")
    states = {o: estimate_memory(n, m, StepSetup(optimizer=o)).optimizer_state for o in M.OPTIMIZERS}
    assert states["adamw"] == states["adam"] == states["paged_adamw"] == 8 * n
    assert states["adamw8bit"] == 2 * n + 8 * -(-n // 256)  # ≈ 2.031 B/param, 75% less
    assert states["sgd_momentum"] == 4 * n and states["sgd"] == 0
    assert estimate_memory(1000, m, StepSetup(optimizer="adamw8bit")).optimizer_state == 8000  # small: 32-bit
    paged = estimate_memory(n, m, StepSetup(optimizer="paged_adamw"))
    assert paged.optimizer_paged and paged.device_total == paged.total - 8 * n
    mixed = estimate_memory(n, m, StepSetup(weight_dtype="float16", master_weights=True))
    assert mixed.total == 16 * n  # ZeRO: 2 + 2 + K (12)


def _full_ft_by_hand(B, T, L, C, H, V):
    """Full FT saves per block: ln x̂ + rstd (x2), c_attn x, q k v, probs, c_proj x, c_fc x, gelu x, mlp.c_proj x."""
    F = 4 * C
    per_block = 2 * (B * T * C + B * T) + B * T * C + 3 * B * T * C + B * H * T * T + B * T * C \
        + B * T * C + B * T * F + B * T * F
    head = (B * T * C + B * T) + B * T * C + B * T * V  # ln_f, lm_head input, CE probs
    return 4 * (L * per_block + head) + 8 * (B * T + T) + B * T * 9  # + indices, CE targets/valid


def test_activation_formula_full_ft_by_hand():
    s = GPTConfig(n_layer=2, n_embd=64, n_head=2, vocab_size=256, block_size=128)
    b = estimate_memory(s, MethodConfig("full"), StepSetup(batch_size=3, seq_len=32))
    assert b.activations == _full_ft_by_hand(3, 32, 2, 64, 2, 256)


def test_activation_orderings():
    s = GPTConfig(n_layer=4, n_embd=128, n_head=4, vocab_size=256, block_size=128)
    t = StepSetup(batch_size=4, seq_len=64)
    act = {m: estimate_memory(s, MethodConfig(m), t).activations for m in M.METHODS}
    assert act["full"] > act["lora"] and act["full"] > act["side"]
    lora = MethodConfig("lora", targets=("c_attn",))
    naive = estimate_memory(s, lora, StepSetup(batch_size=4, seq_len=64, save_frozen_linear_inputs=True))
    assert naive.activations > estimate_memory(s, lora, t).activations  # frozen linears need not keep x
    drop = estimate_memory(s, MethodConfig("lora", lora_dropout=0.1), t)
    assert drop.activations > estimate_memory(s, lora, t).activations
    ledger = estimate_memory(s, lora, StepSetup(batch_size=4, seq_len=64, ledger_view=True))
    assert ledger.activations < estimate_memory(s, lora, t).activations  # layer 0's lora_A input
    t2 = StepSetup(batch_size=8, seq_len=64)
    assert estimate_memory(s, lora, t2).activations == 2 * estimate_memory(s, lora, t).activations  # linear in B
    terms = M.activation_bytes(2, 16, 2, 64, 2, 256, 256, 4)
    assert terms == {}  # nothing trains: no graph, nothing saved


def test_method_parameter_counts():
    s = GPTConfig.preset("gpt2")
    assert estimate_memory(s, MethodConfig("prompt", n_virtual_tokens=20)).n_trainable == 20 * 768
    assert estimate_memory(s, MethodConfig("prefix", n_virtual_tokens=10)).n_trainable == 10 * 2 * 12 * 768
    proj = estimate_memory(s, MethodConfig("prefix", n_virtual_tokens=10, prefix_projection=True)).n_trainable
    assert proj == 10 * 768 + 768 * 512 + 512 + 512 * 2 * 12 * 768 + 2 * 12 * 768
    side = estimate_memory(s, MethodConfig("side", reduction_factor=8))
    ds = 96
    block = 4 * ds + 3 * ds * ds + 3 * ds + ds * ds + ds + 2 * (4 * ds * ds) + 4 * ds + ds
    assert side.n_trainable == 13 * (768 * ds + ds) + 12 + 12 * block + ds * 768 + 768
    qst = estimate_memory(s, MethodConfig("side", quantize=True))
    assert qst.quant_constants > 0 and qst.weights_frozen < side.weights_frozen
    raw = estimate_memory("llama-7b", MethodConfig("lora", trainable_params=4_000_000))
    assert raw.n_params == 6_700_000_000 + 4_000_000 and raw.n_trainable == 4_000_000


def test_peft_configs_are_read_as_the_method_they_are():
    s = GPTConfig.preset("gpt2")
    t = StepSetup(batch_size=2, seq_len=64)
    lora = LoraConfig(r=4, target_modules=["c_attn", "mlp.c_fc"], lora_dropout=0.1)
    as_method = MethodConfig("lora", targets=("c_attn", "mlp.c_fc"), r=4, lora_dropout=0.1)
    assert estimate_memory(s, lora, t) == estimate_memory(s, as_method, t)
    assert M.method_config(lora, quantize=True) == MethodConfig("qlora", targets=("c_attn", "mlp.c_fc"), r=4,
                                                                 lora_dropout=0.1)
    assert M.method_config(LoraConfig()).targets == ("c_attn",)  # peft's GPT-2 default target
    assert M.method_config(PromptTuningConfig(num_virtual_tokens=20)) == MethodConfig("prompt", n_virtual_tokens=20)
    prefix = M.method_config(PrefixTuningConfig(num_virtual_tokens=10, prefix_projection=True, encoder_hidden_size=64))
    assert prefix == MethodConfig("prefix", n_virtual_tokens=10, prefix_projection=True, encoder_hidden_size=64)
    assert M.method_config(QSTConfig()) == MethodConfig("side", reduction_factor=16, quantize=True)
    assert M.method_config(FullFineTuningConfig()) == M.method_config(None) == MethodConfig("full")
    # a real model's config is the calculator's shape: the count is the built model's
    assert estimate_memory(GPTConfig.preset("T0")).n_params == GPT(GPTConfig.preset("T0")).num_parameters()


@pytest.mark.parametrize("config, message", [
    (LoraConfig(target_modules="c_.*"), "a regex of target_modules"),
    (LoraConfig(rank_pattern={"c_attn": 2}), "rank_pattern"),
    (LoraConfig(use_dora=True), "use_dora"),
    (LoraConfig(bias="all"), "bias='all'"),
])
def test_peft_settings_the_calculator_cannot_model_are_errors(config, message):
    with pytest.raises(ValueError, match=f"models plain LoRA; LoraConfig sets {message}"):
        estimate_memory("gpt2", config)


def test_a_peft_config_without_a_memory_model_is_an_error():
    from minipeft.peft import IA3Config

    with pytest.raises(ValueError, match=r"no model of IA3Config \(peft_type 'IA3'\)"):
        estimate_memory("gpt2", IA3Config())


@pytest.mark.parametrize("call, message", [
    (lambda: M.lora_param_count("gpt2", ("c_attn",), -1), "LoRA rank must be an integer >= 1, got -1"),
    (lambda: M.lora_param_count("gpt2", ("c_attn",), 0), "LoRA rank must be an integer >= 1, got 0"),
    (lambda: M.lora_matrix_param_count(512, 64, 65), r"LoRA rank 65 exceeds the matrix's smaller side 64 \(512x64\)"),
    (lambda: M.lora_param_count("gpt2", ("c_proj",), 769), "LoRA rank 769 exceeds the matrix's smaller side 768"),
    (lambda: M.lora_param_count("gpt2", ("q_proj",), 8), "LoRA target 'q_proj' matches no module of a GPT-2 block"),
    (lambda: M.lora_param_count("gpt2", ("c_attn", "c_attn.q"), 8), "both the whole attn.c_attn and its q/k/v"),
    (lambda: estimate_memory("gpt2", MethodConfig("adapter")), "unknown method 'adapter'"),
    (lambda: estimate_memory("gpt2", MethodConfig("lora", targets=("wq",))), "LoRA target 'wq' matches no module"),
    (lambda: estimate_memory("gpt2", MethodConfig("lora", r=-4)), "r must be an integer >= 1, got -4"),
    (lambda: estimate_memory("gpt2", MethodConfig("full", quantize=True)), "full fine-tuning cannot train a 4-bit"),
    (lambda: estimate_memory("gpt2", MethodConfig("qlora", blocksize=48)), "blocksize must be a power of two"),
    (lambda: estimate_memory("gpt2", setup=StepSetup(optimizer="lion")), "unknown optimizer 'lion'"),
    (lambda: estimate_memory("gpt2", setup=StepSetup(weight_dtype="float8")), "unknown dtype 'float8'"),
    (lambda: estimate_memory("gpt2", setup=StepSetup(batch_size=0)), "batch_size must be an integer >= 1, got 0"),
    (lambda: estimate_memory("gpt2", MethodConfig("lora", lora_dropout=1.0)), r"lora_dropout must be in \[0, 1\)"),
    (lambda: estimate_memory("llama-7b", MethodConfig("lora")), r"needs MethodConfig\(trainable_params=...\)"),
    (lambda: estimate_memory(-5), "parameter count must be positive, got -5"),
    (lambda: estimate_memory("gpt5"), "unknown model 'gpt5'; sizes: .* raw counts: .*llama-7b"),
    (lambda: M.as_config(dict(n_layer=2, n_embd=0, n_head=1)), "n_embd must be a positive integer, got 0"),
    (lambda: M.quant_constant_bits(100), "blocksize must be a power of two >= 2 .* got 100"),
])
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_unreadable_shape_is_type_error():
    with pytest.raises(TypeError, match=r"cannot read a model shape from \{'n_embd': 64\}: need n_layer, n_embd, n_head"):
        M.as_config({"n_embd": 64})
