"""The QLoRA lesson (the README's main job): a fair learning rate per method, forgetting measured, verdicts by rule.

One run of ``main(["--quick"])`` (seconds) is shared by the checks on its result. It runs
with ``slice_loss`` and ``validation_loss`` wrapped, so the tests see which text each loss
was computed on. ``choose``, ``judge`` and ``sweep`` are also checked on their own, with
inputs whose answer is known.
"""
import contextlib
import io
import json
import math

import numpy as np
import pytest

from minipeft.claims import CLAIMS, lesson_claims
from minipeft.gpt import GPT, GPTConfig
from minipeft.lessons import qlora
from minipeft.lessons.qlora_studies import MERGED_NF4
from minipeft.memory_course import course_figures

from . import recorded

RULES = {c.id: c.rule for c in CLAIMS}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora")
    qlora.pretrained.load("tiny", "english", quick=True)  # pretrained (if not cached) before the spies go in
    calls = {"slice": [], "source": [], "halves": None}
    split, slice_loss, source_loss = qlora.split_validation, qlora.slice_loss, qlora.pretrained.validation_loss

    def split_spy(tokens):
        calls["halves"] = tuple(np.array(h) for h in split(tokens))
        return split(tokens)

    def slice_spy(model, tokens, *a, **k):
        v = slice_loss(model, tokens, *a, **k)
        calls["slice"].append((np.array(tokens), v))
        return v

    def source_spy(model, tokens, *a, **k):
        v = source_loss(model, tokens, *a, **k)
        calls["source"].append((np.array(tokens), v))
        return v

    log = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(log):
        mp.setattr(qlora, "split_validation", split_spy)
        mp.setattr(qlora, "slice_loss", slice_spy)
        mp.setattr(qlora.pretrained, "validation_loss", source_spy)
        res = recorded.run(qlora, ["--quick", "--figures", str(out), "--json", str(out / "r.json")])
    return res | {"_out": out, "_log": log.getvalue(), "_calls": calls}


def _values_on(calls, half):
    return [v for t, v in calls["slice"] if np.array_equal(t, half)]


def test_methods_learn_and_numbers_hold_together(result):
    r, m = result, result["methods"]
    assert set(m) == {"full", "lora", "qlora"}
    for name, row in m.items():
        assert math.isfinite(row["val_loss"]) and row["val_loss"] < r["base_val_loss"], name
    # LoRA and QLoRA train the same adapter; QLoRA stores the frozen base in 4 bits
    assert m["lora"]["trainable"] == m["qlora"]["trainable"] < m["full"]["trainable"]
    assert m["qlora"]["measured"]["weights_frozen"] < m["lora"]["measured"]["weights_frozen"] / 2
    assert m["qlora"]["measured"]["quant_constants"] > 0
    assert r["max_memory_deviation"] < 0.10  # measured within 10% of the calculator
    assert abs(m["qlora"]["val_loss"] - m["lora"]["val_loss"]) < 0.1
    states = {row[0]: row for row in r["optimizers"]}
    assert states["AdamW8bit"][1] < states["AdamW (32-bit)"][1] / 2
    assert states["PagedAdamW"][2] < states["PagedAdamW"][1]  # less state on the device than in all
    merge = r["merge"]
    assert abs(merge["merged into the dequantized NF4 base"] - merge["QLoRA as trained (NF4 base + LoRA)"]) < 1e-3
    assert merge["QLoRA as trained (NF4 base + LoRA)"] == pytest.approx(m["qlora"]["val_loss"], abs=1e-6)
    assert (result["_out"] / "qlora_loss.png").exists() and (result["_out"] / "qlora_memory.png").exists()
    assert (result["_out"] / "r.json").is_file()


def test_checkpointing_and_the_merge_into_nf4_are_reported(result):
    g = result["gradient_checkpointing"]
    assert g["activations"] < g["activations_plain"] and g["lora_parameters"] > 0
    # measured = predicted, but for the 4-byte LoRA scalars the calculator leaves out (4 linears, one block)
    assert 0 <= g["activations"] - g["activations_predicted"] <= 4 * 4
    assert 0 <= g["activations_plain"] - g["activations_plain_predicted"] <= 4 * 4 * 2  # both blocks
    assert "gradient checkpointing" in result["_log"]
    merge, trained = result["merge"], result["merge"]["QLoRA as trained (NF4 base + LoRA)"]
    assert 0 < result["merge_rounding"] < 1
    assert abs(merge[MERGED_NF4] - trained) < abs(merge["original base (no adapter)"] - trained)


def test_each_method_sweeps_its_grid_and_keeps_the_argmin_of_the_stopping_slice(result):
    for name, row in result["methods"].items():
        sweep = row["sweep"]
        assert [s["lr"] for s in sweep] == list(qlora.QUICK_GRIDS[name]) == row["grid"]
        assert len(sweep) >= 2  # a sweep, not one point
        chosen = [s for s in sweep if s["chosen"]]
        assert len(chosen) == 1, name
        best = min(sweep, key=lambda s: s["val_select"])
        assert chosen[0]["lr"] == best["lr"] == row["lr"], name
        assert row["val_select"] == best["val_select"]
        assert row["at_grid_edge"] == (row["lr"] in (min(row["grid"]), max(row["grid"])))
    # the LoRA family's grid sits above full fine-tuning's
    assert max(qlora.GRIDS["lora"]) > max(qlora.GRIDS["full"]) and qlora.GRIDS["lora"] == qlora.GRIDS["qlora"]


def test_stopping_and_reported_losses_come_from_disjoint_halves(result):
    calls = result["_calls"]
    select, report = calls["halves"]
    python_val = np.concatenate([select, report])
    assert len(select) + len(report) == len(python_val) and len(select) > 0 and len(report) > 0
    assert not np.array_equal(select, report)
    on_select, on_report = _values_on(calls, select), _values_on(calls, report)
    assert len(on_select) + len(on_report) == len(calls["slice"])  # every slice loss is on one of the halves
    for name, row in result["methods"].items():
        for s in row["sweep"]:
            assert s["val_select"] in on_select and s["val_select"] not in on_report, (name, s["lr"])
        assert row["val_loss"] in on_report and row["val_loss"] not in on_select, name
    assert result["base_val_loss"] in on_report and result["base_select_loss"] in on_select
    # the reported slice is scored once per method (+ the rank check, base, NF4 base, the merge study's 5 models)
    assert len(on_report) == 3 + 1 + 2 + 5
    rc = result["lora_rank_check"]
    assert rc["val_loss"] in on_report and rc["val_select"] in on_select


def test_source_losses_are_measured_on_english(result):
    r, calls = result, result["_calls"]
    assert isinstance(r["base_source_val_loss"], float) and math.isfinite(r["base_source_val_loss"])
    english = {t.tobytes() for t, _ in calls["source"]}
    assert len(english) == 1  # one English text for every model
    (eng,) = [t for t, _ in calls["source"][:1]]
    assert not any(np.array_equal(eng[:len(h)], h) for h in calls["halves"])  # not the Python text
    values = [v for _, v in calls["source"]]
    for name, row in r["methods"].items():
        assert math.isfinite(row["source_val_loss"]) and row["source_val_loss"] in values, name
    assert r["base_source_val_loss"] in values and r["nf4_source_val_loss"] in values
    # full fine-tuning moves every weight: on this run it forgets English more than LoRA does
    assert r["methods"]["full"]["source_val_loss"] > r["methods"]["lora"]["source_val_loss"]


def test_verdicts_follow_the_claims_tables_rules(result):
    m, base_src = result["methods"], result["base_source_val_loss"]
    claims = {c["label"]: c for c in result["claims"]}
    assert set(claims) == set(qlora.CLAIM_IDS)
    expect = {"QLoRA vs LoRA": m["qlora"]["val_loss"] / m["lora"]["val_loss"],
              "LoRA vs full fine-tuning": m["lora"]["val_loss"] / m["full"]["val_loss"],
              "QLoRA vs full fine-tuning": m["qlora"]["val_loss"] / m["full"]["val_loss"],
              "forgetting": (m["full"]["source_val_loss"] - base_src) / (m["lora"]["source_val_loss"] - base_src)}
    for label, c in claims.items():
        rule = RULES[qlora.CLAIM_IDS[label]]
        assert c["value"] == pytest.approx(expect[label], rel=1e-12), label
        assert c["verdict"] == rule(c["value"]) and c["rule"] == rule.text, label
        assert f"{label}: course" in result["_log"] and f"-> {c['verdict'].upper()}" in result["_log"]
        assert c["note"], label  # every verdict line carries its numbers


def test_the_claims_table_gives_this_run_the_same_verdicts(result):
    run = json.loads((result["_out"] / "r.json").read_text())
    ids = set(qlora.CLAIM_IDS.values())
    table = {e["id"]: e for e in lesson_claims("qlora", run, claims=[c for c in CLAIMS if c.id in ids])}
    assert set(table) == ids
    for c in result["claims"]:
        assert table[c["claim"]]["verdict"] == c["verdict"], c["label"]
        assert table[c["claim"]]["minipeft"]["relation"] == pytest.approx(c["value"], rel=1e-9), c["label"]
    # the report ends with the lesson's other claims (memory), judged by the claims table
    tail = result["_log"].split("judged on this run")[-1]
    assert "24 GB" in tail and "QLoRA/LoRA" not in tail


def test_memory_arithmetic_rows_show_relation_and_verdict(result):
    rows, figs = result["course_figures"], course_figures()
    assert len(rows) == len(figs)
    for row, f in zip(rows, figs):
        assert tuple(row[:4]) == (f.case, f.course, f.minipeft, f.relation)
        assert row[4] == ("reproduced" if f.ok else "contradicted")
    assert "holds if" in result["_log"] and "minipeft/course" in result["_log"]
    assert "minipeft ≤ course" in result["_log"]  # a bound is printed as a bound


def test_training_lines_name_method_and_lr(result):
    for name, row in result["methods"].items():
        for s in row["sweep"]:
            assert f"[{name} lr={s['lr']:g}]" in result["_log"]


# ---- the selection rule and the verdict notes, on inputs whose answer is known ----------
def test_choose_takes_the_lowest_stopping_loss_and_skips_diverged_runs():
    rows = [dict(val_select=2.0), dict(val_select=math.inf), dict(val_select=1.5), dict(val_select=1.7)]
    assert qlora.choose(rows) == 2
    assert qlora.choose([dict(val_select=1.0), dict(val_select=1.0)]) == 0  # ties: the first
    with pytest.raises(ValueError, match="at least one run"):
        qlora.choose([])


def test_sweep_raises_when_every_rate_diverges(monkeypatch):
    base = GPT(GPTConfig.preset("T0"), seed=0)
    tokens = np.random.default_rng(0).integers(0, 256, 4000)

    def boom(*a, **k):
        raise FloatingPointError("training loss became nan")

    monkeypatch.setattr(qlora, "train", boom)
    s = dict(steps=4, batch=2, block=16, compute_dtype="float32")
    with pytest.raises(FloatingPointError, match="every learning rate of lora's grid"):
        qlora.sweep("lora", base, (1.0, 10.0), s, tokens, lambda m: 0.0, log=lambda *_: None)


def _methods(full, lora, qlora_, src_full, src_lora, src_qlora, edge=None):
    out = {}
    for name, py, src in (("full", full, src_full), ("lora", lora, src_lora), ("qlora", qlora_, src_qlora)):
        grid = list(qlora.GRIDS[name])
        lr = grid[-1] if edge == name else grid[1]
        out[name] = dict(val_loss=py, source_val_loss=src, lr=lr, grid=grid, at_grid_edge=edge == name)
    return out


def test_judge_says_how_far_lora_is_behind_with_the_forgetting_beside_it():
    m = _methods(1.089, 1.190, 1.193, src_full=1.60, src_lora=1.35, src_qlora=1.36)
    c = {x["label"]: x for x in qlora.judge(m, base_val=1.60, base_source=1.30, nf4_source=1.31)}
    lf = c["LoRA vs full fine-tuning"]
    assert lf["verdict"] == "contradicted"  # 1.190 / 1.089 = 1.093 > 1.05
    assert "0.101 nats/byte (9.3%) behind" in lf["note"]
    assert "full fine-tuning's loss rose +0.300, LoRA's +0.050" in lf["note"]
    assert c["QLoRA vs LoRA"]["verdict"] == "reproduced" and "+0.003" in c["QLoRA vs LoRA"]["note"]
    f = c["forgetting"]
    assert f["value"] == pytest.approx(0.30 / 0.05) and f["verdict"] == "reproduced"
    assert "of which +0.010 is the NF4 base before training" in f["note"]
    assert "grid" not in lf["note"]  # no chosen rate at an edge: no edge note
    for x in c.values():  # judge asserts no cause, only numbers
        assert "because" not in x["note"]


def test_judge_notes_a_lead_a_grid_edge_and_no_forgetting():
    m = _methods(1.20, 1.18, 1.19, src_full=1.29, src_lora=1.28, src_qlora=1.28, edge="lora")
    c = {x["label"]: x for x in qlora.judge(m, base_val=1.60, base_source=1.30)}
    lf = c["LoRA vs full fine-tuning"]
    assert lf["verdict"] == "reproduced" and "0.020 nats/byte ahead of full" in lf["note"]
    assert f"LoRA's lr {qlora.GRIDS['lora'][-1]:g} is at the top of its grid" in lf["note"]
    f = c["forgetting"]
    assert f["verdict"] == "not-attempted" and "no forgetting to compare" in f["note"]


def test_judge_verdict_boundaries_are_the_rules():
    # LoRA/full = 1.02 exactly is reproduced, 1.05 partly, just above 1.05 contradicted
    for ratio, verdict in ((1.02, "reproduced"), (1.05, "partly"), (1.0501, "contradicted")):
        m = _methods(1.0, ratio, ratio, src_full=1.5, src_lora=1.4, src_qlora=1.4)
        c = {x["label"]: x for x in qlora.judge(m, base_val=2.0, base_source=1.3)}
        assert c["LoRA vs full fine-tuning"]["verdict"] == verdict, ratio
    # forgetting: full rise / LoRA rise 2 -> reproduced, 1.5 -> partly, 0.5 -> contradicted
    for src_full, verdict in ((1.5, "reproduced"), (1.45, "partly"), (1.35, "contradicted")):
        m = _methods(1.0, 1.0, 1.0, src_full=src_full, src_lora=1.4, src_qlora=1.4)
        c = {x["label"]: x for x in qlora.judge(m, base_val=2.0, base_source=1.3)}
        assert c["forgetting"]["verdict"] == verdict, src_full


def test_rank_check_trains_lora_at_a_higher_rank_with_the_same_scale(result):
    from minipeft.lessons.qlora import LORA_ALPHA, LORA_R, RANK_CHECK

    rc = result["lora_rank_check"]
    assert rc["r"] == min(RANK_CHECK * LORA_R, 64)  # the quick base is 64 wide
    assert rc["alpha"] / rc["r"] == LORA_ALPHA / LORA_R and rc["lr"] == result["methods"]["lora"]["lr"]
    assert rc["trainable"] == result["methods"]["lora"]["trainable"] * rc["r"] // LORA_R
    note = next(c["note"] for c in result["claims"] if c["label"] == "LoRA vs full fine-tuning")
    assert f"r={rc['r']}, alpha/r kept, same lr" in note or "ahead of full fine-tuning" in note


def test_judge_names_the_rank_check_and_says_when_more_rank_closes_the_gap():
    from minipeft.lessons.qlora import judge

    m = {k: dict(val_loss=v, source_val_loss=2.0, lr=1e-3, grid=[1e-3], at_grid_edge=False)
         for k, v in (("full", 1.0), ("lora", 1.2), ("qlora", 1.21))}
    note = lambda rc: next(c["note"] for c in judge(m, 1.5, 1.9, None, rc) if c["label"] == "LoRA vs full fine-tuning")  # noqa: E731
    closes = note({"r": 64, "val_loss": 1.1})
    assert "8x the rank (r=64" in closes and "+10.0% from full" in closes and "not of low rank" in closes
    assert "not of low rank" not in note({"r": 64, "val_loss": 1.19})  # closes less than a quarter of the gap
