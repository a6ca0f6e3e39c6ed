"""The side-tuning lesson: a fair QST-vs-QLoRA sweep, compared at matched accuracy, with memory.

One run of ``main(["--quick"])`` (seconds) is shared by the checks on its result; the
selection protocol and the verdict rule are also checked on their own, with inputs whose
answer is known.
"""
import contextlib
import io
import math

import numpy as np
import pytest

from minipeft.gpt import GPT, GPTConfig
from minipeft.lessons import side_tuning
from minipeft.lessons import side_tuning_sweep as sweep
from . import recorded


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("side_tuning")
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        res = recorded.run(side_tuning, ["--quick", "--figures", str(out / "figures"), "--json", str(out / "side.json")])
    return res | {"_out": out, "_log": log.getvalue()}


def _groups(rows):
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["r"]), []).append(r)
    return groups


def test_returns_finite_key_numbers_and_files(result):
    assert (result["_out"] / "side.json").is_file()
    assert (result["_out"] / "figures" / "side_tuning_memory.png").is_file()
    assert math.isfinite(result["base_val_loss"]) and result["all_finite"]
    q = result["qlora"]
    assert q["target_modules"] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]  # QLoRA: every linear
    assert q["r"] == sweep.QLORA_R and q["lora_alpha"] == sweep.QLORA_ALPHA
    assert math.isfinite(q["val_report"]) and q["memory"]["total"] > 0
    for entry in result["qst"]["by_reduction_factor"].values():
        assert math.isfinite(entry["val_report"]) and entry["trainable"] > 0
        assert all(math.isfinite(v) and v >= 0 for v in entry["memory"].values())
    assert set(result["qst"]["by_reduction_factor"]) == {str(r) for r in result["sweep"]["qst_reduction_factors"]}


def test_sweep_covers_the_stated_grids(result):
    s, groups = result["sweep"], _groups(result["sweep"]["rows"])
    assert sorted(r["lr"] for r in groups[("qlora", None)]) == sorted(s["qlora_lrs"])
    assert len(s["qst_reduction_factors"]) >= 2 and len(s["qlora_lrs"]) >= 2  # a sweep, not one point
    for r in s["qst_reduction_factors"]:
        assert sorted(row["lr"] for row in groups[("qst", r)]) == sorted(s["qst_lrs"])


def test_chosen_lr_is_the_argmin_on_the_stopping_slice(result):
    for key, rows in _groups(result["sweep"]["rows"]).items():
        chosen = [r for r in rows if r["chosen"]]
        assert len(chosen) == 1, key
        assert chosen[0]["val_select"] == min(r["val_select"] for r in rows)
        assert math.isfinite(chosen[0]["val_report"])
        assert all(r["val_report"] is None for r in rows if not r["chosen"])  # only the chosen run is reported
    assert result["qlora"]["lr"] == next(r["lr"] for r in result["sweep"]["rows"]
                                         if r["method"] == "qlora" and r["chosen"])


def test_stopping_and_reported_slices_are_disjoint_halves(result):
    v = result["validation"]
    assert v["select_tokens"][0] == 0 and v["select_tokens"][1] == v["report_tokens"][0] < v["report_tokens"][1]
    select, report = sweep.split_validation(np.arange(11))
    assert not set(select) & set(report) and len(select) + len(report) == 11


def test_training_lines_name_their_method_and_setting(result):
    for r in result["sweep"]["rows"]:
        assert f"[{r['setting']} lr={r['lr']:g}]" in result["_log"]


def test_qst_needs_less_memory_than_qlora_at_the_training_batch(result):
    q = result["qlora"]["memory"]
    for entry in result["qst"]["by_reduction_factor"].values():
        assert entry["memory"]["total"] < q["total"]  # measured bytes: deterministic, not timed
        assert entry["memory"]["activations"] < q["activations"]
        assert entry["memory"]["backbone_grads"] == 0


def test_qlora_memory_matches_the_calculator(result):
    q = result["qlora"]
    assert abs(q["memory"]["total"] / q["predicted"]["total"] - 1) < 0.02


def test_verdict_follows_the_stated_rule(result):
    m, tol = result["matched_accuracy"], result["matched_accuracy"]["tolerance"]
    assert m["qlora_loss"] == result["qlora"]["val_report"] and m["qlora_memory"] == result["qlora"]["memory"]["total"]
    by_r = result["qst"]["by_reduction_factor"]
    assert m["best_loss"] == min(e["val_report"] for e in by_r.values())
    assert result["qst"]["best"]["val_report"] == m["best_loss"]
    if m["matched_r"] is None:
        assert all(e["val_report"] - m["qlora_loss"] > tol for e in by_r.values()) and result["qst"]["matched"] is None
        assert m["verdict"] == ("partly" if m["best_memory"] < m["qlora_memory"] else "contradicted")
    else:
        assert m["matched_gap"] <= tol and result["qst"]["matched"]["val_report"] == m["matched_loss"]
        assert m["verdict"] == ("reproduced" if m["matched_memory"] < m["qlora_memory"] else "contradicted")
    assert f"within {tol} nats/token" in m["sentence"] and m["rule"] in result["_log"]


def _chosen(qlora, qst):
    out = {("qlora", None): dict(val_report=qlora[0], memory={"total": qlora[1]}, lr=1e-3, side_width=None)}
    for r, (loss, mem) in qst.items():
        out[("qst", r)] = dict(val_report=loss, memory={"total": mem}, lr=1e-2, side_width=64 // r)
    return out


def test_matched_accuracy_picks_the_least_memory_within_tolerance():
    m = sweep.matched_accuracy(_chosen((2.00, 100), {16: (2.10, 20), 4: (2.015, 40), 2: (1.99, 60)}), tol=0.02)
    assert m["matched_r"] == 4 and m["best_r"] == 2 and m["verdict"] == "reproduced"
    assert m["memory_ratio"] == pytest.approx(100 / 40) and "less memory than QLoRA" in m["sentence"]


def test_matched_accuracy_without_a_match_reports_the_best_and_its_gap():
    m = sweep.matched_accuracy(_chosen((2.00, 100), {16: (2.10, 20), 4: (2.05, 40)}), tol=0.02)
    assert m["matched_r"] is None and m["best_r"] == 4 and m["best_gap"] == pytest.approx(0.05)
    assert m["verdict"] == "partly"
    m = sweep.matched_accuracy(_chosen((2.00, 100), {2: (2.01, 120)}), tol=0.02)
    assert m["matched_r"] == 2 and m["verdict"] == "contradicted"


def test_run_sweep_reports_only_through_the_report_slice():
    base = GPT(GPTConfig.preset("T0"), seed=0)
    tokens = np.random.default_rng(0).integers(0, 256, 4000)
    calls = {"select": 0, "report": 0}

    def select(m):
        calls["select"] += 1
        return sweep.slice_loss(m, tokens[:2000], 16, 4)

    def report(m):
        calls["report"] += 1
        return 100.0 + calls["report"]  # a value only the report slice can give

    s = dict(steps=2, batch=2, compute_dtype="float32", qlora_lrs=(1e-3, 1e-2), qst_rs=(16, 8), qst_lrs=(1e-2,))
    out = sweep.run_sweep(base, s, 16, tokens, select, report, log=lambda line: None)
    assert calls["report"] == 3 == len(out["chosen"])  # once per (method, r), for the chosen run only
    assert sorted(c["val_report"] for c in out["chosen"].values()) == [101.0, 102.0, 103.0]
    assert all(r["val_select"] < 100 for r in out["rows"])


def test_slice_loss_spreads_windows_and_rejects_short_slices():
    base = GPT(GPTConfig.preset("T0"), seed=0)
    tokens = np.random.default_rng(1).integers(0, 256, 1000)
    a = sweep.slice_loss(base, tokens, 16, 8)
    assert math.isfinite(a) and a == sweep.slice_loss(base, tokens, 16, 8)
    with pytest.raises(ValueError, match="cannot hold"):
        sweep.slice_loss(base, tokens[:10], 16, 8)


def test_activations_grow_with_batch_and_sequence(result):
    for sw in (result["batch_sweep"], result["seq_sweep"]):
        for ys in sw["activations"].values():
            assert all(a < b for a, b in zip(ys, ys[1:]))
    assert result["batch_sweep"]["activations"]["qst"][-1] < result["batch_sweep"]["activations"]["qlora"][-1]
    assert result["qst_vs_qlora"]["activation_ratio"] > 1 and result["qst_vs_qlora"]["qst_backbone_grads"] == 0


def test_lst_matches_the_memory_calculator(result):
    c = result["lst_calculator"]
    assert c["measured_held"] == c["predicted_held"]
    assert 0 <= c["measured_saved"] - c["predicted_saved"] <= 64  # the gates' scalars


def test_course_table_average_ratio():
    qa, qm, sa, sm = side_tuning.COURSE_TABLE["Avg."]
    assert round(qm / sm, 2) == 1.81 and round(sa - qa, 1) == 0.1
