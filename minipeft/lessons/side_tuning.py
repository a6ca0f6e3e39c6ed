"""Lesson: side tuning — QST against QLoRA at matched accuracy, and where the activations go.

``python -m minipeft.lessons.side_tuning [--quick] [--device cuda] [--size NAME] [--figures DIR]``

LoRA and QLoRA shrink the trainable parameters, their gradients and the optimizer state,
but they still back-propagate through the whole base model, so they keep nearly all of
its activations ("adapter networks ... require saving intermediate activations for back
propagation", says the course). Side tuning (methods.md §12) trains a separate narrow
network beside the frozen backbone: information flows from base to side and never back,
so the backbone runs under ``no_grad`` and keeps nothing for backward. QST (Zhang et al.
2024, arXiv 2401.07159) adds an NF4 backbone, adapter downsamples and an output mix that
starts at the base model.

The QST paper compares the two at about the same accuracy (Table 2: MMLU 36.9 vs 36.8 on
average, at 1.81x less memory). This lesson does the same on one base and one data set
(minipeft's English base adapted to Python code, as in the QLoRA lesson):

1. prints the course's QST-vs-QLoRA table, with the memory ratios computed from it;
2. tunes both fairly (``minipeft.lessons.side_tuning_sweep``): QLoRA as the QLoRA paper ran
   it (NF4 + double quantization, LoRA on every linear layer of the blocks) over a grid of
   learning rates; QST over a grid of side-network reduction factors r (width d/r) x
   learning rates. Each learning rate is chosen on one half of the validation text (the
   *stopping slice*) and the loss is reported on the other half (the *reported slice*);
3. reports the memory of one training step of each chosen setting, measured (engine ledger
   + arrays the graph holds + weights, gradients, optimizer state) beside the memory
   calculator's prediction, and QST *at matched accuracy*: the least-memory QST whose
   reported loss is within ``MATCH_TOL`` nats/token of QLoRA's (or, when none is, the best
   QST and its gap), with the verdict computed by the rule ``matched_accuracy`` states;
4. measures one step's activations for full fine-tuning, LoRA, QLoRA, LST and QST as the
   batch and the sequence grow, and QST against LST and the calculator.

Activations below are saved (ledger) + held (backbone states and other non-parameter
inputs kept by the graph), for every method alike.
"""
from __future__ import annotations

import argparse
import math

import numpy as np

from .. import pretrained
from ..backend import to_device
from ..data import Corpus, lm_batches
from ..memory import MethodConfig, StepSetup, activation_bytes, estimate_memory
from ._common import Report, finish, parse_args, save_figure
from .side_tuning_sweep import (LINEARS, LST_R, MATCH_TOL, METHODS, QLORA_ALPHA, QLORA_DROPOUT, QLORA_R, QST_R,
                                build, matched_accuracy, measure, predict, run_sweep, slice_loss,
                                split_validation)

MB = 1e6

# QST paper Table 2 as the course's slide gives it: MMLU 5-shot accuracy / memory (GB), Alpaca, batch 4, seq 384
COURSE_TABLE = {
    "OPT-1.3B": (25.0, 6.3, 24.3, 3.2), "OPT-2.7B": (25.2, 10.1, 25.5, 4.8), "OPT-6.7B": (25.6, 15.5, 26.2, 7.2),
    "OPT-13B": (26.5, 25.4, 26.8, 12.6), "OPT-30B": (27.7, 46.8, 27.3, 25.7), "OPT-66B": (36.4, 87.5, 36.0, 52.3),
    "LLaMA-2-7B": (45.9, 15.6, 45.1, 7.3), "LLaMA-2-13B": (54.7, 25.4, 56.8, 12.6),
    "LLaMA-2-70B": (64.1, 95.5, 63.9, 56.0), "Avg.": (36.8, 36.5, 36.9, 20.2),
}  # (QLoRA accuracy, QLoRA GB, QST accuracy, QST GB)


def _settings(args) -> dict:
    """Budgets and grids (learning rates spaced ~3x, reduction factors 2x); quick mode shrinks every grid."""
    if args.device == "cuda":
        s = dict(size=args.extra.size or "small", steps=80 if args.quick else 400, batch=16, block=256,
                 val_windows=256, corpus_bytes=20_000_000, compute_dtype="float16",
                 batches=(1, 4, 16, 64), seqs=(32, 64, 128, 256), seq_batch=16)
    else:
        s = dict(size=args.extra.size or "tiny", steps=20 if args.quick else 150, batch=4 if args.quick else 8,
                 block=32 if args.quick else 64, val_windows=32 if args.quick else 128,
                 corpus_bytes=1_000_000 if args.quick else 4_000_000, compute_dtype="float32",
                 batches=(1, 4, 16) if args.quick else (1, 2, 4, 8, 16, 32),
                 seqs=(8, 16, 32) if args.quick else (16, 32, 64, 128), seq_batch=4 if args.quick else 8)
    if args.quick:
        s.update(qlora_lrs=(3e-3, 3e-2), qst_lrs=(3e-3, 3e-2), qst_rs=(16, 4))
    else:  # QST's grid reaches one step higher: a side network trained from scratch took the top of a shared grid
        s.update(qlora_lrs=(1e-3, 3e-3, 1e-2, 3e-2) if args.device == "cuda" else (3e-3, 1e-2, 3e-2),
                 qst_lrs=(3e-3, 1e-2, 3e-2, 1e-1), qst_rs=(16, 8, 4, 2))
    if args.extra.steps is not None:
        s["steps"] = args.extra.steps
    return s


def main(argv=None) -> dict:
    args = parse_args(argv, __doc__.split("\n")[0], _add_arguments)
    s = _settings(args)
    rep = Report("Side tuning: QST against QLoRA at matched accuracy, and where the activations go"
                 + (" (quick mode)" if args.quick else ""))

    # 1. the course's table ---------------------------------------------------------------
    rep.section("1. The course's table (QST paper, Table 2): MMLU 5-shot accuracy / training memory")
    rows = [(k, f"{a:.1f} / {m:.1f} GB", f"{b:.1f} / {n:.1f} GB", f"{m / n:.2f}x", f"{b - a:+.1f}")
            for k, (a, m, b, n) in COURSE_TABLE.items()]
    rep.table(rows, ("model", "QLoRA", "QST", "memory QLoRA/QST", "QST - QLoRA acc."))
    qa, qm, sa, sm = COURSE_TABLE["Avg."]
    rep.text(f"On average QST needs {qm / sm:.2f}x less memory than QLoRA for {sa - qa:+.1f} MMLU points.")

    # 2. the recipes and the sweep ----------------------------------------------------------
    base, meta = pretrained.load(s["size"], "english", device=args.device, quick=args.quick, return_meta=True)
    cfg = base.config
    T = min(s["block"], cfg.block_size)  # never past the positions the base was pretrained on
    seqs = tuple(t for t in s["seqs"] if t <= cfg.block_size)
    data = Corpus.load("python", max_bytes=s["corpus_bytes"], val_max_bytes=200_000)
    train_tok = to_device(data.train, args.device)
    select_tok, report_tok = (to_device(v, args.device) for v in split_validation(data.val))
    h = len(select_tok)

    def val_loss(m, tokens) -> float:
        return slice_loss(m, tokens, T, s["val_windows"])

    base_val = val_loss(base, report_tok)
    d = cfg.n_embd
    rep.section(f"2. The recipes, tuned on the '{s['size']}' English base adapted to Python code")
    rep.text(f"base: {base.num_parameters():,} parameters (d = {d}, L = {cfg.n_layer}, {cfg.block_size} positions), "
             f"pretrained to {meta['val_loss']:.3f} nats/token on English; on Python code it starts at "
             f"{base_val:.3f} (reported slice).")
    rep.text(f"QLoRA (Dettmers et al. 2023): NF4 base with double quantization (block 64), LoRA r = {QLORA_R}, "
             f"alpha = {QLORA_ALPHA}, dropout {QLORA_DROPOUT} on every linear layer of the blocks "
             f"({', '.join(LINEARS)}); the paper: r = 64, alpha = 16 on 7B-65B models, d >= 4096 (r = 64 would "
             f"be full rank at d = {d}), dropout 0.1 for 7B/13B; learning rate swept (paper: 2e-4 constant).")
    rep.text(f"QST (Zhang et al. 2024): NF4 backbone, side network of width d/r fed by adapter downsamples (rank 16) "
             f"from every layer, gates sigmoid(0) = 0.5, output mix alpha = 1 (step 0 is the NF4 base); the paper's "
             f"r = {QST_R} was chosen for d >= 2048, so r is swept here with the learning rate.")
    rep.text(f"Both: AdamW (no weight decay), cosine schedule with 5% warm-up, gradient clipping at 1.0, "
             f"{s['steps']} steps of {s['batch']} x {T} tokens, the same batches and seed; the NF4 layers compute "
             f"in {s['compute_dtype']}.")
    rep.text(f"Grids: QLoRA lr {list(s['qlora_lrs'])}; QST r {list(s['qst_rs'])} (width "
             f"{[d // r for r in s['qst_rs']]}) x lr {list(s['qst_lrs'])}. A choice at a grid's edge is flagged.")
    rep.text(f"Validation text split in two: tokens [0, {h:,}) choose each learning rate (the stopping slice), "
             f"tokens [{h:,}, {len(data.val):,}) give the reported loss; each loss is the mean over "
             f"{s['val_windows']} windows of {T} tokens spread evenly over its slice.\n")
    sweep = run_sweep(base, s, T, train_tok, lambda m: val_loss(m, select_tok), lambda m: val_loss(m, report_tok),
                      seed=args.seed, log=rep.text)

    # 3. the sweep table and the matched-accuracy comparison --------------------------------
    rep.section("3. The sweep: loss on the stopping slice chooses each learning rate")
    rep.table([(r["setting"], r["side_width"] or "-", r["trainable"], f"{r['lr']:g}", r["val_select"],
                "<- chosen" + (" (grid edge)" if r["at_grid_edge"] else "") if r["chosen"] else "",
                r["val_report"] if r["chosen"] else "", f"{1000 * r['sec_per_step']:.0f}") for r in sweep["rows"]],
              ("setting", "side width", "trainable", "lr", "loss (stopping)", "", "loss (reported)", "ms/step"))
    rng = np.random.default_rng(args.seed)
    probe = lm_batches(train_tok, s["batch"], T, rng)  # the training batch, the same for every setting
    chosen = sweep["chosen"]
    for key, c in chosen.items():
        method, r = key
        c["memory"] = measure(build(method, base, s["compute_dtype"], args.seed, r), probe)
        c["predicted"] = predict(cfg, method, r, s["batch"], T)
    match = matched_accuracy(chosen, MATCH_TOL)
    rep.section(f"4. QST against QLoRA at matched accuracy: one training step ({s['batch']} x {T} tokens)")
    q = chosen[("qlora", None)]
    gpu = ("GPU peak MB",) if args.device == "cuda" else ()  # the CuPy pool's peak during the step
    mrows = []
    for c in chosen.values():
        mem, pred = c["memory"], c["predicted"]
        mrows.append((c["setting"], f"{c['lr']:g}", c["val_report"], f"{c['val_report'] - q['val_report']:+.3f}",
                      mem["weights"] / MB, mem["activations"] / MB, mem["total"] / MB, pred["total"] / MB,
                      f"{mem['total'] / pred['total']:.2f}") + tuple(mem["device_peak"] / MB for _ in gpu))
    rep.table(mrows, ("setting", "lr", "loss (reported)", "vs QLoRA", "weights MB", "activations MB",
                      "total MB", "predicted MB", "measured/pred") + gpu)
    rep.text("measured: weights (NF4 codes + constants + side/LoRA parameters) + gradients + AdamW state + activations "
             "saved (ledger) and held (backbone states); predicted: minipeft.memory.estimate_memory (for QST it "
             "models linear downsamples, not QST's adapters, and no output mix).")
    rep.text(f"Rule: {match['rule']}")
    rep.text(f"Verdict ({match['verdict']}): {match['sentence']}")
    gaps = ", ".join(f"r={r} {chosen[('qst', r)]['val_report'] - q['val_report']:+.3f}" for r in s["qst_rs"])
    match["note"] = (f"QST's gap to QLoRA by reduction factor: {gaps}. Here the side network is "
                     f"{d // max(s['qst_rs'])}-{d // min(s['qst_rs'])} channels wide (d = {d}) and trains from scratch "
                     f"for {s['steps']} steps, while QLoRA adapts every layer of the pretrained model; the paper's "
                     f"models have d >= 2048, a side network >= {2048 // QST_R} wide at r = {QST_R}.")
    if match["verdict"] != "reproduced":
        rep.text(f"Note: {match['note']}")

    # 5. memory as batch and sequence grow --------------------------------------------------
    models = {m: build(m, base, s["compute_dtype"], args.seed) for m in METHODS}  # untrained: memory only
    Bs = s["batches"]
    batch_sweep = {m: [] for m in METHODS}
    for B in Bs:
        p = lm_batches(train_tok, B, T, rng)  # the same batch for every method
        for m in METHODS:
            batch_sweep[m].append(measure(models[m], p))
    seq_sweep = {m: [] for m in METHODS}
    for t in seqs:
        p = lm_batches(train_tok, s["seq_batch"], t, rng)
        for m in METHODS:
            seq_sweep[m].append(measure(models[m], p))
    top = {m: batch_sweep[m][-1] for m in METHODS}  # at the largest batch
    rep.section(f"5. Activations (saved + held, MB) of every method, QST at the paper's r = {QST_R}")
    rep.text(f"by batch size, {T} tokens per sequence:")
    rep.table([(m, *[p["activations"] / MB for p in batch_sweep[m]]) for m in METHODS],
              ("method", *[f"B={B}" for B in Bs]))
    rep.text(f"by sequence length, batch {s['seq_batch']}:")
    rep.table([(m, *[p["activations"] / MB for p in seq_sweep[m]]) for m in METHODS],
              ("method", *[f"T={t}" for t in seqs]))
    rep.text("(lora and qlora hold the same activations: quantizing the frozen base removes weight bytes, not "
             "activations.)")
    below = [B for B, a, b in zip(Bs, batch_sweep["qst"], batch_sweep["qlora"]) if a["total"] < b["total"]]
    from_b = next((B for i, B in enumerate(Bs) if all(b in below for b in Bs[i:])), None)
    act_ratio = top["qlora"]["activations"] / top["qst"]["activations"]
    tot_ratio = top["qlora"]["total"] / top["qst"]["total"]
    rep.table([("total memory QLoRA / QST", f"{qm / sm:.2f}x (avg., batch 4 x 384)",
                f"{tot_ratio:.2f}x (batch {Bs[-1]} x {T}, r = {QST_R})"),
               ("activations QLoRA / QST", "-", f"{act_ratio:.2f}x")], ("", "course", "minipeft"))
    rep.text((f"QST (r = {QST_R}) < QLoRA in total memory at every batch size from {from_b} up." if from_b is not None
              else f"QST (r = {QST_R}) is not below QLoRA at the largest batches here.")
             + f" Backbone parameters with a gradient after QST's step: {top['qst']['backbone_grads']}.")

    # 6. QST against LST and the calculator ------------------------------------------------
    rep.section("6. QST against LST, and LST against the memory calculator")
    lst, qst = top["lst"], top["qst"]
    rep.text(f"QST (r = {QST_R}, NF4, adapter downsamples, output mix) against LST (r = {LST_R}, float32 backbone, "
             f"linear downsamples) at batch {Bs[-1]}: the NF4 backbone saves "
             f"{(lst['weights'] - qst['weights']) / MB:.2f} MB of weights; activations differ by "
             f"{(qst['activations'] - lst['activations']) / MB:+.2f} MB (the narrower side network against the "
             f"adapters and the mix); in total QST {qst['total'] / MB:.2f} MB vs LST {lst['total'] / MB:.2f} MB. "
             f"Weights are {lst['weights'] / max(lst['total'], 1):.0%} of LST's total "
             "here; the NF4 saving grows with the model (weights grow as d^2, activations per token as d).")
    mc = MethodConfig(method="side", reduction_factor=LST_R)
    pred = estimate_memory(cfg, mc, StepSetup(batch_size=Bs[-1], seq_len=T, ledger_view=True))
    pred_all = estimate_memory(cfg, mc, StepSetup(batch_size=Bs[-1], seq_len=T))
    rep.text(f"LST: ledger {lst['saved']:,} B measured vs {pred.activations:,} B predicted; backbone states held "
             f"{lst['held']:,} B vs {pred_all.activations - pred.activations:,} B predicted.")
    terms = activation_bytes(Bs[-1], T, cfg.n_layer, d, cfg.n_head, cfg.d_ff, cfg.vocab_size, 4,
                             side_width=d // LST_R, side_inner=cfg.d_ff // LST_R, ledger_view=True)
    share = {k: sum(v for t, v in terms.items() if key in t) / MB
             for k, key in (("probs", "attn: probs"), ("ce", "cross_entropy"), ("ln_f", "ln_f"))}
    rep.text(f"Why the side network's activations do not shrink by r: of LST's {pred.activations / MB:.1f} MB saved, "
             f"{share['probs']:.1f} MB are its attention probabilities (heads x T per position, whatever the width), "
             f"{share['ce']:.1f} MB the loss's softmax over {cfg.vocab_size} tokens and {share['ln_f']:.1f} MB ln_f "
             "at the full width d; and the backbone states it holds are d wide.")

    from .figures.side_tuning import side_tuning_memory

    qbest = chosen[("qst", match["matched_r"] if match["matched_r"] is not None else match["best_r"])]
    curves = {"qlora": q["curve"], "qst": qbest["curve"]}
    fig = side_tuning_memory({m: (list(Bs), [p["activations"] for p in batch_sweep[m]]) for m in METHODS},
                             {m: (list(seqs), [p["activations"] for p in seq_sweep[m]]) for m in METHODS},
                             {m: top[m] for m in METHODS}, curves, sweep["start_select"], seq_len=T,
                             seq_batch=s["seq_batch"],
                             title=f"Side tuning vs (Q)LoRA on the '{s['size']}' base: memory and loss "
                                   f"(curves: chosen QLoRA and {qbest['setting']}, stopping slice)")
    path = save_figure(fig, args, "side_tuning_memory")
    if path:
        rep.text(f"figure: {path}")
    rep.done()

    def entry(c: dict) -> dict:
        return {"setting": c["setting"], "reduction_factor": c["r"], "side_width": c["side_width"], "lr": c["lr"],
                "trainable": c["trainable"], "val_select": c["val_select"], "val_report": c["val_report"],
                "memory": {k: float(v) for k, v in c["memory"].items()}, "predicted": c["predicted"]}

    qst_by_width = {str(r): entry(chosen[("qst", r)]) for r in s["qst_rs"]}
    return finish({
        "device": args.device, "size": s["size"], "steps": s["steps"], "batch": [s["batch"], T],
        "base_val_loss": base_val,
        "validation": {"select_tokens": [0, h], "report_tokens": [h, len(data.val)], "windows": s["val_windows"],
                       "block": T},
        "qlora": {**entry(q), "r": QLORA_R, "lora_alpha": QLORA_ALPHA, "lora_dropout": QLORA_DROPOUT,
                  "target_modules": list(LINEARS)},
        "qst": {"by_reduction_factor": qst_by_width, "best": qst_by_width[str(match["best_r"])],
                "matched": qst_by_width[str(match["matched_r"])] if match["matched_r"] is not None else None},
        "matched_accuracy": match,
        "sweep": {"qlora_lrs": list(s["qlora_lrs"]), "qst_lrs": list(s["qst_lrs"]),
                  "qst_reduction_factors": list(s["qst_rs"]), "start_select": sweep["start_select"],
                  "rows": [{k: v for k, v in r.items() if k != "curve"} for r in sweep["rows"]]},
        "batch_sweep": {"seq_len": T, "batch_sizes": list(Bs),
                        "activations": {m: [p["activations"] for p in batch_sweep[m]] for m in METHODS},
                        "total": {m: [p["total"] for p in batch_sweep[m]] for m in METHODS}},
        "seq_sweep": {"batch_size": s["seq_batch"], "seq_lens": list(seqs),
                      "activations": {m: [p["activations"] for p in seq_sweep[m]] for m in METHODS}},
        "qst_vs_qlora": {"batch": Bs[-1], "reduction_factor": QST_R, "activation_ratio": act_ratio,
                         "total_ratio": tot_ratio, "qst_below_qlora_from_batch": from_b,
                         "qst_backbone_grads": top["qst"]["backbone_grads"]},
        "lst_calculator": {"measured_saved": lst["saved"], "predicted_saved": pred.activations,
                           "measured_held": lst["held"], "predicted_held": pred_all.activations - pred.activations},
        "course": {"table": {k: list(v) for k, v in COURSE_TABLE.items()}, "avg_memory_ratio": qm / sm,
                   "avg_accuracy_gap": sa - qa},
        "all_finite": all(math.isfinite(r["val_select"]) for r in sweep["rows"])
        and all(math.isfinite(c["val_report"]) for c in chosen.values()),
    }, args)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _add_arguments(p):
    p.add_argument("--size", default=None, choices=sorted(pretrained.SIZES),
                   help="base model size (default: tiny on the CPU, small on a GPU)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="training steps of every run of the sweep (default: 150 on the CPU, 400 on a GPU, 20/80 quick)")


if __name__ == "__main__":
    main()
