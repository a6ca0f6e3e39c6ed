"""The claims table: verdict rules at their boundaries, recorded-run discovery, missing results, the written files,
and that every result-driven claim's number comes from the results (perturbing them changes it)."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from minipeft.claims import (CLAIMS, KEYS, SEEDS, VERDICTS, Claim, Measurement, OutOfScale, Results, Rule,
                             at_least, at_most, evaluate, evaluate_all, lesson_claims, load_results, replace_block, summary,
                             to_markdown, update_readme, verdict, write_claims)
from minipeft.claims.core import SEED_FZENG
from minipeft.lessons._common import Report

REPO = Path(__file__).resolve().parents[1]
SEEDS_DIR = REPO.parent / "shared" / "seeds"


# ---- the rule ------------------------------------------------------------------------------------
def test_verdict_boundaries_one_sided():
    rep, part = at_least(0.95), at_least(0.85)
    assert verdict(0.95, rep, part) == "reproduced"
    assert verdict(0.9499999, rep, part) == "partly"
    assert verdict(0.85, rep, part) == "partly"
    assert verdict(0.8499999, rep, part) == "contradicted"
    assert verdict(1e9, rep, part) == "reproduced"
    assert verdict(1.02, at_most(1.02), at_most(1.05)) == "reproduced"
    assert verdict(1.0200001, at_most(1.02), at_most(1.05)) == "partly"
    assert verdict(1.0500001, at_most(1.02), at_most(1.05)) == "contradicted"
    assert verdict(0.5, at_least(1.0)) == "contradicted"  # no partly band


def test_verdict_two_sided_and_missing():
    assert verdict(1.5, (1.5, 3.0), (1.0, 6.0)) == "reproduced"
    assert verdict(3.0, (1.5, 3.0), (1.0, 6.0)) == "reproduced"
    assert verdict(3.01, (1.5, 3.0), (1.0, 6.0)) == "partly"
    assert verdict(0.99, (1.5, 3.0), (1.0, 6.0)) == "contradicted"
    assert verdict(6.5, (1.5, 3.0), (1.0, 6.0)) == "contradicted"
    assert verdict(None, at_least(1)) == "not-attempted"
    assert verdict(float("nan"), at_least(1)) == "not-attempted"
    assert verdict(math.inf, at_least(1)) == "reproduced"


def test_verdict_bad_input():
    with pytest.raises(ValueError, match="empty"):
        verdict(1.0, (2.0, 1.0))
    with pytest.raises(TypeError, match="low, high"):
        verdict(1.0, 0.95)
    with pytest.raises(TypeError, match="number"):
        verdict("high", at_least(1))
    with pytest.raises(ValueError, match="quantity"):
        Rule("", at_least(1))


def test_rule_text_states_the_bands():
    r = Rule("LoRA BLEU / full FT BLEU", at_least(0.95), at_least(0.85))
    assert r.text == ("reproduced if LoRA BLEU / full FT BLEU >= 0.95; partly if LoRA BLEU / full FT BLEU >= 0.85; "
                      "else contradicted")
    assert Rule("x", (1.5, 3), None).text == "reproduced if 1.5 <= x <= 3; else contradicted"
    assert r(0.96) == "reproduced" and r(0.9) == "partly" and r(0.5) == "contradicted"


@pytest.mark.parametrize("claim", CLAIMS, ids=lambda c: c.id)
def test_each_claim_rule_at_its_boundaries(claim):
    lo, hi = claim.rule.reproduced
    for edge in (lo, hi):
        if math.isfinite(edge):
            assert claim.rule(edge) == "reproduced"
            outside = edge - 1e-9 * max(1, abs(edge)) if edge == lo else edge + 1e-9 * max(1, abs(edge))
            assert claim.rule(outside) in ("partly", "contradicted")
    assert claim.rule(None) == "not-attempted"
    assert claim.rule.text.startswith("reproduced if ")


# ---- the catalog -----------------------------------------------------------------------------------
def test_catalog_is_well_formed():
    ids = [c.id for c in CLAIMS]
    assert len(ids) == len(set(ids)) and len(CLAIMS) >= 40
    for c in CLAIMS:
        assert c.seed in SEEDS and c.claim and c.course and c.lesson
    assert {c.seed for c in CLAIMS} == set(SEEDS), "every notes file contributes claims"


@pytest.mark.skipif(not SEEDS_DIR.is_dir(), reason="../shared/seeds is not beside this checkout")
def test_every_seed_names_an_existing_notes_file():
    for c in CLAIMS:
        assert (SEEDS_DIR / c.seed).is_file(), f"{c.id}: {c.seed} not in {SEEDS_DIR}"


def test_bad_seed_is_refused():
    with pytest.raises(ValueError, match="notes files"):
        Claim("x", "x", "nope.txt", "c", None, "qlora", lambda r: None, Rule("q", at_least(1)))


# ---- missing results -------------------------------------------------------------------------------
def test_no_results_gives_not_attempted_with_a_reason():
    entries = evaluate_all(CLAIMS, Results({}, "nowhere"))
    attempted = 0
    for c, e in zip(CLAIMS, entries):
        if e["verdict"] == "not-attempted":
            assert c.from_results, c.id
            assert "no recorded" in e["note"] and "python -m minipeft.lessons." in e["note"], c.id
            assert e["minipeft"]["value"] is None and e["source"] == "-"
        else:  # computed from minipeft's own functions (always, or as the fallback of a lesson's measurement)
            attempted += c.from_results
            assert e["source"].startswith("minipeft.") and "benchmarks" not in e["source"], c.id
    assert attempted <= 3, "only a few result-driven claims may fall back to a computation"


def test_missing_key_and_out_of_scale_are_explained():
    def needs_key(r):
        return Measurement(r.get("qlora", "methods", "nowhere", "val_loss"), "x")

    def too_small(r):
        raise OutOfScale("no outliers at this size")

    res = Results.from_dicts({"qlora": {"methods": {}}})
    e = evaluate(Claim("k", "k", SEED_FZENG, "c", None, "qlora", needs_key, Rule("q", at_least(1))), res)
    assert e["verdict"] == "not-attempted" and "methods.nowhere" in e["note"] and "does not record" in e["note"]
    e = evaluate(Claim("s", "s", SEED_FZENG, "c", None, "qlora", too_small, Rule("q", at_least(1))), res)
    assert e["verdict"] == "not-attempted" and e["note"] == "out of scale: no outliers at this size"


def test_nan_in_a_recorded_run_is_not_judged():
    res = Results.from_dicts({"qlora": {"methods": {m: {"val_loss": float("nan")} for m in ("full", "lora", "qlora")}}})
    e = next(x for x in evaluate_all(CLAIMS, res) if x["id"] == "qlora-matches-lora")
    assert e["verdict"] == "not-attempted" and "not finite" in e["note"]


# ---- fake results for every lesson (structure as the lessons record it) ----------------------------
def fake_results(seed: int) -> dict:
    g = np.random.default_rng(seed)
    u = lambda lo, hi: float(g.uniform(lo, hi))  # noqa: E731
    loss = lambda: u(1.0, 2.0)  # noqa: E731
    a32 = u(5e5, 2e6)
    return {
        "quantization": {
            "absmax_codes_used": int(g.integers(90, 140)), "zeropoint_codes_used": int(g.integers(180, 256)),
            "absmax_error": u(4e-3, 6e-3), "zeropoint_error": u(2e-3, 3e-3),
            "outlier": {"int8 absmax, one scale per tensor": {"error_with_outlier": u(0.05, 0.1)},
                        "int8 absmax, blocks of 64": {"error_with_outlier": u(0.005, 0.01)}},
            "codes_4bit": {k: {"abs": u(lo, lo + 0.01)} for k, lo in (("nf4", 0.07), ("fp4", 0.09), ("int4", 0.09))},
            "overhead": {"measured_plain": u(0.5, 0.51), "measured_double_quant": u(0.127, 0.13)},
            "floats": {"N(0,1) float16": {"rel_error": u(1e-4, 2e-4), "overflow": 0.0},
                       "N(0,1) bfloat16": {"rel_error": u(1e-3, 2e-3), "overflow": 0.0},
                       "N(0,1) x 1e5 float16": {"rel_error": u(1e-4, 2e-4), "overflow": u(0.3, 0.6)},
                       "N(0,1) x 1e5 bfloat16": {"rel_error": u(1e-3, 2e-3), "overflow": 0.0}},
            "llm_int8": {"errors": {"int8": u(0.02, 0.03), "llm_int8": u(0.005, 0.01)}},
            "tiny_outliers": {"loss": 3.0, "zero_top_loss": 3.0 + u(0.5, 1.0), "zero_random_loss": 3.0 + u(1e-4, 1e-3),
                              "outlier_dims": int(g.integers(1, 8))},
            "model": {"NF4 + double quant": {"bits_per_weight": u(4.1, 4.4)}},
        },
        "lora": {
            "latency_min_ms": {"8x64": {"base": u(20, 30), "LoRA r=8 unmerged": u(30, 40), "LoRA r=8 merged": u(20, 30),
                                        "adapter": u(25, 35)}},
            "rank_for_90pct_energy": {f"h.{i}.attn.c_attn": int(g.integers(1, 20)) for i in range(2)},
            "parameters": {"table": [{"module": "attn.c_attn", "shape": [192, 64]}]},
            "course_example": {"lora": int(g.integers(4000, 5000)), "full": 32768},
            "rank_sweep": {str(r): {"val_loss": loss()} for r in (1, 8, 16)},
        },
        "serving": {
            "memory": {"adapter_bytes": u(3e4, 6e4), "base_fp32": u(4e5, 6e5),
                       "rows": {"1": {"fp32 base + N adapters": u(5e5, 6e5), "N merged fp32 copies": u(4e5, 6e5)},
                                "100": {"fp32 base + N adapters": u(4e6, 6e6), "N merged fp32 copies": u(4e7, 6e7)}}},
            "sweep": {"mixed": [{"decode_tps": u(1e3, 4e3)} for _ in range(3)],
                      "(b) merged, one at a time": [{"decode_tps": u(1e2, 3e3)} for _ in range(3)]},
            "ns": [1, 4, 16],
        },
        "qlora": {
            "base_source_val_loss": u(1.2, 1.3),
            "methods": {m: {"val_loss": loss(), "trainable": n, "sec_per_step": u(0.01, 0.2),
                            "source_val_loss": u(1.3, 2.0),
                            "measured": {"weights_trainable": 4 * n * u(0.9, 1.1), "gradients": 4 * n,
                                         "optimizer_state": 8 * n, "activations": u(1e6, 1e8)}}
                        for m, n in (("full", 859264), ("lora", 65536), ("qlora", 65536))},
            "optimizers": [["AdamW (32-bit)", a32, a32, ""], ["AdamW8bit", a32 * u(0.25, 0.3), a32 * 0.26, ""],
                           ["PagedAdamW", a32, a32 * u(0.2, 0.3), "pages"]],
        },
        "peft_methods": {
            "base_val_loss": 2.5, "base_source_val_loss": u(1.2, 1.3),
            "methods": {m: {"val_loss": loss(), "trainable_pct": u(0.1, 10), "ms_per_step": u(10, 50),
                            "source_val_loss": u(1.3, 2.0)} for m in ("full", "lora", "houlsby", "ia3")},
            "adapters_vs_full": {
                "by_size": [{"tokens": t, "houlsby_minus_full_mean": u(-0.1, 0.1), "houlsby_minus_full_std": u(0, 0.05),
                             "houlsby_minus_full": [0.0, 0.0, 0.0]} for t in (1000, 10000)],
                "sensitivity": {m: {"spread_mean": u(0.05, 1.0), "grid": [1e-3, 3e-3, 1e-2]} for m in ("full", "houlsby")}},
            "scale": [{"size": s, "params": p, "gap": u(0.01, 0.5)} for s, p in (("tiny", 1e5), ("small", 1e6), ("mid", 1e7))],
        },
        "side_tuning": {
            "batch_sweep": {"batch_sizes": [1, 4, 16],
                            "total": {m: sorted(u(1e5, 1e7) for _ in range(3)) for m in ("qst", "qlora")},
                            "activations": {m: sorted(u(1e5, 1e7) for _ in range(3)) for m in ("qst", "lora")}},
            "qst": {"best": {"val_report": loss(), "reduction_factor": 16}}, "qlora": {"val_report": loss()},
        },
        "e2e": {
            "methods": {m: {"BLEU": u(0.3, 0.8), "val_loss": loss()}
                        for m in ("full", "top2", "adapter_small", "adapter_large", "prefix", "lora_qv", "lora_all")},
            "ranks": {str(r): {"val_loss": loss()} for r in (1, 2, 4, 8, 16, 32, 64)},
        },
        "transfer": {
            "fits": {s: {"k": u(1e3, 1e4), "alpha": u(0.02, 0.3), "beta": u(0.1, 0.5), "alpha_err": u(0.01, 0.05),
                         "beta_err": u(0.01, 0.05)} for s in ("english", "english+c")},
            "points": [{"D_F": d, "multiplier": u(1, 300), "flag": "ok", "source": s, "size": z, "N": n}
                       for s in ("english", "english+c") for z, n in (("T0", 1e5), ("T1", 8e5)) for d in (1e3, 1e4, 1e5)],
            "ossification": [{"size": z, "N": n, "D_F": 1e6, "ossified": {"english": bool(g.integers(2)),
                                                                        "english+c": bool(g.integers(2))}}
                             for z, n in (("T0", 1e5), ("T1", 8e5))],
        },
    }


def test_fake_results_attempt_every_result_driven_claim():
    entries = evaluate_all(CLAIMS, Results.from_dicts(fake_results(0), "fake"))
    for c, e in zip(CLAIMS, entries):
        assert e["verdict"] in VERDICTS
        if c.from_results:
            assert e["verdict"] != "not-attempted", f"{c.id}: {e['note']}"
            assert e["source"].startswith("fake/"), c.id


def test_result_driven_values_come_from_the_results():
    runs = [evaluate_all(CLAIMS, Results.from_dicts(fake_results(seed), "fake")) for seed in (1, 2, 3, 4)]
    for i, c in enumerate(CLAIMS):
        entries = [r[i] for r in runs]
        if not c.from_results:  # computed by minipeft's functions: no recorded input
            assert all(e["minipeft"] == entries[0]["minipeft"] for e in entries), c.id
            continue
        # a number read from the results changes when they do (a count may coincide for two draws, not four)
        assert len({e["minipeft"]["text"] for e in entries}) > 1, c.id


# ---- discovery and the written files ---------------------------------------------------------------
def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_load_results_picks_newest_of_preferred_kind(tmp_path):
    root = tmp_path / "benchmarks" / "results"
    q = lambda v: {"methods": {m: {"val_loss": v} for m in ("full", "lora", "qlora")}}  # noqa: E731
    _write(root / "h100-2026-11-22" / "qlora_cuda.json", q(1.0))
    _write(root / "h200-2026-12-02" / "qlora.json", q(2.0))
    _write(root / "cpu-2026-12-05" / "qlora.json", q(3.0))
    _write(root / "cpu-2026-12-05" / "generate.json", [1, 2])  # a benchmark output, not a lesson's result
    _write(root / "not-a-run" / "qlora.json", q(9.0))
    _write(tmp_path / "figures" / "transfer_data.json",
           {"device": "cuda", "date": "2026-11-22T15:00:00+00:00", "analysis": {"fits": {"english": {"alpha": 0.1}}}})
    gpu = load_results(root)
    assert gpu["qlora"].label == "benchmarks/results/h200-2026-12-02/qlora.json"
    assert gpu["transfer"].data["fits"]["english"]["alpha"] == 0.1 and gpu["transfer"].kind == "gpu"
    assert gpu["transfer"].label == "figures/transfer_data.json"
    assert load_results(root, prefer="cpu")["qlora"].label == "benchmarks/results/cpu-2026-12-05/qlora.json"
    assert load_results(root, prefer="newest")["qlora"].data["methods"]["full"]["val_loss"] == 3.0
    assert set(gpu.lessons()) == {"qlora", "transfer"}
    with pytest.raises(ValueError, match="prefer"):
        load_results(root, prefer="fastest")
    e = next(x for x in evaluate_all(CLAIMS, gpu) if x["id"] == "qlora-matches-lora")
    assert e["source"] == "benchmarks/results/h200-2026-12-02/qlora.json: methods.qlora.val_loss, methods.lora.val_loss"


def test_load_results_names_a_broken_file(tmp_path):
    root = tmp_path / "benchmarks" / "results"
    (root / "cpu-2026-12-01").mkdir(parents=True)
    (root / "cpu-2026-12-01" / "lora.json").write_text("{not json")
    with pytest.raises(ValueError, match="lora.json"):
        load_results(root)


def test_write_claims_files(tmp_path):
    out_json, out_md = tmp_path / "figs" / "claims.json", tmp_path / "figs" / "claims.md"
    entries = write_claims(tmp_path / "none", out_json, out_md, results=Results.from_dicts(fake_results(3), "fake"))
    data = json.loads(out_json.read_text())
    assert isinstance(data, list) and len(data) == len(CLAIMS) and data == entries
    for e in data:
        assert tuple(e) == KEYS
        assert e["verdict"] in VERDICTS and e["seed"] in SEEDS
        assert set(e["course"]) == {"text", "value"} and set(e["minipeft"]) == {"text", "value", "relation"}
        assert e["rule"].startswith("reproduced if ") and isinstance(e["note"], str)
    md = out_md.read_text()
    assert md.startswith("| claim | course | minipeft | verdict | source |")
    assert md.count("\n| ") == len(CLAIMS)  # one row per claim under the header and its rule line
    assert summary(data) in md and " reproduced or partly (" in md


def test_summary_counts():
    es = [{"verdict": v} for v in ("reproduced", "partly", "contradicted", "not-attempted")]
    assert summary(es).startswith("2 of 4 reproduced or partly (50%); of the 3 attempted, 67%")


def test_readme_block(tmp_path):
    text = "# x\n<!-- claims:begin -->\nold\n<!-- claims:end -->\nafter\n"
    assert replace_block(text, "| new |\n") == "# x\n<!-- claims:begin -->\n| new |\n<!-- claims:end -->\nafter\n"
    assert replace_block("no markers", "t") is None
    with pytest.raises(ValueError, match="before"):
        replace_block("<!-- claims:end --> <!-- claims:begin -->", "t")
    readme = tmp_path / "README.md"
    readme.write_text(text)
    assert update_readme(readme, to_markdown([])) and "0 of 0" in readme.read_text()
    readme.write_text("no markers\n")
    assert not update_readme(readme, "t") and readme.read_text() == "no markers\n"


def test_report_claim_line():
    s = io.StringIO()
    rep = Report("t", stream=s)
    line = rep.claim("LoRA vs FT (BLEU)", "70.4 vs 68.2", "63.9 vs 76.8", "LoRA/FT = 0.83",
                     verdict(0.83, at_least(0.95), at_least(0.8)), note="small base")
    assert line == "  LoRA vs FT (BLEU): course 70.4 vs 68.2 | minipeft 63.9 vs 76.8 | LoRA/FT = 0.83 -> PARTLY (small base)"
    assert line in s.getvalue()
    with pytest.raises(ValueError, match="unknown verdict"):
        rep.claim("x", 1, 2, "r", "maybe")


def test_figures_claims_only(tmp_path, monkeypatch):
    from minipeft import figures

    root = tmp_path / "benchmarks" / "results"
    _write(root / "cpu-2026-12-01" / "qlora.json", fake_results(4)["qlora"])
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- claims:begin -->\n<!-- claims:end -->\n")
    called = []
    monkeypatch.setattr(figures, "available_lessons", lambda: called.append(1) or [])
    figures.main(["--claims-only", "--out", str(tmp_path / "figs"), "--results", str(root), "--readme", str(readme)])
    assert not called, "--claims-only reruns no lesson"
    data = json.loads((tmp_path / "figs" / "claims.json").read_text())
    e = next(x for x in data if x["id"] == "qlora-matches-lora")
    assert e["verdict"] != "not-attempted" and "cpu-2026-12-01/qlora.json" in e["source"]
    assert "| claim | course |" in readme.read_text()


def test_lesson_claims_prints_the_tables_verdicts():
    result = fake_results(5)["qlora"]
    s = io.StringIO()
    entries = lesson_claims("qlora", result, Report("t", stream=s))
    mine = [c for c in CLAIMS if c.lesson == "qlora"]
    assert [e["id"] for e in entries] == [c.id for c in mine] and len(mine) >= 5
    lines = [ln for ln in s.getvalue().splitlines() if ": course " in ln]
    assert len(lines) == len(mine)
    table = {e["id"]: e for e in evaluate_all(CLAIMS, Results.from_dicts({"qlora": result}, "x"))}
    for e, ln in zip(entries, lines):
        assert e["verdict"] == table[e["id"]]["verdict"] and f"-> {e['verdict'].upper()}" in ln


def test_a_claim_falls_back_to_the_next_recorded_run_that_has_its_numbers(tmp_path):
    """The preferred (GPU) run predates a key; the CPU run has it: the claim is judged on the CPU run."""
    import json

    from minipeft.claims import CLAIMS
    from minipeft.claims.core import evaluate
    from minipeft.claims.results import load_results

    root = tmp_path / "benchmarks" / "results"
    old = {"methods": {"full": {"val_loss": 1.0}, "lora": {"val_loss": 1.1}}}
    new = {"base_source_val_loss": 2.0, "methods": {"full": {"val_loss": 1.0, "source_val_loss": 2.5},
                                                     "lora": {"val_loss": 1.1, "source_val_loss": 2.1}}}
    for d, data in (("h200-2026-12-02", old), ("cpu-2026-12-01", new)):
        (root / d).mkdir(parents=True)
        (root / d / "qlora.json").write_text(json.dumps(data))
    results = load_results(root, repo=tmp_path, extra={})
    assert results["qlora"].kind == "gpu"  # the GPU run is preferred ...
    claim = next(c for c in CLAIMS if c.id == "peft-less-forgetting")
    entry = evaluate(claim, results)
    assert "cpu-2026-12-01/qlora.json" in entry["source"]  # ... but only the CPU run measured forgetting
    assert entry["minipeft"]["relation"] == pytest.approx((2.5 - 2.0) / (2.1 - 2.0))
    assert entry["verdict"] == "reproduced"
    # with no run holding the keys, the claim is not attempted and says why
    (root / "cpu-2026-12-01" / "qlora.json").write_text(json.dumps(old))
    entry = evaluate(claim, load_results(root, repo=tmp_path, extra={}))
    assert entry["verdict"] == "not-attempted" and "base_source_val_loss" in entry["note"]


def test_a_lesson_run_in_parts_is_read_part_by_part(tmp_path):
    """``--parts 1`` and ``--parts 3`` in two processes: ``<lesson>_part<N>.json`` files, each a run of the
    lesson; a claim reads the part that holds its numbers."""
    import json

    from minipeft.claims.results import _lesson_of, load_results

    assert _lesson_of("peft_methods_part3") == "peft_methods"
    assert _lesson_of("qlora_cuda_part1") == "qlora"
    assert _lesson_of("pretrain_small") is None and _lesson_of("generate_part2") is None
    root = tmp_path / "benchmarks" / "results"
    _write(root / "h200-2026-12-03" / "qlora_part1.json", {"methods": {"full": {"val_loss": 1.0}}})
    _write(root / "h200-2026-12-03" / "qlora_part2.json", {"base_source_val_loss": 2.0})
    results = load_results(root, repo=tmp_path, extra={})
    labels = {results["qlora"].label} | {r.label for r in results.others["qlora"]}
    assert labels == {"benchmarks/results/h200-2026-12-03/qlora_part1.json",
                      "benchmarks/results/h200-2026-12-03/qlora_part2.json"}


def test_lora_all_linear_claim_reads_the_rank_chosen_on_validation():
    from minipeft.claims import CLAIMS
    from minipeft.claims.core import evaluate
    from minipeft.claims.results import Results

    methods = {"full": {"BLEU": 0.76}, "lora_all": {"BLEU": 0.70}}
    claim = next(c for c in CLAIMS if c.id == "lora-all-linear-vs-ft-e2e")
    old = evaluate(claim, Results.from_dicts({"e2e": {"methods": methods}}))
    assert old["minipeft"]["relation"] == pytest.approx(0.70 / 0.76) and old["verdict"] == "partly"
    new = evaluate(claim, Results.from_dicts({"e2e": {"methods": methods, "lora_all_tuned": {
        "BLEU": 0.75, "r": 64, "ranks_considered": [8, 16, 32, 64]}}}))
    assert new["minipeft"]["relation"] == pytest.approx(0.75 / 0.76) and new["verdict"] == "reproduced"
    assert "r=64" in new["minipeft"]["text"]


def test_timings_of_a_run_on_a_shared_machine_are_not_judged(tmp_path):
    """A run listed in its folder's SHARED_MACHINE keeps its other numbers; a speed claim reads the next run."""
    from minipeft.claims import CLAIMS
    from minipeft.claims.core import evaluate
    from minipeft.claims.results import load_results

    root = tmp_path / "benchmarks" / "results"
    pm = lambda f, l: {"methods": {"full": {"ms_per_step": f, "val_loss": 1.0},  # noqa: E731
                                   "lora": {"ms_per_step": l, "val_loss": 1.0}}}
    _write(root / "h200-2026-12-03" / "peft_methods.json", pm(10.0, 20.0))
    (root / "h200-2026-12-03" / "SHARED_MACHINE").write_text("# shared\npeft_methods.json  # with e2e\n")
    _write(root / "cpu-2026-12-01" / "peft_methods.json", pm(12.5, 10.0))
    results = load_results(root, repo=tmp_path, extra={})
    assert results["peft_methods"].shared and results["peft_methods"].kind == "gpu"
    speed = next(c for c in CLAIMS if c.id == "lora-speedup")
    e = evaluate(speed, results)
    assert "cpu-2026-12-01" in e["source"] and e["minipeft"]["relation"] == pytest.approx(1.25)
    (root / "cpu-2026-12-01" / "peft_methods.json").unlink()
    e = evaluate(speed, load_results(root, repo=tmp_path, extra={}))
    assert e["verdict"] == "not-attempted" and "shared the machine" in e["note"]


def test_peft_trailing_full_ft_is_explained_by_the_recorded_rank_sweeps():
    from minipeft.claims import CLAIMS
    from minipeft.claims.core import evaluate
    from minipeft.claims.results import Results

    claim = next(c for c in CLAIMS if c.id == "peft-comparable-to-ft")
    qlora = {"methods": {"full": {"val_loss": 1.0}, "lora": {"val_loss": 1.1}}}
    lora = {"rank_sweep": {"1": {"val_loss": 2.2}, "16": {"val_loss": 2.0}, "32": {"val_loss": 1.95}},
            "full_ft": {"val_loss": 1.9}}
    e = evaluate(claim, Results.from_dicts({"qlora": qlora, "lora": lora}))
    assert e["verdict"] == "contradicted"
    assert "r=1 2.200 -> r=16 2.000 -> r=32 1.950, full fine-tuning 1.900" in e["note"]
    assert "memory/lora.json: rank_sweep, full_ft.val_loss" in e["source"]
    # LoRA within 2% of full: nothing to explain
    close = {"methods": {"full": {"val_loss": 1.0}, "lora": {"val_loss": 1.01}}}
    e = evaluate(claim, Results.from_dicts({"qlora": close, "lora": lora}))
    assert e["verdict"] == "reproduced" and "largest rank swept" not in e["note"]
    # no sweep recorded: the claim is judged all the same, with its scale note only
    e = evaluate(claim, Results.from_dicts({"qlora": qlora}))
    assert e["verdict"] == "contradicted" and "largest rank swept" not in e["note"] and "Scale" in e["note"]
