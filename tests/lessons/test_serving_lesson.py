"""The serving lesson in quick mode: a mixed batch matches merged models, bad requests fail alone,
every baseline runs, memory favours adapters over merged copies, the LRU pool evicts; requests
arriving over time get generate's tokens, and continuous batching is measured against static."""
import json

import numpy as np
import pytest

from minipeft.lessons import serving
from minipeft.peft.io import read_adapter
from . import recorded


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("serving")
    res = recorded.run(serving, ["--quick", "--figures", str(d / "fig"), "--json", str(d / "out.json")])
    return res, d


def test_outputs_and_figures(run):
    r, d = run
    assert json.loads((d / "out.json").read_text())["ns"] == r["ns"] == list(serving.QUICK["ns"])
    for name in ("serving_throughput", "serving_memory", "serving_arrivals"):
        assert (d / "fig" / f"{name}.png").stat().st_size > 10_000


def test_mixed_batch_matches_merged_models_and_errors_stay_per_request(run):
    c = run[0]["check"]
    assert c["served"] >= 6 and c["identical"] == c["served"]
    assert c["errors"] == 2  # the unknown adapter and the adapter for a wider base


def test_every_method_ran_at_every_n(run):
    r = run[0]
    for method, points in r["sweep"].items():
        assert len(points) == len(r["ns"]), method
        assert all(p["decode_tps"] > 0 and p["latency_ms"] > 0 for p in points)
    assert all(p["swap_s"] > 0 for p in r["sweep"]["(b) merged, one at a time"])
    assert len(r["ratio_mixed_vs_base"]) == len(r["ns"]) and all(x > 0 for x in r["ratio_mixed_vs_base"])


def test_memory_adapters_against_merged_copies(run):
    m = run[0]["memory"]
    assert m["base_nf4"] < m["base_fp32"] / 3 and m["adapter_bytes"] < m["slot_bytes"]
    for n, row in m["rows"].items():
        assert row["N merged fp32 copies"] == n * m["base_fp32"]
        if n >= 10:
            assert row["N merged fp32 copies"] > 2 * row["fp32 base + N adapters"]
    assert run[0]["measured_memory"]["device_pool_bytes"] == max(run[0]["ns"]) * m["slot_bytes"]


def test_lru_pool_evicts(run):
    lru = run[0]["lru"]
    assert lru["device_evictions"] > 0 and 0 <= lru["hit_rate"] <= 1 and lru["waves"] >= 3


def test_random_adapters_are_peft_format(tmp_path):
    from minipeft.gpt import GPT, GPTConfig

    model = GPT(GPTConfig.preset("T0"), seed=0)
    serving.write_random_adapter(str(tmp_path / "a"), model, 8, ["c_attn", "c_fc"], np.random.default_rng(0))
    config, tensors, *_ = read_adapter(tmp_path / "a")
    assert config.peft_type == "LORA" and config.r == 8 and config.lora_alpha == 16
    assert len(tensors) == 2 * 2 * model.config.n_layer


def test_continuous_batching_section(run):
    c = run[0]["continuous"]
    assert c["check"]["identical"] == c["check"]["total"] >= 12 and c["check"]["sampled"] >= 3
    assert c["mixed_logits"]["rel_diff"] < 1e-5 and c["mixed_logits"]["rows"] == 8  # peft's path = the server's
    assert c["slot_bytes_classes"] < c["slot_bytes_padded"]  # rank classes: ranks 4 and 8 not padded to 16
    rows = c["sweep"]["rows"]
    assert [r["fraction"] for r in rows] == list(serving.QUICK["fractions"]) and c["sweep"]["capacity_rps"] > 0
    assert all(r["continuous_tps"] > 0 and r["static_tps"] > 0 and r["continuous_latency_s"] > 0 for r in rows)
    assert all(1 <= r["mean_batch"] <= serving.QUICK["max_batch"] for r in rows)
