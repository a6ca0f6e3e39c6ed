"""The E2E lesson in quick mode: it runs in seconds and returns finite metrics for every method and rank.

One run of ``main(["--quick", ...])`` is shared by the checks below.
"""
import math

import pytest

from minipeft.lessons import e2e


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    res = e2e.main(["--quick", "--figures", str(out / "figures"), "--json", str(out / "e2e.json"),
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


def test_rank_table(result):
    ranks = result["ranks"]
    assert sorted(ranks) == list(e2e.RANKS)
    assert all(math.isfinite(r["val_loss"]) and math.isfinite(r["BLEU"]) for r in ranks.values())
    counts = [ranks[r]["trainable"] for r in e2e.RANKS]
    assert counts == sorted(counts) and counts[1] == 2 * counts[0]


def test_figures_json_and_saved_adapters(result):
    out = result["_out"]
    assert (out / "e2e.json").is_file()
    for name in ("e2e_methods", "e2e_lora_rank", "e2e_train_loss"):
        assert (out / "figures" / f"{name}.png").is_file()
    assert (out / "adapters" / "base" / "config.json").is_file()
    assert (out / "adapters" / "lora" / "adapter_config.json").is_file()


def test_saved_adapter_evaluates_like_the_lesson(result, tmp_path):
    """The evaluation command reproduces the lesson's LoRA outputs from the saved files."""
    from minipeft.evaluate import main

    out = tmp_path / "lora.txt"
    main(["--adapter", str(result["_out"] / "adapters" / "lora"), "--beam", "2", "--length-penalty", "0.8",
          "--no-repeat-ngram", "20", "--max-new-tokens", "48", "--data", str(result["_out"] / "adapters" / "test.csv"),
          "--out", str(out)])
    saved = (result["_out"] / "adapters" / "lora" / "e2e_outputs.txt").read_text(encoding="utf-8")
    assert out.read_text(encoding="utf-8") == saved
