"""The E2E lesson in quick mode: it runs in seconds and returns finite metrics for every method and rank.

One run of ``main(["--quick", ...])`` is shared by the checks below.
"""
import json
import math

import pytest

from minipeft.lessons import e2e
from . import recorded


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    res = recorded.run(e2e, ["--quick", "--figures", str(out / "figures"), "--json", str(out / "e2e.json"),
                    "--save", str(out / "adapters")])
    return res | {"_out": out}


def test_every_method_has_finite_metrics(result):
    assert set(result["methods"]) == set(e2e.METHODS)
    for key, r in result["methods"].items():
        for m in ("BLEU", "NIST", "ROUGE_L", "CIDEr", "val_loss"):
            assert math.isfinite(r[m]), (key, m)
        assert 0 <= r["BLEU"] <= 1 and 0 <= r["ROUGE_L"] <= 1
        assert 0 < r["trainable"] <= r["total"]


def test_parameter_counts_order(result):
    m = result["methods"]
    assert m["full"]["trainable"] > m["top2"]["trainable"] > m["adapter_large"]["trainable"]
    assert m["adapter_large"]["trainable"] > m["adapter_small"]["trainable"]
    assert m["prefix"]["kept"] < m["prefix"]["trainable"]  # the MLP is dropped after training
    # LoRA on W_q, W_v (two of c_attn's three slices) trains 2 r (C + C) per block; on every linear much more
    cfg = result["base_shape"]
    assert m["lora_qv"]["trainable"] == cfg["n_layer"] * 2 * 4 * (cfg["n_embd"] + cfg["n_embd"])
    assert m["lora_all"]["trainable"] > m["lora_qv"]["trainable"]


def test_base_covers_the_task_without_copied_positions(result):
    """The base was pretrained with as many positions as the E2E pairs need; nothing was stretched."""
    assert result["base_positions"] >= 512
    assert result["longest_pair"] <= result["base_positions"] or result["dropped"] > 0


def test_report_prints_the_claims_verdicts_on_this_run(result):
    """The lesson judges the course's E2E claims with the claims table's rules, on its own numbers."""
    from minipeft.claims import lesson_claims

    strip = {k: v for k, v in result.items() if k != "_out"}
    entries = {e["id"]: e for e in lesson_claims("e2e", json.loads(json.dumps(strip, default=float)))}
    assert {"lora-all-linear-vs-ft-e2e", "lora-rank-plateau"} <= set(entries)
    m = result["methods"]
    if m["full"]["BLEU"] < 0.01:  # quick mode learns nothing: no verdict rather than a false one
        assert entries["lora-all-linear-vs-ft-e2e"]["verdict"] == "not-attempted"
    rel = result["relations"]
    vl = {int(r): x["val_loss"] for r, x in result["ranks"].items()}
    best = min(vl.values())
    assert rel["rank_plateau_from"] == min(r for r, x in vl.items() if x <= best * 1.02)


def test_rank_table(result):
    ranks = result["ranks"]
    assert sorted(ranks) == [1, 2, 4]  # the quick budget's ranks
    assert all(math.isfinite(r["val_loss"]) and math.isfinite(r["BLEU"]) for r in ranks.values())
    counts = [ranks[r]["trainable"] for r in sorted(ranks)]
    assert counts == sorted(counts) and counts[1] == 2 * counts[0]


def test_figures_json_and_saved_adapters(result):
    out = result["_out"]
    assert (out / "e2e.json").is_file()
    for name in ("e2e_methods", "e2e_lora_rank", "e2e_train_loss"):
        assert (out / "figures" / f"{name}.png").is_file()
    assert (out / "adapters" / "base" / "config.json").is_file()
    assert (out / "adapters" / "lora_all_lr0.01" / "adapter_config.json").is_file()


def test_saved_adapter_evaluates_like_the_lesson(result, tmp_path):
    """The evaluation command reproduces the lesson's LoRA outputs from the saved files."""
    from minipeft.lessons.e2e_eval import main

    out = tmp_path / "lora.txt"
    main(["--adapter", str(result["_out"] / "adapters" / "lora_all_lr0.01"), "--beam", "2", "--length-penalty", "0.9",
          "--no-repeat-ngram", "20", "--max-new-tokens", "48", "--data", str(result["_out"] / "adapters" / "test.csv"),
          "--out", str(out)])
    saved = (result["_out"] / "adapters" / "lora_all_lr0.01" / "e2e_outputs.txt").read_text(encoding="utf-8")
    assert out.read_text(encoding="utf-8") == saved


def test_finished_runs_are_kept_and_a_rerun_skips_them(result, tmp_path, monkeypatch):
    """--cache: each finished run is written atomically; a rerun (after a kill) reads it instead of training."""
    from minipeft.lessons import e2e_runs
    from minipeft.lessons._common import parse_args

    b = e2e.budget(parse_args(["--quick"], "", e2e._add_arguments))
    ctx = e2e_runs.Context(str(result["_out"] / "adapters" / "base"), None, b, 0, "cpu", None, str(tmp_path))
    first = e2e_runs.run_one(ctx, "lora_all", 0.01)
    [entry] = list(tmp_path.iterdir())
    assert entry.name.startswith("lora_all_lr0.01-") and entry.suffix == ".json"

    def no_training(*a, **k):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(e2e_runs, "train_and_score", no_training)
    again = e2e_runs.run_one(ctx, "lora_all", 0.01)
    assert again["val_loss"] == first["val_loss"] and again["outputs"] == first["outputs"]
    # a rerun saves the base again (another file: safetensors' metadata order varies) and still finds the entry
    from minipeft.gpt import GPT

    again_dir = tmp_path.parent / f"{tmp_path.name}-base"
    GPT.from_hf(result["_out"] / "adapters" / "base").save_hf(again_dir)
    rerun = e2e_runs.Context(str(again_dir), None, b, 0, "cpu", None, str(tmp_path))
    assert e2e_runs.run_one(rerun, "lora_all", 0.01)["val_loss"] == first["val_loss"]
    # another learning rate is another entry: it is trained, not confused with the cached one
    with pytest.raises(AssertionError, match="trained again"):
        e2e_runs.run_one(ctx, "lora_all", 0.02)


def test_a_rate_chosen_at_the_end_of_its_grid_is_flagged():
    assert e2e._at_edge(1e-2, (1e-3, 3e-3, 1e-2)) and e2e._at_edge(1e-3, (1e-3, 3e-3, 1e-2))
    assert not e2e._at_edge(3e-3, (1e-3, 3e-3, 1e-2))
    assert not e2e._at_edge(1e-2, (1e-2,))  # one rate (the CPU default) is not a sweep


def test_lora_rank_is_chosen_on_validation_among_ranks_at_or_above_its_own():
    nan = float("nan")
    ranks = {2: {"val_loss": 0.40, "lr": 3e-3}, 8: {"val_loss": 0.60, "lr": 3e-3},
             32: {"val_loss": 0.50, "lr": 3e-3}, 64: {"val_loss": 0.50, "lr": 3e-3}, 128: {"val_loss": nan}}
    t = e2e.lora_rank_chosen(ranks, 8)
    assert t["r"] == 32 and t["ranks_considered"] == [8, 32, 64]  # r=2 is below LoRA's own; a tie keeps the smaller
    assert t["label"] == "LoRA all (r=32, chosen on val)" and t["val_loss"] == 0.50
    with pytest.raises(ValueError, match="no finished rank >= 256"):
        e2e.lora_rank_chosen(ranks, 256)


def test_the_rank_chosen_row_is_recorded_and_decoded(result):
    t = result["lora_all_tuned"]
    assert t["r"] in result["ranks"] and t["r"] >= min(t["ranks_considered"])
    assert math.isfinite(t["BLEU"]) and t["val_loss"] == min(result["ranks"][r]["val_loss"]
                                                              for r in t["ranks_considered"])
