"""The LoRA lesson in quick mode: it runs, and its numbers are sane.

One run of ``main(["--quick"])`` (seconds) is shared by the checks below.
"""
import copy
import math
from collections import Counter

import numpy as np
import pytest

from minipeft.engine import Function, no_grad
from minipeft.gpt import GPT, GPTConfig
from minipeft.lessons import lora
from . import recorded


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    return recorded.run(lora, ["--quick", "--figures", str(out / "figures"), "--json", str(out / "lora.json")]) | {"_out": out}


def test_returns_the_key_numbers(result):
    for key in ("base_val_loss", "full_ft", "ranks", "rank_sweep", "latency_ms", "energy", "subspace",
                "course_example", "parameters"):
        assert key in result
    assert (result["_out"] / "lora.json").is_file()
    for name in ("lora_rank_sweep", "lora_latency", "lora_spectra"):
        assert (result["_out"] / "figures" / f"{name}.png").is_file()


def test_course_example_is_86_percent():
    ex = lora.course_example()
    assert (ex["full"], ex["A"], ex["B"]) == (32768, 512, 4096)
    assert round(100 * ex["reduction"]) == 86


def test_parameter_counts(result):
    p = result["parameters"]
    assert p["trainable"] == sum(row["lora"] * row["layers"] for row in p["table"])
    assert 0 < p["trainable"] < p["base"] <= p["total"]


def test_rank_sweep_beats_the_base(result):
    base = result["base_val_loss"]
    assert math.isfinite(base)
    for r in result["ranks"]:
        v = result["rank_sweep"][str(r)]
        assert math.isfinite(v["val_loss"]) and v["val_loss"] < base
    trainable = [result["rank_sweep"][str(r)]["trainable"] for r in result["ranks"]]
    assert trainable == sorted(trainable) and len(set(trainable)) == len(trainable)
    assert result["full_ft"]["val_loss"] < base


def test_latency_table_and_merge(result):
    assert result["merge_max_abs_diff"] < 1e-4
    for table in (result["latency_ms"], result["latency_min_ms"]):
        assert all(v > 0 for ms in table.values() for v in ms.values())


def _ops_of_one_forward(model, idx, monkeypatch) -> Counter:
    """How many times each op (Function subclass) runs in one forward pass without a graph."""
    counts: Counter = Counter()
    apply = Function.apply.__func__

    def counting(cls, *args, **kwargs):
        counts[cls.__name__] += 1
        return apply(cls, *args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(Function, "apply", classmethod(counting))
        with no_grad():
            model(idx)
    return counts


def test_merged_lora_runs_the_base_ops_and_unmerged_runs_more(monkeypatch):
    """No added latency, counted instead of timed: merged, LoRA is the base's ops exactly (the
    lesson's table times them; a timing is no unit test on a shared machine)."""
    base = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=50), seed=0).eval()
    lora_model = lora.build(copy.deepcopy(base), 4)
    merged = copy.deepcopy(lora_model).merge_and_unload()
    idx = np.random.default_rng(0).integers(0, 50, (2, 8))
    fused = _ops_of_one_forward(lora_model, idx, monkeypatch)  # the fused LoRA op (peft/lora_fused.py)
    monkeypatch.setenv("MINIPEFT_KERNELS", "0")  # the reference ops, one by one, as the lesson explains them
    ops = {name: _ops_of_one_forward(m, idx, monkeypatch)
           for name, m in (("base", base), ("unmerged", lora_model), ("merged", merged))}
    assert ops["merged"] == ops["base"] and sum(ops["base"].values()) > 0
    extra = ops["unmerged"] - ops["base"]
    assert extra and not ops["base"] - ops["unmerged"], extra  # unmerged: the base's ops and LoRA's on top
    # the fused op runs each adapted layer (base product and LoRA's) as one op in place of the base's Linear
    adapted = fused["LoraLinear"]
    assert adapted > 0 and fused["Linear"] == ops["base"]["Linear"] - adapted


def test_energy_fractions(result):
    for table in (result["energy"], result["energy_random"]):
        for name, e in table.items():
            vals = [e[str(r)] for r in lora.ENERGY_RANKS]
            assert all(0.0 <= v <= 1.0 + 1e-12 for v in vals), (name, vals)
            assert vals == sorted(vals), (name, vals)


def test_subspace_similarity_bounds():
    rng = np.random.default_rng(0)
    q = np.linalg.qr(rng.standard_normal((32, 32)))[0]
    assert lora.subspace_similarity(q, q, 4, 4) == pytest.approx(1.0)
    assert lora.subspace_similarity(q[:, :4], q[:, 4:8], 4, 4) == pytest.approx(0.0, abs=1e-12)


def test_subspace_rows_in_range(result):
    for row in result["subspace"]["rows"]:
        for i in (1, 4, 8):
            assert 0.0 <= row[f"phi{i}"] <= 1.0 + 1e-9


def test_merges_by_every_combination_type(result):
    """Section 5: every peft combination type ran; cat adds both updates, so it beats the base on both tasks."""
    from minipeft.peft.merge import COMBINATIONS

    m = result["merges"]
    assert set(m["merged"]) == set(COMBINATIONS)
    assert all(math.isfinite(v[t]) for v in m["merged"].values() for t in ("python", "c"))
    assert m["merged"]["cat"]["r"] == 2 * m["merged"]["linear"]["r"]
    assert m["alone"]["python"]["python"] < m["base"]["python"] and m["alone"]["c"]["c"] < m["base"]["c"]
    assert m["merged"]["cat"]["python"] < m["base"]["python"] and m["merged"]["cat"]["c"] < m["base"]["c"]
