"""The peft_methods lesson in quick mode: it runs every method, and its numbers are sane.

One run of ``main(["--quick"])`` (seconds) is shared by the checks below.
"""
import math

import numpy as np
import pytest

from minipeft.lessons import peft_methods
from . import recorded


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("peft_methods")
    res = recorded.run(peft_methods, ["--quick", "--figures", str(out / "figures"), "--json", str(out / "r.json")])
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
        pts = r2["data"][m]
        assert [p["tokens"] for p in pts] == [1_000, 10_000]
        for p in pts:
            assert p["seeds"] == [0, 1] and len(p["reported"]) == 2 and all(math.isfinite(v) for v in p["reported"])
            assert p["reported_mean"] == pytest.approx(np.mean(p["reported"]))
            assert p["reported_std"] == pytest.approx(np.std(p["reported"], ddof=1))
            assert all(b >= r2["warmup_steps"] for b in p["best_step"])  # never selected inside warm-up
            assert all(1 <= b <= st for b, st in zip(p["best_step"], p["steps"]))
            assert 0 <= p["better_in_warmup"] <= 2 and p["diverged"] == 0
        own = list(peft_methods.lr_grid(peft_methods.LR[m], (-1, 1)))  # around the method's own LR
        assert r2["sensitivity"][m]["grid"] == own and set(own) <= set(r2["lr_grid"])
        assert list(r2["lr"][m]) == r2["lr_grid"] == r2["sensitivity_same_lrs"][m]["grid"]  # one grid for both
        assert all(len(v) == 2 and all(math.isfinite(x) for x in v) for v in r2["lr_runs"][m].values())
        for sens in (r2["sensitivity"][m], r2["sensitivity_same_lrs"][m]):
            assert len(sens["spread_runs"]) == 2 and sens["spread_mean"] == pytest.approx(np.mean(sens["spread_runs"]))
            assert sens["recipe_lr"] == peft_methods.LR[m]
    for row, f, h in zip(r2["by_size"], r2["data"]["full"], r2["data"]["houlsby"]):
        assert row["full_mean"] == f["reported_mean"] and row["houlsby_std"] == h["reported_std"]
        np.testing.assert_allclose(row["houlsby_minus_full"], np.subtract(h["reported"], f["reported"]))
    assert r2["verdicts"] == peft_methods.adapter_verdicts(r2["by_size"], r2["sensitivity"],
                                                          r2["sensitivity_same_lrs"])
    rows = result["scale"]
    assert [r["size"] for r in rows] == ["tiny", "small"]
    assert rows[0]["params"] < rows[1]["params"]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("base", "full", "prompt", "gap", "english_val"))
        assert r["pretrain_steps"] == rows[0]["pretrain_steps"]  # every size gets the same pretraining
    assert result["prompt_gap_by_size"] == {r["size"]: r["gap"] for r in rows}
    assert result["scale_note"].startswith("2 base sizes on the CPU (tiny, small), not 3")


def test_gpu_settings_use_three_bases_and_every_mode_three_seeds():
    from types import SimpleNamespace

    for device, quick in (("cuda", False), ("cpu", False)):
        s = peft_methods._settings(SimpleNamespace(seed=0, device=device, quick=quick))
        assert s["data_seeds"] >= 3 and s["lr_seeds"] >= 3 and len(s["lr_offsets"]) >= 5
    assert len(peft_methods._settings(SimpleNamespace(seed=0, device="cuda", quick=False))["scale_sizes"]) >= 3


def test_reported_loss_is_the_disjoint_slice_at_the_selected_step(result):
    """Re-train to the selected step by hand: the reported slice then gives exactly the reported number."""
    from minipeft import pretrained
    from minipeft.data import Corpus, lm_batches
    from minipeft.train import train

    s = dict(peft_methods._settings(peft_methods.parse_args(["--quick"], "")), data_steps=40, patience=1)
    base = pretrained.load("tiny", "english", quick=True, progress=False)
    data = Corpus.load("python", max_bytes=s["corpus_bytes"], val_max_bytes=200_000)
    stop_tok, report_tok = peft_methods.split_validation(data.val)
    assert len(stop_tok) + len(report_tok) == len(data.val) and not np.shares_memory(stop_tok, report_tok)
    train_tok = data.train[:5_000]
    r = peft_methods.early_stopped_run("houlsby", base, train_tok, stop_tok, report_tok, s, 3e-2, every=1)
    assert r["best_step"] >= peft_methods.warmup_steps(40) == 2 and not r["diverged"]
    model = peft_methods.build("houlsby", base, s["seed"])
    train(model, lambda g: lm_batches(train_tok, s["batch"], s["block"], g),
          config=peft_methods.train_config(s, 3e-2, 40, "houlsby", eval_every=1),
          callbacks=[lambda step, info: step == r["best_step"]])
    assert peft_methods.val_loss(model, report_tok, s) == pytest.approx(r["reported"], rel=1e-6)
    assert peft_methods.val_loss(model, stop_tok, s, s["stop_batches"]) == pytest.approx(r["stop_best"], rel=1e-6)


def test_outputs_written(result):
    out = result["_out"]
    assert (out / "r.json").is_file()
    for name in ("peft_methods", "peft_methods_adapters", "peft_methods_scale"):
        assert (out / "figures" / f"{name}.png").is_file()


def test_lr_sensitivity_and_grid():
    s = peft_methods.lr_sensitivity({1e-3: 2.0, 1e-2: 2.03, 1e-1: float("nan")})
    assert s["best"] == 2.0 and s["best_lr"] == 1e-3 and s["near_best"] == 2 and s["diverged"] == 1
    assert s["spread"] == pytest.approx(0.03)
    over = peft_methods.lr_sensitivity_over_seeds({1e-3: [2.0, 2.1], 1e-2: [2.2, 2.1], 1e-1: [2.5, 2.4]}, 1e-2)
    assert over["spread_runs"] == pytest.approx([0.5, 0.3]) and over["spread_mean"] == pytest.approx(0.4)
    assert over["spread_std"] == pytest.approx(np.std([0.5, 0.3], ddof=1)) and over["best_lr"] == 1e-3
    assert peft_methods.lr_grid(3e-3, (-2, -1, 0, 1, 2)) == pytest.approx((3e-4, 1e-3, 3e-3, 1e-2, 3e-2))
    assert peft_methods.lr_grid(3e-2, (-1, 0, 1)) == pytest.approx((1e-2, 3e-2, 1e-1))


def test_adapter_verdicts_follow_the_numbers():
    def row(t, d):
        return {"tokens": t, "houlsby_minus_full_mean": d}

    sens = {"full": {"spread_mean": 0.3, "diverged_mean": 1.0}, "houlsby": {"spread_mean": 0.1, "diverged_mean": 0.0}}
    v = peft_methods.adapter_verdicts([row(1_000, -0.05), row(10_000, -0.01), row(100_000, 0.02)], sens)
    assert v == {"ahead_at": [1_000, 10_000], "gap_shrinks": True, "less_lr_sensitive": True}
    same_lrs = {m: dict(v) for m, v in sens.items()}
    sens["houlsby"]["diverged_mean"] = 2.0  # smaller spread but diverges more often: not less sensitive
    v = peft_methods.adapter_verdicts([row(1_000, 0.03), row(10_000, 0.01)], sens, same_lrs)
    assert v == {"ahead_at": [], "gap_shrinks": False, "less_lr_sensitive": False, "less_lr_sensitive_same_lrs": True}


def test_bad_lr_override():
    with pytest.raises(ValueError, match="METHOD=VALUE"):
        peft_methods._parse_lr(["nonsense=1e-3"])
    assert peft_methods._parse_lr(["lora=1e-2"]) == {"lora": 1e-2}
    assert all(lr > 0 for lr in peft_methods.LR.values()) and set(peft_methods.LR) == set(peft_methods.METHODS)


_TIMING_KEYS = {"seconds", "ms_per_step", "tokens_per_sec", "train_ms_per_step", "step_seconds", "pretrain_seconds"}


def _without_timings(d):
    if isinstance(d, dict):
        return {k: _without_timings(v) for k, v in d.items() if k not in _TIMING_KEYS}
    if isinstance(d, list):
        return [_without_timings(x) for x in d]
    return d


def test_parts_in_two_processes_give_the_same_numbers(result):
    """``--jobs 2`` runs the three parts in spawned processes: every number but the timings is the same."""
    two = peft_methods.main(["--quick", "--jobs", "2"])
    one = {k: v for k, v in result.items() if k != "_out"}
    assert _without_timings(two) == _without_timings(one)
    with pytest.raises(SystemExit, match="--jobs 0: must be at least 1"):
        peft_methods.main(["--quick", "--jobs", "0"])
