"""The peft_methods lesson in quick mode: it runs every method, and its numbers are sane.

One run of ``main(["--quick"])`` (seconds) is shared by the checks below.
"""
import math

import numpy as np
import pytest

from minipeft.lessons import peft_methods


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("peft_methods")
    res = peft_methods.main(["--quick", "--figures", str(out / "figures"), "--json", str(out / "r.json")])
    return res | {"_out": out}


def test_table_has_every_method_with_finite_numbers(result):
    methods = result["methods"]
    assert list(methods) == list(peft_methods.METHODS)
    assert math.isfinite(result["base_val_loss"])
    for name, r in methods.items():
        assert math.isfinite(r["val_loss"]), name
        assert r["trainable"] > 0 and r["kept"] > 0, name
        assert r["ms_per_step"] > 0 and r["tokens_per_sec"] > 0, name
        mem = r["memory"]
        assert mem["activations"] > 0 and mem["gradients"] > 0 and mem["optimizer_state"] > 0, name
        # AdamW keeps two moments per trainable parameter (float32): 8 bytes each
        assert mem["optimizer_state"] == 8 * r["trainable"], name
    assert result["not_lowered"] == [n for n, r in methods.items() if not r["val_loss"] < result["base_val_loss"]]


def test_parameter_counts(result):
    m = result["methods"]
    assert m["full"]["trainable_pct"] == pytest.approx(100.0)
    assert m["full"]["memory"]["weights_frozen"] == 0
    assert m["bitfit"]["trainable"] < m["lora"]["trainable"] < m["full"]["trainable"]
    assert m["lora"]["trainable"] == m["rslora"]["trainable"] == m["loha"]["trainable"]  # LoHa r=4 ~ LoRA r=8
    assert m["dora"]["trainable"] > m["lora"]["trainable"]  # + one magnitude per output feature
    assert m["prefix"]["kept"] < m["prefix"]["trainable"]  # the MLP is dropped after training
    assert m["vera"]["kept"] == m["vera"]["trainable"]  # b and d only; A and B regenerate from the seed


def test_measured_memory_matches_the_calculator(result):
    for name, predicted in result["memory_predicted"].items():
        assert result["methods"][name]["memory"]["total"] == pytest.approx(predicted, rel=0.02), name


def test_prefix_mlp_removal_keeps_the_model(result):
    p = result["methods"]["prefix"]
    assert p["val_loss"] == pytest.approx(p["val_with_mlp"], abs=1e-5)


def test_adapters_and_scale_parts(result):
    r2 = result["adapters_vs_full"]
    for m in peft_methods.PAIR:
        assert [p["tokens"] for p in r2["data"][m]] == [1_000, 10_000]
        assert all(math.isfinite(p["best_val"]) and p["steps"] > 0 and len(p["runs"]) >= 1 for p in r2["data"][m])
        assert all(math.isfinite(v) for v in r2["lr"][m].values())
    assert set(r2["sensitivity"]) == set(peft_methods.PAIR)
    rows = result["scale"]
    assert [r["size"] for r in rows] == ["tiny", "small"]
    assert rows[0]["params"] < rows[1]["params"]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("base", "full", "prompt", "gap", "english_val"))
        assert r["pretrain_steps"] == rows[0]["pretrain_steps"]  # every size gets the same pretraining


def test_outputs_written(result):
    out = result["_out"]
    assert (out / "r.json").is_file()
    for name in ("peft_methods", "peft_methods_adapters", "peft_methods_scale"):
        assert (out / "figures" / f"{name}.png").is_file()


def test_lr_sensitivity_and_early_stopping():
    s = peft_methods.lr_sensitivity({1e-3: 2.0, 1e-2: 2.03, 1e-1: float("nan")})
    assert s["best"] == 2.0 and s["best_lr"] == 1e-3 and s["near_best"] == 2 and s["diverged"] == 1
    assert s["spread"] == pytest.approx(0.03)

    class R:
        eval_history = [(10, {"val_loss": 2.0}), (20, {"val_loss": 1.9}), (30, {"val_loss": 1.95}),
                        (40, {"val_loss": 1.96})]
    cb = peft_methods._early_stop(patience=2)
    assert cb(40, {"result": R}) is True
    assert not peft_methods._early_stop(patience=3)(40, {"result": R})
    assert cb(41, {"result": R}) is None  # no evaluation at this step


def test_bad_lr_override():
    with pytest.raises(ValueError, match="METHOD=VALUE"):
        peft_methods._parse_lr(["nonsense=1e-3"])
    assert peft_methods._parse_lr(["lora=1e-2"]) == {"lora": 1e-2}
    assert all(lr > 0 for lr in peft_methods.LR.values()) and set(peft_methods.LR) == set(peft_methods.METHODS)
