"""Is the NF4 dequantize's whole call at >= 85% of the copy rate? A verdict over several runs of dequant_4bit.py.

Issue #17 item 5 asks for the whole Python call (``dequantize_4bit_cuda``, the ``minipeft`` row of
``benchmarks/dequant_4bit.py``) at >= 85% of the device's copy rate (the 1 GiB device-to-device copy
each run measures). One run's median is steady within the run (its quartiles lie within about
0.5 µs), but it moves between runs by up to a point and a half (different buffers, a busier host:
``results/h200-2026-12-03/``, calls p and q), so one run decides nothing near the line. This script
reads the JSON of several separate runs and states the rule it applies:

    a configuration (shape, output dtype, double quantization) meets the target when the MEDIAN over
    runs of its whole call's fraction of the copy rate is >= the threshold; the item is met when
    every configuration meets it, with at least --min-runs runs of each.

It prints, per configuration, the whole call's least, median and greatest fraction over the runs, how
many runs fell below the threshold, and the launch alone (``mp-kernel``) for comparison, so that a
configuration near the line shows as such. Runs from different devices or default kernel variants
are refused (they are not repetitions of one measurement).

    python benchmarks/dequant_4bit.py --no-bnb --variants w1b8p1 --json run1.json   # (several times)
    python benchmarks/dequant_verdict.py run1.json run2.json run3.json [--threshold 0.85] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # dequant_4bit.py beside this file


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="JSON files written by dequant_4bit.py --json, one per run")
    ap.add_argument("--threshold", type=float, default=0.85, help="fraction of the copy rate (default 0.85)")
    ap.add_argument("--min-runs", type=int, default=3, help="runs each configuration needs (default 3)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the verdict here")
    args = ap.parse_args(argv)
    if not 0 < args.threshold <= 1:
        ap.error(f"--threshold must be a fraction in (0, 1], got {args.threshold}")
    if args.min_runs < 1:
        ap.error(f"--min-runs must be at least 1, got {args.min_runs}")
    return args


def load_run(path: str) -> dict:
    """One run's JSON, checked to be dequant_4bit.py's, or a ValueError naming the file and the remedy."""
    try:
        with open(path) as f:
            run = json.load(f)
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror}); pass the JSON files dequant_4bit.py --json wrote")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg} at line {e.lineno}); was the run interrupted? Run "
                         "benchmarks/dequant_4bit.py --json again") from None
    rows = run.get("rows") if isinstance(run, dict) else None
    if (not isinstance(rows, list) or "device_name" not in run
            or not all(isinstance(r, dict) and {"impl", "shape", "out_dtype", "double_quant", "frac_copy"} <= set(r)
                       for r in rows)):
        raise ValueError(f"{path}: not a JSON of benchmarks/dequant_4bit.py (it has 'device_name' and 'rows' "
                         "with 'impl', 'shape', 'out_dtype', 'double_quant' and 'frac_copy')")
    return run


def fractions(run: dict, impl: str) -> dict:
    """``{(shape, out_dtype, double_quant): frac_copy}`` of the rows of ``impl`` in one run."""
    return {(tuple(r["shape"]), r["out_dtype"], bool(r["double_quant"])): r["frac_copy"]
            for r in run["rows"] if r["impl"] == impl}


def verdict(runs: dict, threshold: float = 0.85, min_runs: int = 3) -> dict:
    """The rule of the module docstring over ``runs`` (``{name: run JSON}``): per configuration and overall."""
    if not runs:
        raise ValueError("no runs given")
    kinds = {(r["device_name"], json.dumps(r.get("default_variant"), sort_keys=True)) for r in runs.values()}
    if len(kinds) > 1:
        detail = "; ".join(f"{name}: {r['device_name']}, {r.get('default_variant')}" for name, r in runs.items())
        raise ValueError(f"the runs are not repetitions of one measurement (device or default variant differ): "
                         f"{detail}")
    whole = {name: fractions(r, "minipeft") for name, r in runs.items()}
    launch = {name: fractions(r, "mp-kernel") for name, r in runs.items()}
    configs = sorted({c for w in whole.values() for c in w})          # (shape, out_dtype, double_quant)
    if not configs:
        raise ValueError(f"no 'minipeft' (whole call) rows in {', '.join(runs)}")
    rows = []
    for c in configs:
        w = [whole[name][c] for name in runs if c in whole[name]]
        k = [launch[name][c] for name in runs if c in launch[name]]
        med = statistics.median(w)
        rows.append({"shape": list(c[0]), "out_dtype": c[1], "double_quant": c[2], "runs": len(w),
                     "whole_min": min(w), "whole_median": med, "whole_max": max(w),
                     "runs_below": sum(x < threshold for x in w),
                     "launch_median": statistics.median(k) if k else None,
                     "met": len(w) >= min_runs and med >= threshold, "enough_runs": len(w) >= min_runs})
    first = next(iter(runs.values()))
    return {"rule": (f"a configuration meets the target when the median over runs of the whole call's fraction "
                     f"of the copy rate is >= {threshold:g}; met when every configuration does, each with "
                     f">= {min_runs} runs"),
            "threshold": threshold, "min_runs": min_runs, "device_name": first["device_name"],
            "default_variant": first.get("default_variant"), "runs": list(runs),
            "commands": sorted({r.get("command", "") for r in runs.values()}),
            "configurations": rows, "met": all(r["met"] for r in rows),
            "enough_runs": all(r["enough_runs"] for r in rows)}


def report(v: dict) -> str:
    lines = [f"rule: {v['rule']}", f"device: {v['device_name']}; runs: {len(v['runs'])}",
             f"{'shape':>11} {'dtype':>8} {'DQ':>3} {'runs':>4}  {'whole call % of copy: min / median / max':>40}"
             f"  {'below':>5}  {'launch %':>8}  met"]
    for r in v["configurations"]:
        shape = "x".join(str(s) for s in r["shape"])
        spread = f"{100 * r['whole_min']:.1f} / {100 * r['whole_median']:.1f} / {100 * r['whole_max']:.1f}"
        launch = "-" if r["launch_median"] is None else f"{100 * r['launch_median']:.1f}"
        met = "yes" if r["met"] else ("too few runs" if not r["enough_runs"] else "no")
        lines.append(f"{shape:>11} {r['out_dtype']:>8} {'yes' if r['double_quant'] else 'no':>3} {r['runs']:>4}  "
                     f"{spread:>40}  {r['runs_below']:>5}  {launch:>8}  {met}")
    n_met = sum(r["met"] for r in v["configurations"])
    overall = "MET" if v["met"] else ("NOT DECIDED (too few runs)" if not v["enough_runs"] else "NOT MET")
    lines.append(f"verdict: {overall}: {n_met} of {len(v['configurations'])} configurations at a median "
                 f">= {100 * v['threshold']:g}% of the copy rate")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        runs = {path: load_run(path) for path in args.runs}
        v = verdict(runs, args.threshold, args.min_runs)
    except ValueError as e:
        sys.exit(f"dequant_verdict.py: {e}")
    print(report(v))
    from dequant_4bit import write_result                             # atomic, as every dequantize benchmark's
    return write_result(args.json_out, v)


if __name__ == "__main__":
    main()
