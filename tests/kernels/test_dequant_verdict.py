"""``benchmarks/dequant_verdict.py``: the whole call's verdict over several runs, by the rule it states.

Runs are synthetic JSON files in ``dequant_4bit.py``'s format (no GPU needed): the verdict is the median
over runs against the threshold, per configuration, and refuses runs that are not repetitions.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

VERDICT = Path(__file__).resolve().parents[2] / "benchmarks" / "dequant_verdict.py"
VARIANT = {"WIDE": 1, "WIDE_BLOCKS": 8, "PDL": 1}


def verdict_module():
    spec = importlib.util.spec_from_file_location("dequant_verdict_bench", VERDICT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_json(path, fracs: dict, launch: float = 0.9, device="NVIDIA H200", variant=VARIANT):
    """A dequant_4bit.py-like JSON with a whole-call ('minipeft') and a launch ('mp-kernel') row per config."""
    rows = []
    for (shape, dtype, dq), frac in fracs.items():
        for impl, f in (("minipeft", frac), ("mp-kernel", launch), ("minipeft-idle", 0.1)):
            rows.append({"shape": list(shape), "out_dtype": dtype, "double_quant": dq, "impl": impl,
                         "frac_copy": f})
    path.write_text(json.dumps({"command": "python benchmarks/dequant_4bit.py --no-bnb", "device_name": device,
                                "default_variant": variant, "rows": rows}))
    return str(path)


A = ((4096, 11008), "float16", True)
B = ((8192, 8192), "bfloat16", False)


def test_median_over_runs_decides_each_configuration(tmp_path, capsys):
    m = verdict_module()
    # A: 0.849, 0.851, 0.853 -> median 0.851 >= 0.85 (one run below, counted); B: 0.84, 0.90, 0.91 -> 0.90
    runs = [run_json(tmp_path / f"r{i}.json", {A: a, B: b}) for i, (a, b) in
            enumerate(((0.849, 0.84), (0.851, 0.90), (0.853, 0.91)))]
    v = m.main(runs + ["--json", str(tmp_path / "v.json")])
    assert v["met"] and v["enough_runs"]
    rows = {(tuple(r["shape"]), r["out_dtype"], r["double_quant"]): r for r in v["configurations"]}
    assert rows[A]["whole_median"] == pytest.approx(0.851) and rows[A]["runs_below"] == 1
    assert rows[A]["whole_min"] == pytest.approx(0.849) and rows[A]["whole_max"] == pytest.approx(0.853)
    assert rows[B]["whole_median"] == pytest.approx(0.90) and rows[B]["launch_median"] == pytest.approx(0.9)
    out = capsys.readouterr().out
    assert "verdict: MET: 2 of 2" in out and "median over runs" in out
    assert json.loads((tmp_path / "v.json").read_text())["met"] is True
    # the same runs against a higher threshold: A's median 0.851 < 0.852, not met
    v = m.main(runs + ["--threshold", "0.852"])
    assert not v["met"] and "verdict: NOT MET: 1 of 2" in capsys.readouterr().out


def test_too_few_runs_decide_nothing(tmp_path, capsys):
    m = verdict_module()
    runs = [run_json(tmp_path / f"r{i}.json", {A: 0.95}) for i in range(2)]
    v = m.main(runs)
    assert not v["met"] and not v["enough_runs"]
    assert "NOT DECIDED (too few runs)" in capsys.readouterr().out
    assert m.main(runs + ["--min-runs", "2"])["met"]


def test_bad_input_names_the_file_and_the_remedy(tmp_path, capsys):
    m = verdict_module()
    good = run_json(tmp_path / "good.json", {A: 0.9})
    cut = tmp_path / "cut.json"
    cut.write_text(Path(good).read_text()[:40])                           # a run killed mid-write
    with pytest.raises(SystemExit) as e:
        m.main([good, str(cut)])
    assert str(cut) in str(e.value) and "dequant_4bit.py --json again" in str(e.value)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit) as e:
        m.main([str(other)])
    assert "not a JSON of benchmarks/dequant_4bit.py" in str(e.value)
    host = tmp_path / "host.json"                                      # dequant_host.py's rows have no 'impl'
    host.write_text(json.dumps({"device_name": "NVIDIA H200", "rows": [{"row": "launch", "median_us": 30.5}]}))
    with pytest.raises(SystemExit) as e:
        m.main([good, str(host)])
    assert "host.json: not a JSON of benchmarks/dequant_4bit.py" in str(e.value)
    with pytest.raises(SystemExit) as e:
        m.main([str(tmp_path / "missing.json")])
    assert "missing.json: cannot read it" in str(e.value)
    # runs of another device or default kernel are not repetitions of one measurement
    h100 = run_json(tmp_path / "h100.json", {A: 0.9}, device="NVIDIA H100")
    with pytest.raises(SystemExit) as e:
        m.main([good, h100])
    assert "not repetitions" in str(e.value) and "NVIDIA H100" in str(e.value)
    plain = run_json(tmp_path / "plain.json", {A: 0.9}, variant={**VARIANT, "PDL": 0})
    with pytest.raises(SystemExit):
        m.main([good, plain])
    with pytest.raises(SystemExit):
        m.main([good, "--threshold", "85"])                            # a percentage, not a fraction
