"""The quantization lesson in quick mode: its key numbers, its figures, its JSON."""
import json
import math

import pytest

from minipeft.lessons import quantization
from . import recorded

FIGURES = ["quant_absmax_vs_zeropoint", "quant_blockwise_outlier", "quant_4bit_codes", "quant_scale_overhead",
           "quant_bf16_vs_fp16", "quant_llm_int8_errors", "quant_outlier_features", "quant_tiny_model"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("quantization")
    res = recorded.run(quantization, ["--quick", "--figures", str(d / "fig"), "--json", str(d / "out.json")])
    return res, d


def test_scalar_and_blockwise(run):
    r, _ = run
    assert r["zeropoint_error"] < 0.6 * r["absmax_error"]
    assert r["zeropoint_codes_used"] > 1.5 * r["absmax_codes_used"]
    o = r["outlier"]
    tensor, block = o["int8 absmax, one scale per tensor"], o["int8 absmax, blocks of 64"]
    assert tensor["error_with_outlier"] > 5 * tensor["error"]
    assert block["error_with_outlier"] < 1.5 * block["error"] < tensor["error_with_outlier"] / 5


def test_four_bit_codes_and_overhead(run):
    r, _ = run
    c = r["codes_4bit"]
    assert c["nf4"]["abs"] < c["fp4"]["abs"] and abs(c["nf4"]["abs"] - 0.0728) < 0.003
    assert abs(c["fp4"]["abs"] - 0.0965) < 0.003
    assert c["nf4"]["rel"] < c["fp4"]["rel"] < c["int4"]["rel"]          # NF4 < FP4 < Int4 (relative)
    assert c["nf4"]["mse"] < c["int4"]["mse"]
    ov = r["overhead"]
    assert ov["plain"] == 0.5 and abs(ov["double_quant"] - 0.127) < 1e-3
    assert ov["measured_plain"] == 0.5 and abs(ov["measured_double_quant"] - 0.127) < 0.005
    assert ov["nf4_error_double_quant"] < 1.01 * ov["nf4_error"]


def test_floats(run):
    f = run[0]["floats"]
    assert f["N(0,1) float16"]["rel_error"] < f["N(0,1) bfloat16"]["rel_error"] / 4
    assert f["N(0,1) x 1e5 float16"]["overflow"] > 0.3 and f["N(0,1) x 1e5 bfloat16"]["overflow"] == 0
    assert f["N(0,1) x 1e-6 float16"]["to_zero"] > 0 and f["N(0,1) x 1e-6 bfloat16"]["to_zero"] == 0


def test_llm_int8(run):
    r, _ = run
    s = r["llm_int8"]
    assert s["found"] == s["dims"]
    e = s["errors"]
    assert e["llm_int8"] < e["int8"] / 2 and e["llm_int8_float_outliers"] <= e["llm_int8"]
    assert e["zero_outliers"] > 5 * e["zero_random"]
    t = r["tiny_outliers"]
    assert t["outlier_dims"] == 0                                          # no emergent outliers at d 64
    planted = t["planted"]
    assert abs(planted["fp32 (planted, same function)"] - t["loss"]) < 1e-3  # same function


def test_quantized_tiny_model(run):
    m = run[0]["model"]
    fp32 = m["fp32"]
    assert all(math.isfinite(v["loss"]) for v in m.values())
    assert m["NF4 + double quant"]["bytes"] < fp32["bytes"] / 2.5
    assert m["NF4 + double quant"]["bytes"] < m["NF4"]["bytes"] < m["int8, LLM.int8() (threshold 6)"]["bytes"]
    assert m["NF4 + double quant"]["bits_per_weight"] < m["NF4"]["bits_per_weight"] < 4.7
    assert all(abs(v["loss"] - fp32["loss"]) < 0.1 * fp32["loss"] for v in m.values())


def test_figures_and_json(run):
    r, d = run
    for name in FIGURES:
        assert (d / "fig" / f"{name}.png").stat().st_size > 10_000
    saved = json.loads((d / "out.json").read_text())
    assert saved["codes_4bit"]["nf4"]["abs"] == pytest.approx(r["codes_4bit"]["nf4"]["abs"])
