"""Part 2 of the peft_methods lesson: Houlsby adapters against full fine-tuning as data shrinks, and LR sensitivity.

He et al. 2021 ("On the Effectiveness of Adapter-based Tuning for Pretrained Language
Model Adaptation"): adapters beat full fine-tuning in low-resource settings and are less
sensitive to the learning rate. Measured here with the rules a fair comparison needs:

* each method at its own peak learning rate (``_peft_recipes.LR``);
* early stopping (``early_stopping.EarlyStopping``) that only counts evaluations after warm-up, on
  a *stopping* half of the validation text, and the number reported is the other,
  disjoint *reported* half's loss at the step early stopping selected (``split_validation``);
* several seeds (training-set slice, batches, adapter init), reported as mean and sample
  standard deviation, and paired differences (same seed, same slice) between the methods;
* the learning-rate sweep per seed on one grid that holds the same factors around each method's own
  rate, read both ways: around each one's own rate, and at the same absolute rates for both.
"""
from __future__ import annotations

import math

import numpy as np

from ..data import lm_batches, split_validation
from ..early_stopping import EarlyStopping
from ..train import train
from ._peft_recipes import METHODS, build, fine_tune, log, scored_tokens, train_config, val_loss, warmup_steps

# ---- the experiment ------------------------------------------------------------------------------
PAIR = ("full", "houlsby")
LR_LADDER = tuple(a * 10.0 ** e for e in range(-6, 1) for a in (1, 3))  # 1e-6, 3e-6, ..., 1, 3: steps of ~3x
STOPPING_RULE = ("early stopping: evaluate every k steps on the stopping slice; only evaluations at or after the "
                 "end of warm-up count; stop after `patience` counted evaluations without a new best; restore the "
                 "best one's weights and report their loss on the reported slice, which is disjoint from the "
                 "stopping slice and never influences training or the choice of step")


def lr_grid(center: float, offsets) -> tuple:
    """Rungs of ``LR_LADDER`` at ``offsets`` from the rung nearest ``center`` (offset 0 is ``center``'s rung)."""
    i = int(np.argmin(np.abs(np.log(LR_LADDER) - math.log(center))))
    return tuple(LR_LADDER[i + k] for k in offsets if 0 <= i + k < len(LR_LADDER))


def _mean_std(xs) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value) over seeds."""
    a = np.asarray(xs, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def early_stopped_run(name: str, base, train_tok, stop_tok, report_tok, s, lr: float, every: int) -> dict:
    """One run of method ``name`` with ``EarlyStopping`` (min_step = warm-up) on ``stop_tok``.

    Returns the reported-slice loss of the checkpoint the stopping slice selected, that
    selection's stopping-slice loss and step, and the steps trained.
    """
    model = build(name, base, s["seed"])
    steps = s["data_steps"]
    es = EarlyStopping(patience=s["patience"], min_step=warmup_steps(steps), keep_best=True)
    try:
        res = train(model, lambda r: lm_batches(train_tok, s["batch"], s["block"], r),
                    config=train_config(s, lr, steps, name, eval_every=every),
                    eval_fn=lambda m: val_loss(m, stop_tok, s, s["stop_batches"]), callbacks=[es])
    except FloatingPointError:  # diverged
        return dict(reported=float("nan"), stop_best=float("nan"), stop_best_in_warmup=float("nan"), best_step=0,
                    steps=0, diverged=True)
    best_step = es.restore_best(model)
    in_warmup = [m["val_loss"] for st, m in res.eval_history if st < es.min_step]  # seen, but not counted
    return dict(reported=val_loss(model, report_tok, s), stop_best=es.best, best_step=best_step,
                stop_best_in_warmup=min(in_warmup, default=float("nan")), steps=int(res.final["steps"]),
                diverged=False)


def data_size_runs(base, train_tok, stop_tok, report_tok, s, lrs) -> dict:
    """Full fine-tuning and Houlsby adapters on shrinking training sets, ``data_seeds`` seeds each."""
    data = {m: [] for m in PAIR}
    seeds = [s["seed"] + k for k in range(s["data_seeds"])]
    for D in s["data_sizes"]:
        D = min(int(D), len(train_tok))
        # evaluate about four times per epoch (every 2 to eval_every steps): small sets overfit within an epoch
        every = int(np.clip(D // (4 * s["batch"] * s["block"]), 2, s["eval_every"]))
        for m in PAIR:
            runs = []
            for seed in seeds:  # each seed: its own D-token slice, batches and adapter init
                start = int(np.random.default_rng([seed, D]).integers(0, len(train_tok) - D + 1))
                r = early_stopped_run(m, base, train_tok[start:start + D], stop_tok, report_tok, dict(s, seed=seed),
                                      lrs[m], every)
                runs.append(r)
                log(f"[peft_methods] part 2 {m:8s} seed {seed} {D:>9,} tokens: reported {r['reported']:.4f} at "
                    f"step {r['best_step']} (stopping slice {r['stop_best']:.4f}), trained {r['steps']} steps")
            mean, std = _mean_std([r["reported"] for r in runs])
            data[m].append(dict(tokens=D, seeds=seeds, eval_every=every, reported=[r["reported"] for r in runs],
                                reported_mean=mean, reported_std=std, stop_best=[r["stop_best"] for r in runs],
                                best_step=[r["best_step"] for r in runs], steps=[r["steps"] for r in runs],
                                steps_mean=float(np.mean([r["steps"] for r in runs])),
                                diverged=sum(r["diverged"] for r in runs),
                                # runs with a lower stopping-slice loss inside warm-up (not eligible)
                                better_in_warmup=sum(r["stop_best_in_warmup"] < r["stop_best"] for r in runs)))
    by_size = []
    for f, h in zip(data["full"], data["houlsby"]):
        d = np.array(h["reported"]) - np.array(f["reported"])  # paired: same seed, slice and batches
        dm, ds = _mean_std(d)
        by_size.append(dict(tokens=f["tokens"], seeds=seeds, full_mean=f["reported_mean"], full_std=f["reported_std"],
                            houlsby_mean=h["reported_mean"], houlsby_std=h["reported_std"],
                            houlsby_minus_full=[float(x) for x in d], houlsby_minus_full_mean=dm,
                            houlsby_minus_full_std=ds, houlsby_ahead_seeds=int((d < 0).sum())))
    return {"data": data, "by_size": by_size}


def lr_sweep(base, train_tok, report_tok, s, lrs) -> dict:
    """Final reported-slice loss of both methods over one LR grid, ``lr_seeds`` seeds each.

    The grid is the union of ``lr_grid(own LR, lr_offsets)`` of the two methods, so it is
    read two ways: ``sensitivity`` over each method's own window (the same factors around
    its own LR) and ``sensitivity_same_lrs`` over the whole grid (the same absolute LRs for
    both, He et al.'s protocol).
    """
    seeds = [s["seed"] + k for k in range(s["lr_seeds"])]
    own = {m: lr_grid(lrs[m], s["lr_offsets"]) for m in PAIR}
    grid = sorted(set().union(*own.values()))
    runs = {m: {} for m in PAIR}
    for m in PAIR:
        for lr in grid:
            runs[m][lr] = []
            for seed in seeds:
                r = fine_tune(build(m, base, seed), train_tok, report_tok, dict(s, seed=seed), lr, s["lr_steps"],
                              name=f"{m} lr {lr:.0e}")
                runs[m][lr].append(r["val_loss"])
                log(f"[peft_methods] part 2 {m:8s} seed {seed} lr {lr:.0e}: final {r['val_loss']:.4f}"
                    + (" (diverged)" if r["diverged"] else ""))
    sens = {m: lr_sensitivity_over_seeds({lr: runs[m][lr] for lr in own[m]}, lrs[m]) for m in PAIR}
    same = {m: lr_sensitivity_over_seeds(runs[m], lrs[m]) for m in PAIR}
    mean = {m: {lr: float(np.mean(v)) for lr, v in runs[m].items()} for m in PAIR}
    std = {m: {lr: _mean_std(v)[1] for lr, v in runs[m].items()} for m in PAIR}
    return {"lr": mean, "lr_std": std, "lr_runs": runs, "lr_seeds": seeds, "lr_grid": [float(x) for x in grid],
            "sensitivity": sens, "sensitivity_same_lrs": same}


def lr_sensitivity(losses: dict) -> dict:
    """Spread of the final loss over the LR grid, and how many LRs land within 0.05 nats of the best."""
    v = np.array([x if math.isfinite(x) else np.inf for x in losses.values()])
    best = float(v.min())
    finite = v[np.isfinite(v)]
    spread = float(finite.max() - best) if finite.size else float("nan")  # every LR diverged: no spread
    return dict(best=best, best_lr=float(list(losses)[int(v.argmin())]), spread=spread,
                near_best=int((v <= best + 0.05).sum()), diverged=int((~np.isfinite(v)).sum()))


def lr_sensitivity_over_seeds(runs: dict, recipe_lr: float) -> dict:
    """``lr_sensitivity`` of each seed's curve ``{lr: [loss per seed]}``, as mean and std over the seeds."""
    n = len(next(iter(runs.values())))
    per_seed = [lr_sensitivity({lr: v[k] for lr, v in runs.items()}) for k in range(n)]
    spread_mean, spread_std = _mean_std([p["spread"] for p in per_seed])
    mean_curve = lr_sensitivity({lr: float(np.mean(v)) for lr, v in runs.items()})
    return dict(spread_mean=spread_mean, spread_std=spread_std, spread_runs=[p["spread"] for p in per_seed],
                near_best_mean=float(np.mean([p["near_best"] for p in per_seed])),
                diverged_mean=float(np.mean([p["diverged"] for p in per_seed])), grid=[float(x) for x in runs],
                best_lr=mean_curve["best_lr"], recipe_lr=float(recipe_lr))


def _less_sensitive(sensitivity: dict) -> bool:
    sf, sa = sensitivity["full"], sensitivity["houlsby"]
    return bool(sa["spread_mean"] < sf["spread_mean"] and sa["diverged_mean"] <= sf["diverged_mean"])


def adapter_verdicts(by_size: list, sensitivity: dict, sensitivity_same_lrs: dict | None = None) -> dict:
    """The claims of part 2 decided from the numbers (rules in the report)."""
    d = [r["houlsby_minus_full_mean"] for r in by_size]
    small = d[:-1] or d
    out = {"ahead_at": [r["tokens"] for r in by_size if r["houlsby_minus_full_mean"] < 0],
           "gap_shrinks": bool(len(d) > 1 and d[-1] == max(d) and min(small) < d[-1]),
           "less_lr_sensitive": _less_sensitive(sensitivity)}
    if sensitivity_same_lrs is not None:
        out["less_lr_sensitive_same_lrs"] = _less_sensitive(sensitivity_same_lrs)
    return out


def data_and_lr(base, train_tok, val_tok, s, lrs) -> dict:
    """Part 2: ``data_size_runs`` (early stopping on one validation half, reported on the other) and ``lr_sweep``."""
    stop_tok, report_tok = split_validation(val_tok)
    out = data_size_runs(base, train_tok, stop_tok, report_tok, s, lrs)
    out.update(lr_sweep(base, train_tok, report_tok, s, lrs))
    out.update(base_reported=val_loss(base, report_tok, s), rule=STOPPING_RULE,
               warmup_steps=warmup_steps(s["data_steps"]), patience=s["patience"],
               data_steps=s["data_steps"], stop_tokens=scored_tokens(stop_tok, s, s["stop_batches"]),
               report_tokens=scored_tokens(report_tok, s, s["val_batches"]),
               recipe={m: dict(lr=lrs[m], label=METHODS[m][0]) for m in PAIR})
    out["verdicts"] = adapter_verdicts(out["by_size"], out["sensitivity"], out["sensitivity_same_lrs"])
    return out


def _pm(mean, std, sign: str = "") -> str:
    return f"{mean:{sign}.4f} +- {std:.4f}"


def report_adapters(rep, r2, s) -> None:
    full, ad = r2["data"]["full"], r2["data"]["houlsby"]
    n_seeds = len(r2["by_size"][0]["seeds"])
    rep.section(f"2. Houlsby adapters vs full fine-tuning as the training set shrinks (early stopping, <= "
                f"{s['data_steps']} steps, {n_seeds} seeds)")
    rep.text(f"recipe: AdamW (no weight decay), cosine to 0 after {r2['warmup_steps']} warm-up steps, clip 1, "
             f"{s['batch']} x {s['block']} tokens a step; each method its own peak LR (part 1's sweep): "
             + ", ".join(f"{v['label']} {v['lr']:.0e}" for v in r2["recipe"].values()) + ".")
    rep.text(f"rule: {r2['rule']}.\n  here: patience {r2['patience']}, warm-up {r2['warmup_steps']} steps; stopping "
             f"slice {r2['stop_tokens']:,} tokens (first half of the validation text), reported slice "
             f"{r2['report_tokens']:,} tokens (second half).")
    rows = []
    for a, b, d in zip(full, ad, r2["by_size"]):
        rows.append((f"{a['tokens']:,}", a["eval_every"], _pm(a["reported_mean"], a["reported_std"]),
                     _steps(a), _pm(b["reported_mean"], b["reported_std"]), _steps(b),
                     _pm(d["houlsby_minus_full_mean"], d["houlsby_minus_full_std"], "+"),
                     f"{d['houlsby_ahead_seeds']}/{n_seeds}"))
    rep.table(rows, ("train tokens", "eval every", "full: reported", "best/stop step", "Houlsby: reported",
                     "best/stop step", "Houlsby - full", "Houlsby ahead"))
    rep.text(f"base model: {r2['base_reported']:.4f} on the reported slice. reported: its loss at the step "
             "the stopping slice selected, mean +- std (n-1) over seeds;\n'best/stop step': mean selected step / mean "
             "step training stopped at. Each seed trains on its own random slice of the training set, with its own "
             "batches\nand adapter init; 'Houlsby - full' pairs the two methods' runs of one seed. Above "
             f"{s['data_steps'] * s['batch'] * s['block']:,} tokens the {s['data_steps']}-step budget, not the data, "
             "limits training (less than one epoch).")
    early = [f"{p['tokens']:,} ({METHODS[m][0]}: {p['better_in_warmup']}/{n_seeds})" for m in PAIR
             for p in r2["data"][m] if p["better_in_warmup"]]
    if early:
        rep.text("runs whose stopping-slice loss was lower at an evaluation inside warm-up (which the rule does not "
                 "let it select): " + ", ".join(early) + ";\n  they overfit the small set before the learning rate "
                 "peaked, so their reported loss is that of the first eligible checkpoint, not the best seen.")
    worse = [f"{METHODS[m][0]} at {p['tokens']:,} ({p['reported_mean']:.3f})" for m in PAIR for p in r2["data"][m]
             if p["reported_mean"] > r2["base_reported"]]
    if worse:
        rep.text(f"worse than the base model ({r2['base_reported']:.3f}) on the reported slice: " + ", ".join(worse)
                 + ";\n  on so little data even the first checkpoint the rule allows (the end of warm-up) has "
                 "already overfit: the rule pays this for never stopping before the learning rate peaks.")
    diff = [(d["tokens"], d["houlsby_minus_full_mean"], d["houlsby_ahead_seeds"]) for d in r2["by_size"]]
    ahead = [f"{t:,} ({m:+.3f}, {k}/{n_seeds} seeds)" for t, m, k in diff if m < 0]
    behind = [f"{t:,} ({m:+.3f})" for t, m, _ in diff if not m < 0]

    sf, sa = r2["sensitivity"]["full"], r2["sensitivity"]["houlsby"]
    rep.section(f"   learning-rate sweep ({s['lr_steps']} steps, full training set, {len(r2['lr_seeds'])} seeds): "
                "final loss, reported slice")
    rep.text("both methods on one grid of 1-3 ladder rungs: each method's own window is the 100x range centred on "
             "its recipe LR (*); the grid is the union of the two windows.")
    rep.table([(f"{lr:.0e}",) + tuple(_pm(r2["lr"][m][lr], r2["lr_std"][m][lr])
                                      + (" *" if lr in r2["sensitivity"][m]["grid"] else "  ") for m in PAIR)
               for lr in r2["lr_grid"]], ("LR",) + tuple(METHODS[m][0] for m in PAIR))
    views = (("own window (*)", r2["sensitivity"]), ("same LRs (all)", r2["sensitivity_same_lrs"]))
    rep.table([(view, METHODS[m][0], _pm(sv[m]["spread_mean"], sv[m]["spread_std"]), f"{sv[m]['near_best_mean']:.1f}",
                f"{sv[m]['diverged_mean']:.1f} of {len(sv[m]['grid'])}", f"{sv[m]['best_lr']:.0e}",
                f"{sv[m]['recipe_lr']:.0e}") for view, sv in views for m in PAIR],
              ("grid", "method", "spread (max - min)", "LRs within 0.05", "diverged", "best LR (mean curve)",
               "recipe LR"))
    rep.text("spread: per seed, the worst finite loss over the grid minus the best; mean +- std over seeds. "
             "A diverged run counts in 'diverged', not in the spread.")
    ss = r2["sensitivity_same_lrs"]
    small = [m for _, m, _ in diff[:-1]] or [diff[0][1]]
    largest = diff[-1][1]
    shrinks, less_sensitive = r2["verdicts"]["gap_shrinks"], r2["verdicts"]["less_lr_sensitive"]
    rep.compare([
        ("adapters beat full FT with less data", "yes (He et al. 2021)",
         ("yes at " + ", ".join(ahead) + ("; not at " + ", ".join(behind) if behind else "")) if ahead else
         f"no: behind at every size, by {min(m for _, m, _ in diff):+.3f} at least"),
        ("adapters' gap to full FT shrinks with less data", "yes",
         f"{'yes' if shrinks else 'no'}: Houlsby - full {largest:+.3f} at {diff[-1][0]:,} tokens, "
         f"{min(small):+.3f} at best below"),
        ("adapters less sensitive to the LR", "yes (He et al. 2021)",
         f"{'yes' if less_sensitive else 'no'} around each one's own LR: spread {sa['spread_mean']:.3f} +- "
         f"{sa['spread_std']:.3f} vs {sf['spread_mean']:.3f} +- {sf['spread_std']:.3f} nats; diverged "
         f"{sa['diverged_mean']:.1f} vs {sf['diverged_mean']:.1f} of {len(sa['grid'])} LRs"),
        ("  on the same LRs for both (He et al.'s protocol)", "yes",
         f"{'yes' if r2['verdicts']['less_lr_sensitive_same_lrs'] else 'no'}: spread "
         f"{ss['houlsby']['spread_mean']:.3f} +- {ss['houlsby']['spread_std']:.3f} vs {ss['full']['spread_mean']:.3f} "
         f"+- {ss['full']['spread_std']:.3f} nats; diverged {ss['houlsby']['diverged_mean']:.1f} vs "
         f"{ss['full']['diverged_mean']:.1f} of {len(ss['full']['grid'])} LRs"),
    ])
    rep.text("verdict rules: 'beat' where the mean paired difference is < 0; 'shrinks' when the largest training set "
             "has the largest (least negative) difference and some smaller set a smaller one; 'less sensitive' when "
             "Houlsby's mean spread is smaller and it diverges at no more LRs (on each grid).")


def _steps(r) -> str:
    return f"{np.mean(r['best_step']):.0f}/{r['steps_mean']:.0f}"
