"""peft-format adapter files: round trips, peft's own files (fixtures), peft loading ours, failures.

The fixtures under tests/fixtures/peft_<method>/ were written by Hugging Face peft for the
tiny random GPT-2 in tests/fixtures/hf_gpt2_tiny (see make_peft_fixtures.py). Where peft,
transformers and torch are importable, files minipeft writes are also loaded into peft.
"""
import json
import os
import shutil
import warnings

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import minipeft.peft as mp
from minipeft.gpt import GPT, GPTConfig
from minipeft.peft import (LoHaConfig, LoKrConfig, LoraConfig, PeftModel, VeraConfig, from_pretrained,
                           get_peft_model, load_adapter, save_adapter)
from minipeft.peft.io import adapter_config_dict

from ..crosscheck import import_or_none
from . import batch, logits, perturb, tiny_gpt

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")
HF_DIR = os.path.join(FIXTURES, "hf_gpt2_tiny")
REL_TOL = 1e-5  # max |ours - reference| / max |reference|


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


# Every method, configured for the GPT-2 module names; non-trivial weights come from perturb().
METHODS = [
    pytest.param("lora", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]), id="lora"),
    pytest.param("rslora_dropout", lambda: LoraConfig(r=4, lora_alpha=16, use_rslora=True, lora_dropout=0.1),
                 id="rslora_dropout"),
    pytest.param("dora", lambda: LoraConfig(r=2, use_dora=True, target_modules=["c_attn", "c_proj"]), id="dora"),
    pytest.param("lora_bias_all", lambda: LoraConfig(r=2, bias="all"), id="lora_bias_all"),
    pytest.param("lora_modules_to_save", lambda: LoraConfig(r=2, modules_to_save=["ln_f"]), id="lora_modules_to_save"),
    pytest.param("loha", lambda: LoHaConfig(r=2, alpha=4, target_modules=["c_attn", "mlp.c_proj"]), id="loha"),
    pytest.param("lokr", lambda: LoKrConfig(r=2, target_modules=["c_attn"]), id="lokr"),
    pytest.param("vera", lambda: VeraConfig(r=8, target_modules=["c_attn", "c_fc"]), id="vera"),
    pytest.param("ia3", lambda: mp.IA3Config(), id="ia3"),
    pytest.param("prompt_tuning", lambda: mp.PromptTuningConfig(num_virtual_tokens=4), id="prompt_tuning"),
    pytest.param("prefix_tuning", lambda: mp.PrefixTuningConfig(num_virtual_tokens=4), id="prefix_tuning"),
    pytest.param("prefix_tuning_projection", lambda: mp.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True,
                                                                           encoder_hidden_size=8),
                 id="prefix_tuning_projection"),
    pytest.param("houlsby", lambda: mp.HoulsbyConfig(adapter_size=4), id="houlsby"),
    pytest.param("pfeiffer", lambda: mp.PfeifferConfig(reduction_factor=4), id="pfeiffer"),
    pytest.param("bitfit", lambda: mp.BitFitConfig(), id="bitfit"),
    pytest.param("top_k_blocks", lambda: mp.TopKBlocksConfig(top_k_blocks=1), id="top_k_blocks"),
    pytest.param("full", lambda: mp.FullFineTuningConfig(), id="full"),
    pytest.param("side_tuning", lambda: mp.SideTuningConfig(reduction_factor=4), id="side_tuning"),
    pytest.param("lst", lambda: mp.LSTConfig(reduction_factor=4), id="lst"),
    pytest.param("qst", lambda: mp.QSTConfig(reduction_factor=4, compute_dtype="float32"), id="qst"),
]


def test_every_registered_method_has_a_case():
    """Here, or as a recipe of the method table (test_method_table.py saves and loads every recipe)."""
    recipes = {r.config(2, 16).peft_type for r in mp.method_table().values()}
    assert {p.values[1]().peft_type for p in METHODS} | recipes == set(mp.REGISTRY)


def model_state(model) -> dict:
    """Everything a failed load must not change: parameters (values, trainability), modules, adapters."""
    out = {
        "params": {n: (p.data.copy(), p.requires_grad) for n, p in model.named_parameters()},
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "training": [m.training for _, m in model.named_modules()],
    }
    if isinstance(model, PeftModel):
        out["adapters"] = list(model.peft_config)
        out["active"] = model.active_adapter
        out["configs"] = {k: v.to_dict() for k, v in model.peft_config.items()}
        out["merged"] = [list(m.merged_adapters) for m in model.modules() if isinstance(m, mp.BaseTunerLayer)]
    return out


def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    assert before["modules"] == after["modules"]
    assert before["params"].keys() == after["params"].keys()
    for n, (data, flag) in before["params"].items():
        assert after["params"][n][1] == flag, n
        np.testing.assert_array_equal(after["params"][n][0], data, err_msg=n)
    for k in ("training", "adapters", "active", "configs", "merged"):
        assert before.get(k) == after.get(k), k


def saved_peft_model(tmp_path, make_config, seed=0, **gpt_kw):
    model = get_peft_model(tiny_gpt(**gpt_kw), make_config())
    perturb(model, 0.3, seed=seed)
    save_adapter(model, tmp_path)
    return model


# ------------------------------------------------------------------ minipeft -> minipeft


@pytest.mark.parametrize("method,make_config", METHODS)
def test_round_trip_identical_outputs(tmp_path, method, make_config):
    model = saved_peft_model(tmp_path, make_config)
    idx, _ = batch()
    want = logits(model, idx)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = from_pretrained(tiny_gpt(), tmp_path)
    np.testing.assert_array_equal(logits(loaded, idx), want)
    a, b = model.peft_state_dict(), loaded.peft_state_dict()
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert not any(p.requires_grad for p in loaded.parameters())  # peft's default: inference only
    cfg, want_cfg = loaded.peft_config["default"].to_dict(), model.peft_config["default"].to_dict()
    assert cfg.pop("inference_mode") and not want_cfg.pop("inference_mode")
    assert cfg == want_cfg


@pytest.mark.parametrize("method,make_config", [m for m in METHODS if m.id in ("lora", "vera", "ia3", "prompt_tuning")])
def test_is_trainable_marks_only_adapter_trainable(tmp_path, method, make_config):
    model = saved_peft_model(tmp_path, make_config)
    loaded = from_pretrained(tiny_gpt(), tmp_path, is_trainable=True)
    want = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert want and sorted(n for n, p in loaded.named_parameters() if p.requires_grad) == want


def test_file_format(tmp_path):
    model = saved_peft_model(tmp_path, lambda: LoraConfig(r=2, target_modules=["c_attn"]))
    text = open(tmp_path / "adapter_config.json").read()
    d = json.loads(text)
    assert text == json.dumps(d, indent=2, sort_keys=True)  # peft's serialization
    assert d["peft_type"] == "LORA" and d["inference_mode"] is True and d["fan_in_fan_out"] is True
    assert "seed" not in d  # minipeft-only runtime field
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "np") as f:
        meta = f.metadata()  # peft's {"format": "pt"}, plus minipeft's digests (peft ignores other keys)
        assert meta.pop("format") == "pt" and sorted(meta) == ["minipeft_config_sha256", "minipeft_sha256"]
        keys = sorted(f.keys())
        assert all(f.get_slice(k).get_dtype() == "F32" for k in keys)
    assert keys == sorted(f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{m}.weight"
                          for i in range(2) for m in "AB")
    assert not model.peft_config["default"].inference_mode  # saving does not change the model's config


def test_base_model_name_or_path(tmp_path):
    model = get_peft_model(tiny_gpt(), LoraConfig(r=2))
    save_adapter(model, tmp_path / "a", base_model_name_or_path="my/base")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] == "my/base"
    save_adapter(model, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    loaded = from_pretrained(tiny_gpt(), tmp_path / "a")
    assert loaded.peft_config["default"].base_model_name_or_path == "my/base"


def test_named_adapters_subfolders_and_loading_into_a_peft_model(tmp_path):
    model = get_peft_model(tiny_gpt(), LoraConfig(r=2, seed=1))
    model.add_adapter("other", LoraConfig(r=3, target_modules=["c_fc"], seed=2))
    perturb(model, 0.3)  # only the active "default" is trainable: perturb "other" by hand
    for n, p in model.named_parameters():
        if ".other." in n:
            p.data = p.data + np.float32(0.3)
    idx, _ = batch()
    want_default = logits(model, idx)
    model.set_adapter("other")
    want_other = logits(model, idx)
    save_adapter(model, tmp_path, "default")
    out = save_adapter(model, tmp_path, "other")
    assert out == os.path.join(str(tmp_path), "other") and os.path.isfile(tmp_path / "other" / "adapter_config.json")
    loaded = from_pretrained(tiny_gpt(), tmp_path)
    same = load_adapter(loaded, tmp_path, "other")  # found in its subfolder
    assert same is loaded and loaded.active_adapter == "default"
    np.testing.assert_array_equal(logits(loaded, idx), want_default)
    loaded.set_adapter("other")
    np.testing.assert_array_equal(logits(loaded, idx), want_other)


# ------------------------------------------------------------------ peft's files -> minipeft


PEFT_FIXTURES = ["lora", "dora", "ia3", "prompt_tuning", "prefix_tuning"]


def fixture_dir(method: str) -> str:
    return os.path.join(FIXTURES, f"peft_{method}")


@pytest.mark.parametrize("method", PEFT_FIXTURES)
def test_peft_fixture_gives_peft_logits(method):
    ref = load_file(os.path.join(FIXTURES, f"peft_{method}_logits.safetensors"))
    base = GPT.from_hf(HF_DIR)
    T = ref["input_ids"].shape[1]
    assert rel_err(logits(base, ref["input_ids"]), ref["base_logits"]) < REL_TOL
    model = from_pretrained(base, fixture_dir(method))
    got = logits(model, ref["input_ids"])
    assert got.shape == ref["logits"].shape
    assert rel_err(got, ref["logits"]) < REL_TOL
    assert rel_err(got[:, -T:], ref["base_logits"]) > 0.05  # the adapter really changes the output


@pytest.mark.parametrize("method", PEFT_FIXTURES)
def test_resaving_peft_fixture_reproduces_peft_files(tmp_path, method):
    """Load peft's file, save it again: same tensors (keys, shapes, values) and the same config values."""
    model = from_pretrained(GPT.from_hf(HF_DIR), fixture_dir(method))
    save_adapter(model, tmp_path)
    theirs = load_file(os.path.join(fixture_dir(method), "adapter_model.safetensors"))
    ours = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    c_theirs = json.load(open(os.path.join(fixture_dir(method), "adapter_config.json")))
    c_ours = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(c_ours) <= set(c_theirs), sorted(set(c_ours) - set(c_theirs))
    for k, v in c_ours.items():
        if k == "target_modules" and isinstance(v, list):
            assert sorted(v) == sorted(c_theirs[k])
        else:
            assert v == c_theirs[k], k


def test_prompt_tuning_text_init_file_loads(tmp_path):
    """A prompt trained from TEXT with GPT-2's tokenizer: the init does not matter when loading, so
    minipeft (which never downloads a tokenizer) still loads it, and saving writes the file's fields back."""
    shutil.copytree(fixture_dir("prompt_tuning"), tmp_path / "text")
    edit_config(tmp_path / "text", prompt_tuning_init="TEXT", prompt_tuning_init_text="Classify the review:",
                tokenizer_name_or_path="gpt2")
    ref = load_file(os.path.join(FIXTURES, "peft_prompt_tuning_logits.safetensors"))
    model = from_pretrained(GPT.from_hf(HF_DIR), tmp_path / "text")
    assert rel_err(logits(model, ref["input_ids"]), ref["logits"]) < REL_TOL
    save_adapter(model, tmp_path / "again")
    d = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert (d["prompt_tuning_init"], d["prompt_tuning_init_text"], d["tokenizer_name_or_path"]) == (
        "TEXT", "Classify the review:", "gpt2")


def test_gpt2_small_lora_config_equals_peft_example(tmp_path):
    """peft-format.md §3.3: GPT-2 small, LoRA r=8 on c_attn: every field as peft writes it; 24 tensors."""
    example = {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "gpt2", "bias": "none",
        "fan_in_fan_out": True, "inference_mode": True, "init_lora_weights": True, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8,
        "lora_dropout": 0.0, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
        "peft_type": "LORA", "r": 8, "rank_pattern": {}, "revision": None, "target_modules": ["c_attn"],
        "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False,
    }
    gpt = GPT(GPTConfig.preset("gpt2"), init_weights=False)
    model = get_peft_model(gpt, LoraConfig(r=8, target_modules=["c_attn"]))
    d = adapter_config_dict(model, base_model_name_or_path="gpt2")
    assert {k: d[k] for k in example} == example
    assert set(d) - set(example) == {"exclude_modules"} and d["exclude_modules"] is None  # newer peft writes it
    shapes = {k: tuple(v.shape) for k, v in model.peft_state_dict().items()}
    assert len(shapes) == 24
    assert shapes["base_model.model.transformer.h.11.attn.c_attn.lora_A.weight"] == (8, 768)
    assert shapes["base_model.model.transformer.h.11.attn.c_attn.lora_B.weight"] == (2304, 8)
    peft = import_or_none("peft")  # the comparison with peft's own config, where peft is installed
    if peft is None:
        return
    theirs = json.loads(json.dumps(peft.LoraConfig(r=8, target_modules=["c_attn"], task_type="CAUSAL_LM",
                                                   base_model_name_or_path="gpt2", fan_in_fan_out=True,
                                                   inference_mode=True).to_dict(), default=sorted))
    assert set(d) <= set(theirs)
    assert {k: theirs[k] for k in d} == d


# ------------------------------------------------------------------ minipeft -> peft (needs peft)


PEFT_SIDE = [
    pytest.param("lora", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]), id="lora"),
    pytest.param("dora", lambda: LoraConfig(r=4, lora_alpha=16, use_rslora=True, use_dora=True,
                                            target_modules=["c_attn", "c_proj"]), id="dora"),
    pytest.param("lora_bias_all", lambda: LoraConfig(r=2, bias="all"), id="lora_bias_all"),
    pytest.param("vera", lambda: VeraConfig(r=8, target_modules=["c_attn", "mlp.c_proj"]), id="vera"),
    pytest.param("ia3", lambda: mp.IA3Config(), id="ia3"),
    pytest.param("prompt_tuning", lambda: mp.PromptTuningConfig(num_virtual_tokens=6), id="prompt_tuning"),
    pytest.param("prefix_tuning", lambda: mp.PrefixTuningConfig(num_virtual_tokens=6), id="prefix_tuning"),
    pytest.param("prefix_tuning_projection", lambda: mp.PrefixTuningConfig(num_virtual_tokens=6, prefix_projection=True,
                                                                           encoder_hidden_size=16),
                 id="prefix_tuning_projection"),
]


@pytest.mark.parametrize("method,make_config", PEFT_SIDE)
def test_minipeft_file_loads_into_peft(tmp_path, method, make_config):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from transformers import GPT2LMHeadModel

    model = get_peft_model(GPT.from_hf(HF_DIR), make_config())
    perturb(model, 0.3, seed=3)
    ids = np.random.default_rng(4).integers(0, 100, (2, 10))
    ours = logits(model, ids)
    save_adapter(model, tmp_path, base_model_name_or_path=HF_DIR)
    hf = GPT2LMHeadModel.from_pretrained(HF_DIR).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing adapter keys")
        theirs_model = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    want = peft.get_peft_model_state_dict(theirs_model)  # what peft itself would save
    got = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in want.items()}
    with torch.no_grad():
        theirs = theirs_model(input_ids=torch.tensor(ids)).logits.float().numpy()
    assert theirs.shape == ours.shape
    assert rel_err(ours, theirs) < REL_TOL


# ------------------------------------------------------------------ failures leave the model as it was


def edit_config(path, **changes) -> None:
    p = os.path.join(path, "adapter_config.json")
    d = json.load(open(p))
    d.update(changes)
    json.dump(d, open(p, "w"))


def expect_failure(model, directory, exc, match, adapter_name=None, **kw):
    if adapter_name is None:
        adapter_name = "new" if isinstance(model, PeftModel) else "default"
    before = model_state(model)
    idx, _ = batch()
    out_before = logits(model, idx)
    with pytest.raises(exc, match=match) as info:
        load_adapter(model, directory, adapter_name, **kw)
    assert_same_state(before, model_state(model))
    np.testing.assert_array_equal(logits(model, idx), out_before)
    return str(info.value)


@pytest.fixture
def lora_dir(tmp_path):
    saved_peft_model(tmp_path / "lora", lambda: LoraConfig(r=2, target_modules=["c_attn", "c_fc"]))
    return tmp_path / "lora"


def targets():
    """A plain model and a PeftModel (existing LoRA on c_proj only), both to be left unchanged."""
    peft_model = get_peft_model(tiny_gpt(), LoraConfig(r=2, target_modules=["c_proj"]))
    perturb(peft_model, 0.3)
    return [tiny_gpt(), peft_model]


@pytest.mark.parametrize("which", [0, 1], ids=["plain", "peft_model"])
def test_other_base_shape_fails_cleanly(lora_dir, which):
    """Wider model: shape mismatch; deeper file: tensors for layers the model lacks."""
    model = [tiny_gpt(n_embd=32), get_peft_model(tiny_gpt(n_embd=32), LoraConfig(r=2, target_modules=["c_proj"]))]
    msg = expect_failure(model[which], lora_dir, ValueError, "shape mismatches")
    assert str(lora_dir) in msg and "file (2, 16) vs model (2, 32)" in msg
    deeper = lora_dir.parent / "deep"
    saved_peft_model(deeper, lambda: LoraConfig(r=2), n_layer=3)
    msg = expect_failure(targets()[which], deeper, ValueError, "unexpected")
    assert "transformer.h.2.attn.c_attn" in msg


@pytest.mark.parametrize("method,make_config", METHODS)
def test_every_method_rejects_another_base_shape_cleanly(tmp_path, method, make_config):
    """A file for a wider or deeper base fails on a plain model, and joining a LoRA model fails, all cleanly."""
    saved_peft_model(tmp_path / "wide", make_config, n_embd=32)
    msg = expect_failure(tiny_gpt(), tmp_path / "wide", ValueError, "cannot load the adapter")
    assert str(tmp_path / "wide") in msg
    saved_peft_model(tmp_path / "deep", make_config, n_layer=3)
    expect_failure(tiny_gpt(), tmp_path / "deep", ValueError, "cannot load the adapter")
    if method not in ("lora", "rslora_dropout", "dora", "lora_bias_all", "lora_modules_to_save"):
        expect_failure(targets()[1], tmp_path / "wide", ValueError, "cannot join this LORA model")


@pytest.mark.parametrize("which", [0, 1], ids=["plain", "peft_model"])
def test_module_not_found_fails_cleanly(lora_dir, which):
    edit_config(lora_dir, target_modules=["q_proj", "v_proj"])
    msg = expect_failure(targets()[which], lora_dir, ValueError, "matches no module")
    assert str(lora_dir) in msg and "c_attn" in msg  # lists the model's modules


@pytest.mark.parametrize("which", [0, 1], ids=["plain", "peft_model"])
def test_missing_or_extra_tensor_fails_cleanly(lora_dir, which):
    path = str(lora_dir / "adapter_model.safetensors")
    tensors = load_file(path)
    extra = dict(tensors, **{"base_model.model.transformer.h.0.attn.c_attn.lora_C.weight": np.zeros((2, 2), "f4")})
    save_file(extra, path, metadata={"format": "pt"})
    expect_failure(targets()[which], lora_dir, ValueError, "unexpected .*lora_C")
    tensors.pop("base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight")
    save_file(tensors, path, metadata={"format": "pt"})
    expect_failure(targets()[which], lora_dir, ValueError, "missing .*h.1.mlp.c_fc.lora_B")


def test_other_method_fails_cleanly(tmp_path):
    saved_peft_model(tmp_path, lambda: LoHaConfig(r=2))
    msg = expect_failure(targets()[1], tmp_path, ValueError, "LOHA adapter cannot join this LORA model")
    assert str(tmp_path) in msg


def test_unknown_peft_type_and_bad_fields_fail_cleanly(lora_dir):
    edit_config(lora_dir, peft_type="NOT_A_METHOD")
    for model in targets():
        expect_failure(model, lora_dir, ValueError, "unknown peft_type 'NOT_A_METHOD'")
    edit_config(lora_dir, peft_type="LORA", use_qalora=True)  # a peft feature minipeft lacks
    for model in targets():
        expect_failure(model, lora_dir, ValueError, "use_qalora")
    edit_config(lora_dir, use_qalora=False, r=-1)
    for model in targets():
        expect_failure(model, lora_dir, ValueError, "adapter_config.json.*positive integer")


def test_damaged_files_fail_cleanly(lora_dir):
    weights, cfg = lora_dir / "adapter_model.safetensors", lora_dir / "adapter_config.json"
    good_weights, good_cfg = weights.read_bytes(), cfg.read_text()
    weights.write_bytes(good_weights[: len(good_weights) // 2])  # truncated
    for model in targets():
        msg = expect_failure(model, lora_dir, ValueError, "not a readable safetensors file")
        assert str(weights) in msg
    weights.write_bytes(b"")
    expect_failure(tiny_gpt(), lora_dir, ValueError, "not a readable safetensors file")
    weights.write_bytes(good_weights)
    cfg.write_text(good_cfg[:-20])  # cut JSON
    for model in targets():
        msg = expect_failure(model, lora_dir, ValueError, "not valid JSON")
        assert str(cfg) in msg
    cfg.write_text("[1, 2]")
    expect_failure(tiny_gpt(), lora_dir, ValueError, "JSON object")
    cfg.write_text(good_cfg)
    assert isinstance(load_adapter(tiny_gpt(), lora_dir), PeftModel)  # intact again: loads


def test_missing_files_fail_cleanly(lora_dir, tmp_path):
    expect_failure(tiny_gpt(), tmp_path / "nowhere", FileNotFoundError, "adapter directory .*nowhere not found")
    weights = lora_dir / "adapter_model.safetensors"
    os.rename(weights, lora_dir / "adapter_model.bin")
    for model in targets():
        msg = expect_failure(model, lora_dir, FileNotFoundError, "adapter_model.safetensors not found")
        assert "pickle" in msg
    os.rename(lora_dir / "adapter_model.bin", weights)
    os.remove(lora_dir / "adapter_config.json")
    expect_failure(tiny_gpt(), lora_dir, FileNotFoundError, "adapter_config.json not found")


def test_existing_adapter_name_and_merged_model(lora_dir):
    model = targets()[1]
    expect_failure(model, lora_dir, ValueError, "already exists", adapter_name="default")
    model.merge_adapter()  # a failed load into a merged model must not unmerge it
    bad = lora_dir.parent / "bad"
    shutil.copytree(lora_dir, bad)
    edit_config(bad, r=3)
    msg = expect_failure(model, bad, ValueError, "shape mismatches", adapter_name="new")
    assert "file (2, 16) vs model (3, 16)" in msg
    load_adapter(model, lora_dir, "new")  # a good file still loads into the merged model
    assert "new" in model.peft_config and all(m.merged_adapters == ["default"] for m in model.modules()
                                              if isinstance(m, mp.BaseTunerLayer) and "default" in m.adapter_names)


def test_save_errors(tmp_path):
    with pytest.raises(TypeError, match="needs a PeftModel"):
        save_adapter(tiny_gpt(), tmp_path)
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        save_adapter(get_peft_model(tiny_gpt(), LoraConfig(r=2)), tmp_path, "nope")
    with pytest.raises(TypeError, match="plain base model"):
        from_pretrained(get_peft_model(tiny_gpt(), LoraConfig(r=2)), tmp_path)
    assert not os.listdir(tmp_path)


@pytest.mark.gpu
def test_round_trip_between_devices(tmp_path):
    model = get_peft_model(tiny_gpt(), LoraConfig(r=2, use_dora=True))
    perturb(model, 0.3)
    idx, _ = batch()
    model.to("cuda")
    want = np.asarray(model(idx).logits.data.get())
    save_adapter(model, tmp_path)
    np.testing.assert_allclose(logits(from_pretrained(tiny_gpt(), tmp_path), idx), want, rtol=1e-5, atol=1e-5)
    back = from_pretrained(tiny_gpt().to("cuda"), tmp_path)
    np.testing.assert_array_equal(back(idx).logits.data.get(), want)
