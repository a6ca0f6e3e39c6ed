"""The LoRA lesson in quick mode: it runs, and its numbers are sane.

One run of ``main(["--quick"])`` (seconds) is shared by the checks below.
"""
import math

import numpy as np
import pytest

from minipeft.lessons import lora


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    return lora.main(["--quick", "--figures", str(out / "figures"), "--json", str(out / "lora.json")]) | {"_out": out}


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


def test_merged_latency_is_the_base_latency(result):
    assert result["merge_max_abs_diff"] < 1e-4
    for table in (result["latency_ms"], result["latency_min_ms"]):
        assert all(v > 0 for ms in table.values() for v in ms.values())
    # batch 1, where the unmerged layer's extra operations cost the most; the fastest of the
    # repeats, the timing least disturbed by other work on a busy machine
    shape = next(s for s in result["latency_min_ms"] if s.startswith("1x"))
    ms = result["latency_min_ms"][shape]
    merged = next(v for k, v in ms.items() if k.endswith(" merged"))
    unmerged = next(v for k, v in ms.items() if k.endswith("unmerged"))
    base = ms["base"]
    assert unmerged > base, ms
    assert abs(merged - base) < max(0.5 * (unmerged - base), 0.1 * base), ms


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
