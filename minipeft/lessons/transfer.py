"""Lesson: scaling laws for transfer -- what is pretraining on English worth in Python bytes?

``python -m minipeft.lessons.transfer [--quick] [--device cuda] [--figures DIR] [--cache DIR]
[--budget-minutes M] [--jobs J] [--replot FILE]``

Hernandez et al. (2021), *Scaling Laws for Transfer* (arXiv 2102.01293): train models of
several sizes on Python from scratch and fine-tuned from a base pretrained on English,
on Python sets of many sizes, each to its best validation loss. The **effective data
transferred** D_T is the extra Python a from-scratch model would need to match the
fine-tuned one; in the low-data regime D_T = k (D_F)^alpha (N)^beta. This lesson measures
D_T off its own scratch curves, fits k, alpha, beta, and sets them beside the paper's.

Grids (``minipeft.lessons.transfer_runs.GRIDS``): ``--quick`` (seconds, for CI), the default CPU grid
(4 sizes, N 888..100K, D_F 1e3..1e6; about ten minutes on 2 cores), and ``--device cuda``
(4 sizes, N 12.8K..4.7M, D up to 5e6 bytes). Every run is cached: running again redoes
nothing, and a run cut short (``--budget-minutes``) continues where it stopped;
``--jobs J`` shares the runs among J worker processes.

What differs from the paper, and why:

* **Tokens are bytes**, not GPT-2's BPE: a 259-symbol vocabulary keeps tokenization from
  favouring one domain (methods.md §0.3). A byte carries less than a BPE token, so losses
  (nats/byte) and D (bytes, which are the paper's characters for ASCII text) are not on
  the paper's scale.
* **Tiny models**: N from 888 to 4.7M non-embedding parameters (the lecture's example is a
  40M model); context 64 (CPU) or 128 (GPU) bytes against 2048 tokens.
* **Far less data and compute**: the bases see under 2 MB of English for at most a few
  thousand steps, against 24B characters; the target is 7.2 MB of standard-library code,
  against 22B characters. Each run has a step cap, so at large D the scratch models are
  limited by compute rather than data, the scratch curve flattens, and fine-tuned models
  that beat its end get only a lower bound on D_T (left out of the fit). D(N), which sets
  the low-data regime, is then where compute runs out rather than where data stops helping.
* **A source close to the target**: the "English" is the docstrings and help pages of the
  very library whose code is the target (same identifiers, same topics), far closer to
  Python than the paper's web text. The base models already predict Python well before
  any fine-tuning, and at the smallest D_F fine-tuning adds little to that zero-shot
  transfer: D_E hardly grows with D_F, so D_T = D_E - D_F is nearly flat and alpha comes
  out near zero on the small grids. The paper's law (D_T -> 0 as D_F -> 0) has no
  zero-shot term; it shows where D_F is large enough for fine-tuning to dominate.
* **The second source** is English plus C headers, 50/50 (the paper: text plus code in
  other languages). It holds only half as much of that close English, so here it need not
  transfer more than English alone, as it did in the paper.
* **The fit** is one least-squares fit of log D_T on log D_F and log N over the low-data
  points (§16.3 step 5), not the paper's "fit of the fits" of the logit of D_T/D_E.
* **Fine-tuning** uses 0.3x the pretraining learning rate (better than 1x at small D_F in
  a check on the CPU grid); every run stops early on a fixed Python validation slice and
  reports the loss of its best step on the next, disjoint slice.

So k, alpha and beta are not expected to equal the paper's; the report states which of the
paper's qualitative findings (methods.md §16.5) hold in this run.

The committed GPU run (``figures/transfer_data.json``, H100, 2026-11-22, 80 runs; logs in
``benchmarks/results/h100-2026-11-22/transfer_gpu_part{1,2}.log``) fits English -> Python
alpha = 0.065 ± 0.024, beta = 0.261 ± 0.021 and English + C -> Python alpha = 0.067 ±
0.030, beta = 0.351 ± 0.027 (paper: 0.18 / 0.096 and 0.38). Both are positive and of the
paper's order. Alpha is smaller than the paper's, for the zero-shot reason above. The
multiplier falls with D_F and rises with N; the smallest model (L1d32) ossifies when
fine-tuned from English + C. English + C transfers more than English only for the
largest model (T2), at every D_F.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

from . import transfer_fits, transfer_runs
from ._common import Report, finish, parse_args, save_figure


def _add_arguments(p):
    p.add_argument("--grid", choices=sorted(transfer_runs.GRIDS), default=None,
                   help="which grid (default: quick with --quick, gpu with --device cuda, else cpu)")
    p.add_argument("--cache", type=Path, default=None, help="run cache (default $MINIPEFT_CACHE/transfer)")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="start no new run after this many minutes; run again to continue")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes sharing the runs (GPU: 4-8 keep the device busy; CPU: one per core)")
    p.add_argument("--replot", type=Path, default=None, metavar="FILE",
                   help="report and redraw from a saved transfer_data.json, training nothing")


def _fmt_fit(f: dict, key: str) -> str:
    v, e = f.get(key, math.nan), f.get(f"{key}_err", math.nan)
    return "n/a" if not math.isfinite(v) else (f"{v:.3f} ± {e:.3f}" if math.isfinite(e) else f"{v:.3f}")


def _targets(a: dict) -> dict:
    """methods.md §16.5 'Targets', checked on this run's numbers."""
    pts, fits, srcs = a["points"], a["fits"], list(a["fits"])
    s1 = srcs[0] if srcs else None
    out = {}
    low = {}
    for p in pts:
        if p["source"] == s1:
            low.setdefault(p["size"], p)  # points are sorted by D_F within a size: the first is the smallest
    out["D_T > 0 at the smallest D_F for every size"] = bool(low) and all(p["D_T"] > 0 for p in low.values())
    f = fits.get(s1, {})
    a_, b_ = f.get("alpha", math.nan), f.get("beta", math.nan)
    out["0 < alpha < 1 and beta > 0"] = bool(0 < a_ < 1 and b_ > 0)
    out["... both by more than one standard error"] = bool(a_ - f.get("alpha_err", math.nan) > 0
                                                           and b_ - f.get("beta_err", math.nan) > 0)
    falls = []
    for s in a["sizes"]:
        m = [p["multiplier"] for p in pts if p["source"] == s1 and p["size"] == s and p["flag"] == "ok"]
        if len(m) >= 2:
            falls.append(m[-1] < m[0])
    out["multiplier falls as D_F grows"] = bool(falls) and all(falls)
    first = [low[s]["multiplier"] for s in a["sizes"] if s in low and low[s]["flag"] == "ok"]
    out["multiplier at the smallest D_F rises with N"] = len(first) >= 2 and first[-1] > first[0]
    if len(srcs) >= 2:
        f2 = fits[srcs[1]]
        out[f"{srcs[1]} transfers more at the smallest D_F (lower loss for most sizes)"] = _closer_wins(a, srcs)
        out[f"{srcs[1]}: larger k and smaller alpha than {s1}"] = bool(f2.get("k", 0) > f.get("k", math.inf)
                                                                     and f2.get("alpha", 1) < f.get("alpha", -1))
    if a["ossification"]:
        o = a["ossification"][0]
        out[f"ossification: {o['size']} fine-tuned worse than scratch at D_F = {o['D_F']:,}"] = \
            any(o["ossified"].values())
    return out


def _closer_wins(a: dict, srcs) -> bool:
    wins = 0
    for s in a["sizes"]:
        d = [min((p for p in a["points"] if p["source"] == src and p["size"] == s), key=lambda p: p["D_F"],
                 default=None) for src in srcs[:2]]
        if d[0] and d[1]:
            wins += d[1]["loss"] < d[0]["loss"]
    return wins > len(a["sizes"]) / 2


def _report(rep: Report, data: dict) -> None:
    a, grid = data["analysis"], data["grid"]
    rep.section("Grid")
    rep.table([(s, N, *grid["steps"].get(s, (grid["config"]["max_steps"], grid["config"]["pretrain_steps"])),
                transfer_runs.SIZES[s].lr if s in transfer_runs.SIZES else "") for s, N in a["sizes"].items()],
              headers=("size", "N (non-embedding)", "max steps / run", "pretrain steps", "peak lr"))
    rep.text(f"scratch D: {', '.join(f'{d:,}' for d in grid['scratch_D'])} bytes of Python")
    rep.text(f"fine-tune D_F: {', '.join(f'{d:,}' for d in grid['finetune_D'])}; sources: "
             + ", ".join(f"{s} ({transfer_runs.SOURCES.get(s, s)})" for s in grid["sources"]))
    c = grid["config"]
    rep.text(f"windows {c['batch_size']} x {c['block_size']} bytes; evaluate every {c['eval_every']} steps; stop "
             f"after {c['patience']} evaluations without a new best once {100 * c['min_rise']:.1f}% above it; "
             f"fine-tuning lr = {c['finetune_lr_scale']} x peak lr")
    if data.get("bases"):
        rep.section("Base models (nats/byte)")
        rep.table([(b["size"], b["source"], b["source_val_loss"], b["python_test_loss_zero_shot"])
                   for b in data["bases"]], headers=("size", "source", "loss on source", "on Python, zero-shot"))
    rep.section("Test loss at the best step (nats/byte): scratch vs fine-tuned")
    srcs = list(a["finetune"])
    for s in a["sizes"]:
        ft = {src: dict(map(tuple, a["finetune"][src].get(s, []))) for src in srcs}
        rows = [(f"{s}  D={int(d):,}", l, *[ft[src].get(d, "") for src in srcs]) for d, l in a["scratch"][s]]
        rep.table(rows, headers=("", "scratch", *[f"ft {src}" for src in srcs]))
    rep.section("Effective data transferred: D_E read off the scratch curve, D_T = D_E - D_F")
    rep.table([(p["source"], p["size"], int(p["D_F"]), p["loss"], p["D_E"], p["D_T"], p["multiplier"],
                p["flag"] + (" (fit)" if p.get("in_fit") else "")) for p in a["points"]],
              headers=("source", "size", "D_F", "loss", "D_E", "D_T", "(D_F+D_T)/D_F", "flag"))
    rep.text("above_range: better than every scratch run, so D_E is at least the largest scratch D (a lower "
             "bound);\nnegative: worse than scratch with D_F bytes; '(fit)': used by the fit "
             "(low-data regime D_F <= 10% D(N); D(N) per size: "
             + ", ".join(f"{s} {d:,.0f}{'+' if lb else ''}" for s, (d, lb) in a["D_N"].items()) + ")")
    rep.section("Fit D_T = k (D_F)^alpha (N)^beta  (eq. 1.1; ± one standard error)")
    rows = []
    for src, f in a["fits"].items():
        p = f.get("paper") or {}
        rows += [(f"{src}: k", p.get("k", ""), f"{f['k']:.3g} (x/÷ {f['k_err_factor']:.2g})"
                  if math.isfinite(f["k"]) else "n/a"),
                 (f"{src}: alpha", p.get("alpha", ""), _fmt_fit(f, "alpha")),
                 (f"{src}: beta", p.get("beta", ""), _fmt_fit(f, "beta")),
                 (f"{src}: points fitted / rms (log10)", "", f"{f['points']} / {f['rms_log10']:.3f}")]
    rep.compare(rows, headers=("", "paper (source -> Python)", "minipeft"))
    for src, f in a["fits"].items():
        if f["alpha"] > f["alpha_err"] and f["beta"] > f["beta_err"]:  # both clearly positive (NaN: False)
            rep.text(f"{src}: 10x more parameters is worth {10 ** (f['beta'] / f['alpha']):,.0f}x more fine-tuning "
                     f"data (beta/alpha = {f['beta'] / f['alpha']:.2f}; paper ≈ 2, i.e. 100x)")
        elif math.isfinite(f["alpha"]):
            rep.text(f"{src}: alpha or beta lies within one standard error of zero, so beta/alpha (the paper's "
                     "'10x N is worth 100x D_F') is not meaningful here")
    rep.section("Ossification: the largest D_F of each size (fine-tuned worse than scratch?)")
    rep.table([(o["size"], o["N"], o["D_F"], o["scratch_loss"], *[o[f"finetune_loss[{src}]"] for src in srcs],
                ", ".join(src for src, v in o["ossified"].items() if v) or "no") for o in a["ossification"]],
              headers=("size", "N", "D_F", "scratch", *[f"ft {src}" for src in srcs], "ossified"))
    rep.section("The paper's qualitative targets (methods.md §16.5)")
    rep.table([(k, "yes" if v else "NO") for k, v in data["targets"].items()], headers=("", "holds here"))


def _figures(data: dict, args) -> list:
    from .figures.transfer import transfer_dt_vs_df, transfer_loss_vs_data, transfer_multiplier

    a = data["analysis"]
    src0 = next(iter(a["fits"]), None)
    arrows = {}
    for p in a["points"]:
        if p["source"] == src0 and p["flag"] == "ok" and p["size"] not in arrows:
            arrows[p["size"]] = (p["D_F"], p["D_E"], p["loss"])
    tag = f"({data['grid_name']} grid, {data['device']})"
    figs = {"transfer_loss_vs_data": transfer_loss_vs_data(a["scratch"], a["finetune"], a["sizes"], arrows,
                                                           title=f"Python test loss: scratch vs fine-tuned {tag}"),
            "transfer_dt_vs_df": transfer_dt_vs_df(a["points"], a["fits"], a["sizes"],
                                                   title=f"Effective data transferred {tag}"),
            "transfer_multiplier": transfer_multiplier(a["points"], a["fits"], a["sizes"],
                                                       title=f"Effective data multiplier {tag}")}
    paths = [save_figure(f, args, name) for name, f in figs.items()]
    if args.figures is not None:
        (args.figures / "transfer_data.json").write_text(json.dumps(data, indent=1, default=float))
    else:
        import matplotlib.pyplot as plt

        for f in figs.values():
            plt.close(f)
    return [p for p in paths if p]


def main(argv=None) -> dict:
    args = parse_args(argv, __doc__.split("\n")[0], _add_arguments)
    x = args.extra
    if x.replot is not None:
        data = json.loads(Path(x.replot).read_text())
        rep = Report(f"Scaling laws for transfer: replot of {x.replot}")
    else:
        name = x.grid or ("quick" if args.quick else "gpu" if args.device == "cuda" else "cpu")
        grid = transfer_runs.GRIDS[name]
        if args.seed:
            grid = dataclasses.replace(grid, config=dataclasses.replace(grid.config, seed=args.seed))
        rep = Report(f"Scaling laws for transfer: English -> Python ({name} grid, {args.device})")
        t0, c0 = time.perf_counter(), time.process_time()
        results, left = transfer_runs.run_grid(grid, args.device, x.cache, None if x.budget_minutes is None
                                   else 60 * x.budget_minutes, log=rep.text, jobs=x.jobs)
        bases = []
        for s in grid.sizes:
            for src in grid.sources:
                m = transfer_runs.base_path(s, src, grid.config_for(s), x.cache) / "meta.json"
                if m.is_file():
                    bases.append(json.loads(m.read_text()))
        analysis = transfer_fits.analyze(results)
        data = {"grid_name": name, "device": args.device, "command": "python -m minipeft.lessons.transfer "
                + " ".join(sys.argv[1:] if argv is None else argv),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "platform": f"{platform.platform()}, python {platform.python_version()}, numpy {np.__version__}",
                "grid": {"sizes": list(grid.sizes), "scratch_D": list(grid.scratch_D),
                         "finetune_D": list(grid.finetune_D), "sources": list(grid.sources),
                         "config": dataclasses.asdict(grid.config),
                         "steps": {k: list(v) for k, v in grid.steps.items()}},
                "runs": len(results), "runs_left": left, "jobs": x.jobs,
                "new_run_seconds": sum(r["seconds"] for r in results if not r["cached"]),
                "wall_seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                "bases": [{k: b[k] for k in ("size", "source", "source_val_loss", "python_test_loss_zero_shot",
                                             "seconds")} for b in bases],
                "analysis": analysis}
        if left:
            rep.text(f"\n{left} runs not started (budget reached): run the same command again to continue.")
    data["targets"] = _targets(data["analysis"])  # recomputed, also on --replot
    _report(rep, data)
    for p in _figures(data, args):
        rep.text(f"figure: {p}")
    if args.figures is not None:
        rep.text(f"data behind the figures: {args.figures / 'transfer_data.json'} (redraw: --replot FILE)")
    if x.replot is None:
        rep.text(f"\n{data['runs']} runs ({sum(not r['cached'] for r in results)} new, "
                 f"{data['new_run_seconds']:.0f} s of run time in {x.jobs} process(es)), wall "
                 f"{data['wall_seconds']:.0f} s")
    f = data["analysis"]["fits"]
    src0 = next(iter(f), None)
    return finish({"grid": data["grid_name"], "device": data["device"],
                   "k": f[src0]["k"] if src0 else math.nan, "alpha": f[src0]["alpha"] if src0 else math.nan,
                   "beta": f[src0]["beta"] if src0 else math.nan, "fits": f, "sizes": data["analysis"]["sizes"],
                   "points": data["analysis"]["points"], "ossification": data["analysis"]["ossification"],
                   "targets": data["targets"], "runs": data.get("runs"), "runs_left": data.get("runs_left"),
                   "wall_seconds": data.get("wall_seconds"), "cpu_seconds": data.get("cpu_seconds")},
                  args, report=rep, lesson="transfer")


_BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _reexec_with_one_blas_thread() -> None:
    """Run again with NumPy's BLAS on one thread, unless the user chose a thread count.

    These models multiply matrices of a few thousand elements: BLAS threads only add
    synchronization. Measured on 2 shared cores, one training step of L1d8 / T0 took
    3.6 / 21 ms of wall time on one thread against 14 / 147 ms with OpenBLAS's default.
    BLAS reads the setting once, when NumPy loads, which ``python -m`` has already done,
    hence the re-execution. (On a GPU the host's BLAS does not matter either way.)
    """
    import os

    if any(v in os.environ for v in _BLAS_THREAD_VARS):
        return
    env = {**os.environ, **{v: "1" for v in _BLAS_THREAD_VARS}}
    os.execve(sys.executable, [sys.executable, "-m", "minipeft.lessons.transfer", *sys.argv[1:]], env)


if __name__ == "__main__":
    _reexec_with_one_blas_thread()
    main()
