"""The PEFT API: names, target matching, freezing, adapters, merging, counting, configs, tensors."""
import json

import numpy as np
import pytest

from minipeft.gpt import GPT, GPTConfig
from minipeft.nn import Linear, Module
from minipeft.peft import (REGISTRY, LoHaConfig, LoraConfig, LoraLayer, ModulesToSaveWrapper, PeftConfig, PeftModel,
                           VeraConfig, get_peft_model)

from . import base_weights, batch, logits, perturb, tiny_gpt, train


def lora_names(model):
    return sorted({n.split(".lora_")[0] for n, _ in model.named_parameters() if ".lora_" in n})


# --------------------------------------------------------------------- names


def test_in_memory_and_on_disk_key_names_follow_peft():
    model = get_peft_model(tiny_gpt(), LoraConfig(r=2))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable[:2] == ["base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight",
                             "base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight"]
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.weight" in dict(model.named_parameters())
    disk = model.peft_state_dict()
    assert list(disk) == [f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{ab}.weight"
                          for i in (0, 1) for ab in "AB"]
    assert disk["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (2, 16)  # [r, in]
    assert disk["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (48, 2)  # [out, r]
    assert model.peft_config["default"].target_modules == ["c_attn"]  # GPT-2 default filled in


def test_forward_and_attributes_go_to_the_wrapped_model():
    base = tiny_gpt()
    model = get_peft_model(base, LoraConfig(r=2))
    idx, tg = batch()
    out = model(idx, tg)
    assert out.logits.shape == (2, 8, 23) and out.loss is not None
    assert model.config is base.config and model.get_base_model() is base
    with pytest.raises(TypeError, match="already a PeftModel"):
        get_peft_model(model, LoraConfig())


# ------------------------------------------------------------------ matching


@pytest.mark.parametrize("targets, expect", [
    (["c_proj"], [f"transformer.h.{i}.{m}.c_proj" for i in (0, 1) for m in ("attn", "mlp")]),
    (["mlp.c_proj"], ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]),
    (["transformer.h.1.attn.c_attn"], ["transformer.h.1.attn.c_attn"]),
    (r".*\.h\.1\.(attn\.c_attn|mlp\.c_fc)", ["transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"]),
    ("all-linear", [f"transformer.h.{i}.{m}" for i in (0, 1)
                    for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]),
])
def test_target_modules_by_names_suffixes_and_regex(targets, expect):
    model = get_peft_model(tiny_gpt(), LoraConfig(r=2, target_modules=targets))
    assert lora_names(model) == sorted("base_model.model." + e for e in expect)


def test_layers_to_transform_and_exclude_modules():
    model = get_peft_model(tiny_gpt(), LoraConfig(r=2, target_modules=["c_attn", "c_fc"], layers_to_transform=[1]))
    assert lora_names(model) == ["base_model.model.transformer.h.1.attn.c_attn",
                                 "base_model.model.transformer.h.1.mlp.c_fc"]
    model = get_peft_model(tiny_gpt(), LoraConfig(r=2, target_modules=["c_attn"], layers_to_transform=0,
                                                  layers_pattern="h"))
    assert lora_names(model) == ["base_model.model.transformer.h.0.attn.c_attn"]
    model = get_peft_model(tiny_gpt(), LoraConfig(r=2, target_modules=["c_proj"], exclude_modules=["attn.c_proj"]))
    assert lora_names(model) == ["base_model.model.transformer.h.0.mlp.c_proj",
                                 "base_model.model.transformer.h.1.mlp.c_proj"]


def test_no_match_error_lists_module_names_and_leaves_model_alone():
    base = tiny_gpt()
    with pytest.raises(ValueError, match="matches no module of GPT") as e:
        get_peft_model(base, LoraConfig(target_modules=["q_proj"]))
    msg = str(e.value)
    assert "q_proj" in msg and "transformer.h.{i}.attn.c_attn (Linear)" in msg and "lm_head" in msg
    with pytest.raises(ValueError, match="matches no module"):  # a regex is matched in full: "c_attn" alone fails
        get_peft_model(base, LoraConfig(target_modules="c_attn"))
    with pytest.raises(ValueError, match="cannot wrap.*CausalSelfAttention"):
        get_peft_model(base, LoraConfig(target_modules=["attn"]))
    assert not any(isinstance(m, LoraLayer) for m in base.modules())
    assert all(p.requires_grad for p in base.parameters())  # trainability restored too


def test_failed_injection_rolls_back():
    model = get_peft_model(tiny_gpt(), LoraConfig(r=2))
    before = [type(m).__name__ for m in model.modules()]
    with pytest.raises(ValueError, match="r=40"):  # c_attn takes r=4, but c_proj (16 x 16) cannot take 40
        model.add_adapter("big", LoraConfig(r=4, target_modules=["c_attn", "c_proj"], rank_pattern={"c_proj": 40}))
    assert [type(m).__name__ for m in model.modules()] == before and "big" not in model.peft_config
    assert all("big" not in m.lora_A for m in model.modules() if isinstance(m, LoraLayer))


# ------------------------------------------------------------------ freezing


def test_base_frozen_only_adapter_trains_and_bias_options():
    model = get_peft_model(tiny_gpt(), LoraConfig(r=2))
    idx, tg = batch()
    model(idx, tg).loss.backward()
    assert all((p.grad is not None) == ("lora_" in n) for n, p in model.named_parameters())
    n_lora = 2 * (2 * 16 + 48 * 2)  # 2 layers x (r in + out r)
    assert model.get_nb_trainable_parameters()[0] == n_lora
    all_bias = get_peft_model(tiny_gpt(), LoraConfig(r=2, bias="all"))
    n_bias = sum(p.size for n, p in all_bias.named_parameters() if n.endswith(".bias"))
    assert all_bias.get_nb_trainable_parameters()[0] == n_lora + n_bias
    assert "base_model.model.transformer.ln_f.bias" in all_bias.peft_state_dict()
    only = get_peft_model(tiny_gpt(), LoraConfig(r=2, bias="lora_only"))
    assert only.get_nb_trainable_parameters()[0] == n_lora + 2 * 48
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in only.peft_state_dict()
    frozen = get_peft_model(tiny_gpt(), LoraConfig(r=2, inference_mode=True))
    assert frozen.get_nb_trainable_parameters()[0] == 0


def test_modules_to_save_copies_the_head():
    base = tiny_gpt()
    wte = base.transformer.wte.weight
    model = get_peft_model(base, LoraConfig(r=2, modules_to_save=["lm_head"]))
    head = model.base_model.model.lm_head
    assert isinstance(head, ModulesToSaveWrapper) and head.original_module.weight is wte
    copy = head.modules_to_save["default"].weight
    assert copy is not wte and copy.requires_grad and not wte.requires_grad
    assert "base_model.model.lm_head.weight" in model.peft_state_dict()
    idx, _ = batch()
    y0 = logits(model, idx)
    train(model, steps=1)
    with model.disable_adapter():
        np.testing.assert_array_equal(logits(model, idx), y0)  # original head untouched
    with pytest.raises(ValueError, match="modules_to_save entry 'score'"):
        get_peft_model(tiny_gpt(), LoraConfig(r=2, modules_to_save=["score"]))


# --------------------------------------------------------------- many adapters


def test_multiple_adapters_set_adapter_disable_delete():
    base = tiny_gpt()
    idx, _ = batch()
    y0 = logits(base, idx)
    model = get_peft_model(base, LoraConfig(r=2), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=3, target_modules=["c_fc"]))
    assert model.active_adapter == "a" and set(model.peft_config) == {"a", "b"}
    assert all(p.requires_grad == (".a." in n) for n, p in model.named_parameters() if "lora_" in n)
    perturb(model, seed=1)  # only a moves
    ya = logits(model, idx)
    assert not np.allclose(ya, y0)
    model.set_adapter("b")
    np.testing.assert_array_equal(logits(model, idx), y0)  # b is still at its identity init
    assert all(p.requires_grad == (".b." in n) for n, p in model.named_parameters() if "lora_" in n)
    perturb(model, seed=2)
    yb = logits(model, idx)
    with model.disable_adapter():
        np.testing.assert_array_equal(logits(model, idx), y0)
    np.testing.assert_array_equal(logits(model, idx), yb)
    model.set_adapter("a")
    np.testing.assert_allclose(logits(model, idx), ya, atol=1e-6)
    model.merge_adapter()
    with model.disable_adapter():  # a merged adapter is unmerged to run the base
        np.testing.assert_allclose(logits(model, idx), y0, atol=1e-5)
    with pytest.warns(UserWarning, match="active"):
        model.delete_adapter("a")
    assert model.active_adapter == "b" and "a" not in model.peft_config
    assert not any(".a." in n for n, _ in model.named_parameters())
    np.testing.assert_allclose(logits(model, idx), yb, atol=1e-6)
    with pytest.raises(ValueError, match="only adapter"):
        model.delete_adapter("b")
    with pytest.raises(ValueError, match="unknown adapter"):
        model.set_adapter("zz")
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("b", LoraConfig(r=2))
    with pytest.raises(ValueError, match="same method"):
        model.add_adapter("h", LoHaConfig(r=2))
    with pytest.raises(ValueError, match="one adapter with bias"):
        model.add_adapter("bias", LoraConfig(r=2, bias="all"))


def test_merge_and_unload_returns_plain_model():
    base = tiny_gpt()
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn", "c_fc"]))
    perturb(model)
    idx, _ = batch()
    y = logits(model, idx)
    plain = model.merge_and_unload()
    assert plain is base and type(plain.transformer.h[0].attn.c_attn) is Linear
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    np.testing.assert_allclose(logits(plain, idx), y, atol=1e-5)
    base2 = tiny_gpt()
    y0 = logits(base2, idx)
    m2 = get_peft_model(base2, LoraConfig(r=2))
    perturb(m2)
    np.testing.assert_array_equal(logits(m2.unload(), idx), y0)


# ------------------------------------------------------------------ counting


def test_print_trainable_parameters_gpt2_small(capsys):
    cfg = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    base = GPT(cfg, init_weights=False)  # zeros: the shape is all that counts
    assert base.num_parameters() == 124_439_808
    model = get_peft_model(base, LoraConfig(r=8, target_modules=["c_attn"]))
    model.print_trainable_parameters()
    assert capsys.readouterr().out == "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364\n"
    model.add_adapter("r16", LoraConfig(r=16, target_modules=["c_attn"]))
    model.set_adapter("r16")  # both adapters are there; only the active one counts as trainable
    assert model.get_nb_trainable_parameters()[0] == 589_824  # peft-format.md §5, r=16


# ------------------------------------------------------------- adapter tensors


def test_peft_state_dict_round_trip_and_validation():
    model = get_peft_model(tiny_gpt(), LoraConfig(r=2, use_dora=True))
    perturb(model)
    state = {k: v.copy() for k, v in model.peft_state_dict().items()}
    assert "base_model.model.transformer.h.1.attn.c_attn.lora_magnitude_vector" in state
    idx, _ = batch()
    y = logits(model, idx)
    fresh = get_peft_model(tiny_gpt(), LoraConfig(r=2, use_dora=True))
    fresh.load_peft_state_dict(state)
    np.testing.assert_array_equal(logits(fresh, idx), y)
    before = {k: v.copy() for k, v in fresh.peft_state_dict().items()}
    bad = dict(state)
    bad["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"] = np.zeros((3, 16), np.float32)
    del bad["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"]
    bad["base_model.model.extra.weight"] = np.zeros(2)
    with pytest.raises(ValueError, match="model unchanged") as e:
        fresh.load_peft_state_dict(bad)
    assert "missing" in str(e.value) and "unexpected" in str(e.value) and "(3, 16)" in str(e.value)
    for k, v in fresh.peft_state_dict().items():
        np.testing.assert_array_equal(v, before[k])


# ------------------------------------------------------------------- configs


PEFT_FORMAT_3_3 = {  # peft-format.md §3.3, GPT-2 small LoRA r=8 on c_attn
    "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "gpt2", "bias": "none",
    "fan_in_fan_out": True, "inference_mode": True, "init_lora_weights": True, "layer_replication": None,
    "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_dropout": 0.0,
    "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None, "peft_type": "LORA", "r": 8,
    "rank_pattern": {}, "revision": None, "target_modules": ["c_attn"], "task_type": "CAUSAL_LM", "use_dora": False,
    "use_rslora": False,
}


def test_lora_config_to_dict_is_peft_json():
    cfg = LoraConfig(target_modules=["c_attn"], base_model_name_or_path="gpt2", fan_in_fan_out=True,
                     inference_mode=True, seed=5)
    d = cfg.to_dict()
    assert {k: d[k] for k in PEFT_FORMAT_3_3} == PEFT_FORMAT_3_3
    assert set(d) - set(PEFT_FORMAT_3_3) == {"exclude_modules"} and "seed" not in d
    assert list(d) == sorted(d)
    back = PeftConfig.from_dict(json.loads(json.dumps(d)))
    assert isinstance(back, LoraConfig) and back.to_dict() == d


def test_from_dict_errors_and_peft_extras():
    with pytest.raises(ValueError, match="unknown peft_type 'ADALORA'"):
        PeftConfig.from_dict({"peft_type": "ADALORA", "target_modules": ["c_attn"]})
    with pytest.raises(ValueError, match="no 'peft_type'"):
        PeftConfig.from_dict({"r": 8})
    with pytest.raises(ValueError, match=r"unknown fields \['rank'\]"):
        PeftConfig.from_dict({"peft_type": "LORA", "rank": 8})
    with pytest.warns(UserWarning, match="dropped"):
        assert LoraConfig.from_dict({"peft_type": "LORA", "rank": 8}, strict=False).r == 8
    with pytest.raises(ValueError, match="lora_bias=True"):
        PeftConfig.from_dict({"peft_type": "LORA", "lora_bias": True})
    with pytest.raises(ValueError, match="expected 'LOHA'"):
        LoHaConfig.from_dict({"peft_type": "LORA"})
    # what peft 0.21 writes for a default LoRA: extra fields at their defaults are accepted
    cfg = PeftConfig.from_dict({"peft_type": "LORA", "peft_version": "0.21.2", "lora_bias": False, "use_qalora": False,
                                "qalora_group_size": 16, "target_parameters": None, "eva_config": None,
                                "target_modules": ["c_attn"], "exclude_modules": None})
    assert cfg.r == 8 and cfg.target_modules == ["c_attn"]
    assert isinstance(PeftConfig.from_dict(VeraConfig().to_dict()), VeraConfig)
    assert "exclude_modules" not in VeraConfig().to_dict()


def test_registry_and_set_targets():
    assert {"LORA", "LOHA", "LOKR", "VERA"} <= set(REGISTRY)
    assert LoraConfig(target_modules={"c_fc", "c_attn"}).target_modules == ["c_attn", "c_fc"]
    with pytest.raises(TypeError, match="PeftConfig"):
        get_peft_model(tiny_gpt(), {"peft_type": "LORA"})


def test_works_on_any_module_tree():
    class Tree(Module):
        def __init__(self):
            super().__init__()
            self.proj = Linear(4, 6, rng=0)

        def forward(self, x):
            return self.proj(x)
    model = get_peft_model(Tree(), LoraConfig(r=2, target_modules=["proj"]))
    assert isinstance(model, PeftModel) and isinstance(model.base_model.model.proj, LoraLayer)
    assert base_weights(model).keys() == {"base_model.model.proj.base_layer.weight",
                                          "base_model.model.proj.base_layer.bias"}


def test_extension_points_with_a_model_level_method():
    """A toy method in the shape prompt/prefix tuning will take: no wrapped layers, state on the PeftModel."""
    from dataclasses import dataclass

    from minipeft.nn import Parameter, ParameterDict
    from minipeft.peft import PeftMethod, register

    @dataclass
    class ShiftConfig(PeftConfig):
        peft_type = "TOY_SHIFT"
        json_omit = ("target_modules", "exclude_modules", "modules_to_save")
        vocab_size: int = 23  # size of the learned logit shift

    @register
    class ShiftMethod(PeftMethod):
        config_class, mergeable = ShiftConfig, False

        @classmethod
        def find_targets(cls, model, config):
            return []

        @classmethod
        def prepare(cls, peft_model, config, adapter_name, targets):
            if "shift" not in peft_model._modules:
                peft_model.shift = ParameterDict()
            peft_model.shift[adapter_name] = Parameter(np.zeros(config.vocab_size, np.float32))

        @classmethod
        def forward(cls, peft_model, *args, **kwargs):
            out = peft_model.base_model(*args, **kwargs)
            out.logits = out.logits + peft_model.shift[peft_model.active_adapter]
            return out

        @classmethod
        def extra_adapter_state(cls, peft_model, adapter_name):
            return [(f"shift.{adapter_name}", "shift", peft_model.shift[adapter_name])]

        @classmethod
        def set_adapter(cls, peft_model, adapter_name, inference_mode):
            for name, p in peft_model.shift.items():
                p.requires_grad = name == adapter_name and not inference_mode

        @classmethod
        def delete_adapter(cls, peft_model, adapter_name):
            if "shift" in peft_model._modules and adapter_name in peft_model.shift:
                del peft_model.shift[adapter_name]

    try:
        base = tiny_gpt()
        idx, _ = batch()
        y0 = logits(base, idx)
        model = get_peft_model(base, ShiftConfig())
        np.testing.assert_array_equal(logits(model, idx), y0)
        assert model.get_nb_trainable_parameters()[0] == 23 and list(model.peft_state_dict()) == ["shift"]
        assert "target_modules" not in model.peft_config["default"].to_dict()
        model.add_adapter("two", ShiftConfig())
        model.load_peft_state_dict({"shift": np.ones(23, np.float32)}, "two")
        model.set_adapter("two")
        np.testing.assert_allclose(logits(model, idx), y0 + 1, atol=1e-6)
        assert [n for n, p in model.named_parameters() if p.requires_grad] == ["shift.two"]
        with model.disable_adapter():
            np.testing.assert_array_equal(logits(model, idx), y0)
        with pytest.raises(TypeError, match="cannot be merged"):
            model.merge_and_unload()
        model.delete_adapter("default")
        assert list(model.shift) == ["two"]
    finally:
        REGISTRY.pop("TOY_SHIFT", None)
