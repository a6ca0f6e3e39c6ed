"""The side-tuning lesson in quick mode: it runs, its numbers are finite, QST holds less than QLoRA.

One run of ``main(["--quick"])`` (seconds) is shared by the checks below.
"""
import math

import pytest

from minipeft.lessons import side_tuning


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("side_tuning")
    res = side_tuning.main(["--quick", "--figures", str(out / "figures"), "--json", str(out / "side.json")])
    return res | {"_out": out}


def test_returns_finite_key_numbers_and_files(result):
    assert (result["_out"] / "side.json").is_file()
    assert (result["_out"] / "figures" / "side_tuning_memory.png").is_file()
    assert math.isfinite(result["base_val_loss"]) and result["all_finite"]
    for name in side_tuning.METHODS:
        r = result["methods"][name]
        assert math.isfinite(r["val_loss"]) and r["trainable"] > 0
        assert all(math.isfinite(v) and v >= 0 for v in r["memory"].values())
    for key in ("activation_ratio", "total_ratio", "loss_gap"):
        assert math.isfinite(result["qst_vs_qlora"][key])


def test_qst_holds_fewer_activations_than_qlora_at_the_largest_batch(result):
    acts = result["batch_sweep"]["activations"]
    assert acts["qst"][-1] < acts["qlora"][-1]
    assert result["methods"]["qst"]["memory"]["total"] < result["methods"]["qlora"]["memory"]["total"]
    assert result["qst_vs_qlora"]["activation_ratio"] > 1


def test_side_methods_train_only_a_small_side_network(result):
    m = result["methods"]
    assert m["qst"]["trainable"] < m["qlora"]["trainable"] < m["full"]["trainable"]
    assert m["qst"]["memory"]["backbone_grads"] == 0
    assert m["qst"]["memory"]["weights"] < m["lst"]["memory"]["weights"]  # the NF4 backbone


def test_activations_grow_with_batch_and_sequence(result):
    for sweep in (result["batch_sweep"], result["seq_sweep"]):
        for ys in sweep["activations"].values():
            assert all(a < b for a, b in zip(ys, ys[1:]))


def test_lst_matches_the_memory_calculator(result):
    c = result["lst_calculator"]
    assert c["measured_held"] == c["predicted_held"]
    assert 0 <= c["measured_saved"] - c["predicted_saved"] <= 64  # the gates' scalars


def test_course_table_average_ratio():
    qa, qm, sa, sm = side_tuning.COURSE_TABLE["Avg."]
    assert round(qm / sm, 2) == 1.81 and round(sa - qa, 1) == 0.1
