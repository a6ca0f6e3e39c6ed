"""Lesson: QLoRA — fine-tuning a 4-bit base with LoRA, what it learns, what it forgets, and where the memory goes.

``python -m minipeft.lessons.qlora [--quick] [--device cuda] [--figures DIR]``

QLoRA (Dettmers et al. 2023, arXiv 2305.14314) freezes the base model in 4-bit NormalFloat
(NF4) with double quantization, trains LoRA adapters on every linear layer in 16-bit, and
pages optimizer state to the host when memory spikes. This lesson adapts minipeft's English
base model to Python code (the local standard library) with full fine-tuning, LoRA and QLoRA:

1. the memory arithmetic of the course, each number computed from its inputs beside the
   course's, with the relation that must hold and its verdict (``minipeft.memory_course.course_figures``);
2. **each method at its own learning rate**: every method is trained at each rate of its
   grid (``GRIDS``; the LoRA family wants larger rates than full fine-tuning) and keeps the
   rate whose loss on the *stopping* slice of the Python validation text is lowest; only
   that run is scored on the *reported* slice, which nothing was chosen on
   (``side_tuning_sweep.split_validation``, ``slice_loss``). A choice at a grid edge is flagged;
3. what each method learned (Python loss) and what it **forgot** (the rise of its loss on
   the English validation text its base was pretrained on), and the course's claims
   judged from those numbers by the claims table's rules (``minipeft.claims.methods``):
   QLoRA matches LoRA, LoRA (and QLoRA) match full fine-tuning, PEFT forgets less. A **rank
   check** trains LoRA once more at 8x its rank (64, QLoRA's, or half the base's width if less:
   32 on 'tiny'; alpha/r kept, LoRA's chosen
   rate): where LoRA trails full fine-tuning, it says whether more rank closes the gap, the
   reason on a small base (its update is not of low rank; Aghajanyan et al. 2020);
4. one real training step's memory by category, measured beside the calculator's prediction,
   and a QLoRA step with gradient checkpointing (``gradient_checkpointing_enable``): its
   activations, predicted and measured, beside the plain step's and the LoRA parameters';
5. optimizer state under AdamW, 8-bit AdamW and paged AdamW;
6. merging a QLoRA adapter into the dequantized NF4 weights (the model that was trained), into
   the original full-precision base (not the model that was trained), or into the NF4 layers
   themselves, re-quantized as peft's bnb merge does, with the rounding that costs.

Recipe: LoRA r = 8, alpha = 16 on every linear layer of every block (QLoRA's targets), no
LoRA dropout (the default of the QLoRA code, qlora.py; its 7B/13B scripts use 0.1), AdamW
without weight decay, cosine schedule with 5% warm-up, gradient clipping 1.0, one seed. The
grids bracket each method's best rate on the CPU default (measured: full fine-tuning best at
3e-3 of {3e-4, 1e-3, 3e-3, 1e-2}, LoRA and QLoRA at 1e-2 of {3e-3, 1e-2, 3e-2}); on another
base a choice can land at an edge, and the report flags it (``--grid`` changes a grid).
Budgets: the CPU default ('tiny' base, 2 blocks, d 64) trains 10 runs of ``STEPS_CPU``
steps (3 rates x 3 methods and the rank check; reduced from 400 steps to stay within a few minutes on 2 cores);
``--device cuda`` trains the 'small' base (4 blocks, d 128) for 600 steps per run; ``--quick``
trains 2 rates per method for 30 steps (seconds; numbers not meaningful). On the CPU compute
is float32 (the recorded CPU numbers; bfloat16 there would be a rounding emulation, slower and
no more instructive); on a GPU QLoRA's 4-bit layers compute in bfloat16, as in the paper (real
bfloat16 cuBLAS GEMMs, ``minipeft.amp``). They save nothing for backward in any dtype and the
LoRA branches stay float32, so the measured activations are the calculator's float32 ones.
"""
from __future__ import annotations

import copy
import json
import math

import numpy as np

from .. import pretrained
from ..backend import to_device
from ..claims import CLAIMS, lesson_claims
from ..data import Corpus, lm_batches
from ..memory import MethodConfig, StepSetup, estimate_memory
from ..memory_course import course_figures
from ..memory_measure import compare, measure_training_step
from ..optim import AdamW
from ..peft import LoraConfig, get_peft_model, get_qlora_model
from ..train import TrainConfig, train
from ._common import Report, finish, parse_args, save_figure
from .qlora_studies import checkpointed_step, merge_study, optimizer_states
from .side_tuning_sweep import slice_loss, split_validation

METHODS = ("full", "lora", "qlora")
GRIDS = {"full": (1e-3, 3e-3, 1e-2),  # peak rates tried (cosine, 5% warm-up), around the bases' pretraining 2e-3-3e-3
         "lora": (3e-3, 1e-2, 3e-2),  # the LoRA family: B starts at 0 and the update is scaled by alpha / r
         "qlora": (3e-3, 1e-2, 3e-2)}
QUICK_GRIDS = {"full": (1e-3, 3e-3), "lora": (3e-3, 1e-2), "qlora": (3e-3, 1e-2)}  # --quick: 2 rates each
STEPS_CPU = 300  # optimizer steps per run on the CPU default
LORA_R, LORA_ALPHA = 8, 16  # LoRA rank and alpha, on every linear layer of every block
RANK_CHECK = 8  # the rank check trains LoRA at 8x its rank (64, QLoRA's; at most half the base's width)
LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
CLAIM_IDS = {  # the claims table's entries whose rules judge this lesson's numbers
    "QLoRA vs LoRA": "qlora-matches-lora",
    "LoRA vs full fine-tuning": "peft-comparable-to-ft",
    "QLoRA vs full fine-tuning": "qlora-on-par-full-ft",
    "forgetting": "peft-less-forgetting",
}
SELECTION_RULE = ("each method keeps the learning rate of its grid with the lowest loss on the stopping slice "
                  "(first half of the Python validation text) after the last step; only that run is scored on the "
                  "reported slice (second half); a run whose loss became inf/nan counts as inf")


def _settings(args) -> dict:
    grids = dict(QUICK_GRIDS if args.quick else GRIDS, **dict(args.extra.grid))
    if args.device == "cuda":
        return dict(size=args.extra.size or "small", steps=80 if args.quick else 600, batch=16, block=256,
                    val_batches=10, corpus_bytes=20_000_000, compute_dtype="bfloat16", grids=grids)
    return dict(size=args.extra.size or "tiny", steps=30 if args.quick else STEPS_CPU, batch=8,
                block=64 if args.quick else 128, val_batches=4 if args.quick else 12,
                corpus_bytes=1_000_000 if args.quick else 4_000_000, compute_dtype="float32", grids=grids)


def build(method: str, base, compute_dtype: str = "float32", seed: int = 0, r: int = LORA_R):
    """The model to train for ``method``: a copy of ``base`` with its method applied (LoRA rank ``r``, with
    alpha scaled to keep alpha / r, the update's scale, at LORA_ALPHA / LORA_R)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    model = copy.deepcopy(base)
    if method == "full":
        return model
    cfg = LoraConfig(r=r, lora_alpha=LORA_ALPHA * r / LORA_R, target_modules=list(LINEARS), seed=seed)
    if method == "qlora":  # NF4 base, blocks of 64, double quantization (minipeft.peft.qlora)
        return get_qlora_model(model, cfg, compute_dtype=compute_dtype)
    return get_peft_model(model, cfg)


def choose(rows: list[dict]) -> int:
    """Index of the run with the lowest stopping-slice loss (``val_select``; a diverged run is inf)."""
    if not rows:
        raise ValueError("choose needs at least one run of the learning-rate grid")
    return int(np.argmin([r["val_select"] for r in rows]))


def sweep(method: str, base, lrs, s: dict, train_tok, select_loss, seed: int = 0, log=print,
          r: int = LORA_R) -> tuple[list, object]:
    """Train ``method`` at each rate of ``lrs``; ``(rows, model of the chosen run)``, the chosen row marked."""
    steps, rows, best = s["steps"], [], None  # best: (stopping-slice loss, model) of the best run so far
    for lr in lrs:
        model = build(method, base, s["compute_dtype"], seed, r)
        name = f"{method}{'' if r == LORA_R else f' r={r}'} lr={lr:g}"
        tc = TrainConfig(max_steps=steps, batch_size=s["batch"], lr=lr, schedule="cosine",
                         warmup_steps=max(1, steps // 20), weight_decay=0.0, grad_clip=1.0,
                         eval_every=max(1, steps // 4), seed=seed, progress=True, run_name=name)
        row = dict(lr=lr, diverged=False, chosen=False, at_grid_edge=False)
        try:
            res = train(model, lambda g: lm_batches(train_tok, s["batch"], s["block"], g), config=tc,
                        eval_fn=lambda m: {"stopping_loss": select_loss(m)})
        except FloatingPointError:  # the loss became inf/nan: this rate is too high
            row.update(val_select=math.inf, train_loss=math.nan, sec_per_step=math.nan, diverged=True, curve=None)
            log(f"  [{name}] diverged")
        else:
            tail = res.losses[-max(1, steps // 10):]  # the last 10% of steps: less noisy than the last one
            row.update(val_select=res.eval_history[-1][1]["stopping_loss"], train_loss=float(np.mean(tail)),
                       sec_per_step=res.final["sec_per_step"],
                       curve=([st for st, _ in res.eval_history], [m["stopping_loss"] for _, m in res.eval_history]))
            log(f"  [{name}] {steps} steps: train loss {row['train_loss']:.3f} (last 10%), stopping-slice loss "
                f"{row['val_select']:.3f}")
        rows.append(row)
        if best is None or row["val_select"] < best[0]:
            best = (row["val_select"], model)
        del model
    i = choose(rows)
    if rows[i]["diverged"]:
        raise FloatingPointError(f"every learning rate of {method}'s grid {tuple(lrs)} diverged; lower the grid")
    rows[i]["chosen"] = True
    rows[i]["at_grid_edge"] = len(lrs) > 1 and rows[i]["lr"] in (min(lrs), max(lrs))
    return rows, best[1]


def _rules() -> dict:
    by_id = {c.id: c for c in CLAIMS}
    missing = [i for i in CLAIM_IDS.values() if i not in by_id]
    if missing:
        raise KeyError(f"minipeft.claims.CLAIMS has no claim {missing}; update qlora.CLAIM_IDS")
    return {label: by_id[i] for label, i in CLAIM_IDS.items()}


def _edge(m: dict, name: str) -> str:
    if not m.get("at_grid_edge"):
        return ""
    lrs = m["grid"]
    side = "top" if m["lr"] == max(lrs) else "bottom"
    return f"; {name}'s lr {m['lr']:g} is at the {side} of its grid {tuple(lrs)}: beyond it was not tried"


def judge(methods: dict, base_val: float, base_source: float, nf4_source: float | None = None,
          rank_check: dict | None = None) -> list[dict]:
    """The course's claims judged from this lesson's numbers, by the claims table's rules.

    ``methods[m]`` (m in full / lora / qlora) has ``val_loss`` (reported Python loss),
    ``source_val_loss`` (English), ``lr``, ``grid`` and ``at_grid_edge``; ``base_val`` and
    ``base_source`` are the base's Python (reported slice) and English losses (``nf4_source``:
    the NF4 base's English loss, before training; ``rank_check``: LoRA at a higher rank, ``r`` and
    ``val_loss``, named in the LoRA-vs-full note). Returns one
    dict per claim: label, claim id, course, minipeft, relation, value, rule, verdict, note.
    """
    f, lo, q = (methods[m] for m in METHODS)
    py = {m: methods[m]["val_loss"] for m in METHODS}
    rise = {m: methods[m]["source_val_loss"] - base_source for m in METHODS}
    out = []

    def add(label, ours, relation, value, note):
        c = _rules()[label]
        out.append(dict(label=label, claim=c.id, course=c.course, minipeft=ours, relation=relation, value=value,
                        rule=c.rule.text, verdict=c.rule(value), note=note))

    r = py["qlora"] / py["lora"]
    note = f"QLoRA {py['qlora'] - py['lora']:+.3f} nats/byte from LoRA (lr {q['lr']:g} vs {lo['lr']:g})"
    add("QLoRA vs LoRA", f"QLoRA {py['qlora']:.3f}, LoRA {py['lora']:.3f} nats/byte", f"QLoRA/LoRA = {r:.3f}", r,
        note + _edge(q, "QLoRA") + _edge(lo, "LoRA"))
    forgot = (f"on English full fine-tuning's loss rose {rise['full']:+.3f}, LoRA's {rise['lora']:+.3f}, "
              f"QLoRA's {rise['qlora']:+.3f}")
    for m, name in (("lora", "LoRA"), ("qlora", "QLoRA")):
        r, d = py[m] / py["full"], py[m] - py["full"]
        where = (f"after the learning-rate sweep {name} is {d:.3f} nats/byte ({100 * d / py['full']:.1f}%) behind "
                 f"full fine-tuning on Python" if d > 0 else
                 f"{name} is {-d:.3f} nats/byte ahead of full fine-tuning on Python")
        more = ""
        if m == "lora" and rank_check is not None and d > 0:
            d_hi = rank_check["val_loss"] - py["full"]
            more = (f"; with {rank_check['r'] // LORA_R}x the rank (r={rank_check['r']}, alpha/r kept, same lr) LoRA "
                    f"is {100 * d_hi / py['full']:+.1f}% from full fine-tuning (r={LORA_R}: {100 * d / py['full']:+.1f}%)"
                    + (": more rank closes over a quarter of the gap, so on this small base the update full "
                       "fine-tuning makes is not of low rank" if d_hi < 0.75 * d else ""))
        add(f"{name} vs full fine-tuning", f"{name} {py[m]:.3f}, full {py['full']:.3f} nats/byte",
            f"{name}/full = {r:.3f}", r, where + more + f" (lr {methods[m]['lr']:g} vs {f['lr']:g}); " + forgot
            + _edge(methods[m], name) + _edge(f, "full fine-tuning"))
    rf, rl = rise["full"], rise["lora"]
    value = rf / rl if rl > 0 else (math.inf if rf > 0 else math.nan)
    note = (f"English loss: base {base_source:.3f}, full {f['source_val_loss']:.3f} ({rf:+.3f}), LoRA "
            f"{lo['source_val_loss']:.3f} ({rl:+.3f}), QLoRA {q['source_val_loss']:.3f} ({rise['qlora']:+.3f}")
    if nf4_source is not None:
        note += f", of which {nf4_source - base_source:+.3f} is the NF4 base before training"
    note += ")"
    gain = {m: base_val - py[m] for m in METHODS}
    note += "; Python loss lowered by " + ", ".join(f"{m} {gain[m]:.3f}" for m in METHODS)
    if gain["full"] > 0 and gain["lora"] > 0:
        note += f"; English rise per nat of Python gained: full {rf / gain['full']:.2f}, LoRA {rl / gain['lora']:.2f}"
    if math.isnan(value):
        note = "neither full fine-tuning nor LoRA raised the English loss: no forgetting to compare; " + note
    add("forgetting", f"English rise full {rf:+.3f}, LoRA {rl:+.3f} nats/byte",
        f"full rise / LoRA rise = {value:.2f}", value, note)
    return out


def _relation(f) -> str:
    """The relation a course figure must satisfy, in words."""
    if f.relation == "≈":
        return "= (exact)" if f.rel_tol == 0 else f"≈ within {100 * f.rel_tol:g}%"
    return f"minipeft {f.relation} course"


def main(argv=None) -> dict:
    args = parse_args(argv, __doc__.split("\n")[0], _add_arguments)
    s = _settings(args)
    rep = Report("QLoRA: a 4-bit base, LoRA on every linear layer, what it learns, forgets, and saves"
                 + (" (quick mode: seconds-long runs, numbers not meaningful)" if args.quick else ""))

    # 1. memory arithmetic --------------------------------------------------------------
    rep.section("1. Memory arithmetic of the course, computed from its inputs")
    figs = course_figures()
    fig_rows = [(f.case + (f" [{i}]" if f.note else ""), f.unit, f.course, f.minipeft, f"{f.minipeft / f.course:.3f}",
                 _relation(f), "reproduced" if f.ok else "contradicted") for i, f in enumerate(figs, 1)]
    rep.table(fig_rows, ("case", "unit", "course", "minipeft", "minipeft/course", "holds if", "verdict"))
    for i, f in enumerate(figs, 1):
        if f.note:
            rep.text(f"  [{i}] {f.note}")

    # 2. the three methods, each at its own learning rate ---------------------------------
    base, meta = pretrained.load(s["size"], "english", device=args.device, quick=args.quick, return_meta=True)
    data = Corpus.load("python", max_bytes=s["corpus_bytes"], val_max_bytes=200_000)
    english = Corpus.load("english", max_bytes=10_000, val_max_bytes=200_000)
    train_tok = to_device(data.train, args.device)
    select_tok, report_tok = (to_device(t, args.device) for t in split_validation(data.val))
    source_tok = to_device(english.val, args.device)
    n_win = 8 * s["val_batches"]

    def select_loss(m):
        return slice_loss(m, select_tok, s["block"], n_win)

    def report_loss(m):
        return slice_loss(m, report_tok, s["block"], n_win)

    def source_loss(m):
        return pretrained.validation_loss(m, source_tok, s["block"], batch_size=8, max_batches=s["val_batches"])

    base_val, base_select, base_source = report_loss(base), select_loss(base), source_loss(base)
    nf4 = build("qlora", base, s["compute_dtype"], args.seed)  # B = 0: the NF4 base itself
    nf4_val, nf4_source = report_loss(nf4), source_loss(nf4)
    del nf4
    rep.section(f"2. Adapting the '{s['size']}' English base to Python code: a learning rate for each method")
    rep.text(f"base: {base.num_parameters():,} parameters, pretrained to {meta['val_loss']:.3f} nats/byte on English "
             f"(tokens are bytes). Python validation text cut in two halves of {len(select_tok):,} and "
             f"{len(report_tok):,} bytes: the stopping slice ({n_win} windows of {s['block']}) chooses, the reported "
             f"slice scores. Base on Python: stopping {base_select:.3f}, reported {base_val:.3f}; on English "
             f"{base_source:.3f} ({n_win} windows).\nrule: {SELECTION_RULE}.\n{s['steps']} steps per run, batch "
             f"{s['batch']} x {s['block']} bytes. QLoRA's 4-bit layers compute in {s['compute_dtype']}"
             + (" (bfloat16 GEMMs with float32 sums, as in the paper)" if s["compute_dtype"] == "bfloat16" else
                " (on a GPU: bfloat16, as in the paper)") + "; everything else in float32.")
    rng = np.random.default_rng(args.seed)
    probe = lm_batches(train_tok, s["batch"], s["block"], rng)  # the batch whose step is measured
    results, grid_rows, curves = {}, [], {}
    for method in METHODS:
        lrs = s["grids"][method]
        rows, model = sweep(method, base, lrs, s, train_tok, select_loss, args.seed, log=rep.text)
        chosen = rows[choose(rows)]
        grid_rows += [(method, f"{r['lr']:g}", f"{r['train_loss']:.3f}", f"{r['val_select']:.3f}",
                       ("<- chosen" + (" (grid edge)" if r["at_grid_edge"] else "")) if r["chosen"] else "")
                      for r in rows]
        trainable = sum(p.size for p in model.parameters() if p.requires_grad)
        probe_model = build(method, base, s["compute_dtype"], args.seed)  # one measured step, from the start
        opt = AdamW([p for p in probe_model.parameters() if p.requires_grad], lr=1e-9)
        measured = measure_training_step(probe_model, probe, opt)
        predicted = estimate_memory(base.config, _method_config(method),
                                    StepSetup(batch_size=s["batch"], seq_len=s["block"], ledger_view=True))
        del probe_model, opt
        results[method] = dict(model=model, trainable=trainable, lr=chosen["lr"], grid=list(lrs),
                               at_grid_edge=chosen["at_grid_edge"], val_select=chosen["val_select"],
                               train_loss=chosen["train_loss"], val_loss=report_loss(model),
                               source_val_loss=source_loss(model), sec_per_step=chosen["sec_per_step"],
                               sweep=[{k: v for k, v in r.items() if k != "curve"} for r in rows],
                               measured=measured, predicted=predicted)
        curves[f"{method} (lr {chosen['lr']:g})"] = ([0] + chosen["curve"][0], [base_select] + chosen["curve"][1])
    # the rank check: LoRA with RANK_CHECK x its rank (alpha / r kept) at its chosen rate -- does more rank close
    # the gap to full fine-tuning? (on small bases it narrows: their update is not of low rank)
    r_hi = min(RANK_CHECK * LORA_R, base.config.n_embd // 2)  # still low-rank: at most half the width
    rk_rows, rk_model = sweep("lora", base, [results["lora"]["lr"]], s, train_tok, select_loss, args.seed,
                              log=rep.text, r=r_hi)
    rank_check = dict(r=r_hi, alpha=LORA_ALPHA * r_hi / LORA_R, lr=results["lora"]["lr"], val_loss=report_loss(rk_model),
                      val_select=rk_rows[0]["val_select"], source_val_loss=source_loss(rk_model),
                      trainable=sum(p.size for p in rk_model.parameters() if p.requires_grad))
    del rk_model
    grid_rows.append((f"lora r={r_hi}", f"{rank_check['lr']:g}", f"{rk_rows[0]['train_loss']:.3f}",
                      f"{rank_check['val_select']:.3f}", "rank check (LoRA's rate)"))
    rep.table(grid_rows, ("method", "lr", "train loss", "stopping-slice loss", ""))
    edges = [m for m, r in results.items() if r["at_grid_edge"]]
    if edges:
        rep.text("chosen at a grid edge (a rate beyond it might be better): " + ", ".join(
            f"{m} lr {results[m]['lr']:g}" for m in edges))

    rep.section("3. What each method learned (Python) and forgot (English), on text nothing was chosen on")
    total = base.num_parameters()
    rep.table([("base", "-", "-", "-", base_val, "", base_source, "", "")]
              + [(m, f"{r['lr']:g}", r["trainable"], f"{100 * r['trainable'] / total:.2f}%", r["val_loss"],
                  f"{r['val_loss'] - base_val:+.3f}", r["source_val_loss"],
                  f"{r['source_val_loss'] - base_source:+.3f}", f"{1000 * r['sec_per_step']:.0f}")
                 for m, r in results.items()]
              + [(f"lora r={r_hi}", f"{rank_check['lr']:g}", rank_check["trainable"],
                  f"{100 * rank_check['trainable'] / total:.2f}%", rank_check["val_loss"],
                  f"{rank_check['val_loss'] - base_val:+.3f}", rank_check["source_val_loss"],
                  f"{rank_check['source_val_loss'] - base_source:+.3f}", "-")],
              ("method", "lr", "trainable", "of base", "Python", "learned", "English", "forgot", "ms/step"))
    rep.text(f"(the NF4 base before training: Python {nf4_val:.3f}, English {nf4_source:.3f})")
    claims = judge(results, base_val, base_source, nf4_source, rank_check)
    rep.text("\nThe course's claims, judged by the claims table's rules (minipeft.claims):")
    for c in claims:
        rep.claim(c["label"], c["course"], c["minipeft"], c["relation"], c["verdict"], c["note"])
    for c in claims:
        rep.text(f"  rule ({c['label']}): {c['rule']}")

    rep.section(f"4. One training step's memory (batch {s['batch']} x {s['block']} tokens): predicted vs measured")
    worst = 0.0
    for method, r in results.items():
        rows = compare(r["predicted"], r["measured"])
        rep.text(f"{method}:")
        rep.table([(n, p, m, q) for n, p, m, q in rows], ("  category", "predicted B", "measured B", "ratio"))
        worst = max([worst] + [abs(m / p - 1) for _, p, m, _ in rows if p])
        if r["measured"].device_peak:
            rep.text(f"  GPU memory pool peak during the step: {r['measured'].device_peak:,} B")
    rep.text(f"largest deviation of a measured category from its prediction: {100 * worst:.1f}%")
    ckpt = checkpointed_step(build("qlora", base, s["compute_dtype"], args.seed), probe, base.config,
                             _method_config("qlora"))
    rep.text("\nActivations dominate (the course: LLaMA 7B's LoRA step keeps 567 MB of activations for 26 MB of "
             "LoRA parameters); gradient checkpointing keeps each block's input only and recomputes the block in "
             "backward (the same gradients, a second forward of each block):")
    rep.table([(name, ckpt[f"activations{k}_predicted"], ckpt[f"activations{k}"],
                f"{ckpt[f'activations{k}'] / ckpt['lora_parameters']:.0f}x")
               for name, k in (("QLoRA step", "_plain"), ("QLoRA step, gradient checkpointing", ""))],
              ("  activations", "predicted B", "measured B", "/ LoRA parameters"))
    rep.text(f"  LoRA parameters: {ckpt['lora_parameters']:,} B; checkpointing keeps "
             f"{ckpt['activations'] / ckpt['activations_plain']:.2f} of the plain step's activations")

    rep.section("5. Optimizer state for full fine-tuning: AdamW, Lion, 8-bit and paged (bitsandbytes' optimizers)")
    opt_rows = optimizer_states(base, probe)
    rep.table(opt_rows, ("optimizer", "state bytes", "on device at peak", "note"))

    rep.section("6. Merging the QLoRA adapter (losses on the reported slice)")
    merge, merge_rounding = merge_study(results["qlora"]["model"], base, report_loss)
    rep.table([(k, v) for k, v in merge.items()], ("model", "val loss"))
    rep.text("Merged into the dequantized NF4 weights, the model is the one that was trained (same loss up to "
             "float rounding). Merged into the original full-precision base, it is not: the adapter learned to "
             "correct the NF4 base's rounding, which the original weights do not have. Merged into the NF4 layers "
             "as peft + bitsandbytes merge (dequantize, add s·B·A, quantize to NF4 again; the same bytes as "
             f"theirs), the sum is rounded once more: weights moved by up to {merge_rounding:.4g} from the "
             "exact sum.")

    from .figures.common import loss_curves
    from .figures.qlora import memory_breakdown

    p1 = save_figure(loss_curves(curves, hlines={"base model": base_select},
                                 title="Adapting the English base to Python code (stopping slice, chosen lr)"),
                     args, "qlora_loss")
    p2 = save_figure(memory_breakdown({m: r["measured"].as_dict() for m, r in results.items()},
                                      {m: r["predicted"].as_dict() for m, r in results.items()},
                                      title="One training step: measured memory by category"), args, "qlora_memory")
    for p in (p1, p2):
        if p:
            rep.text(f"figure: {p}")
    keys = ("trainable", "lr", "grid", "at_grid_edge", "val_select", "train_loss", "val_loss", "source_val_loss",
            "sec_per_step", "sweep")
    out = {m: {k: r[k] for k in keys} | {"measured": r["measured"].as_dict(), "predicted": r["predicted"].as_dict()}
           for m, r in results.items()}
    result = {"size": s["size"], "steps": s["steps"], "compute_dtype": s["compute_dtype"],
              "selection_rule": SELECTION_RULE,
              "base_val_loss": base_val, "base_select_loss": base_select, "base_source_val_loss": base_source,
              "nf4_val_loss": nf4_val, "nf4_source_val_loss": nf4_source, "methods": out, "claims": claims,
              "lora_rank_check": rank_check,
              "max_memory_deviation": worst, "optimizers": [list(r) for r in opt_rows], "merge": merge,
              "merge_rounding": merge_rounding, "gradient_checkpointing": ckpt,
              "course_figures": [(f.case, f.course, f.minipeft, f.relation, "reproduced" if f.ok else "contradicted")
                                 for f in figs]}
    rep.section("The course's claims, judged on this run (the rules of figures/claims.json)")
    rep.text("(the claims on learning and forgetting were judged in section 3, by these same rules)")
    lesson_claims("qlora", json.loads(json.dumps(result, default=float)), rep,
                  claims=[c for c in CLAIMS if c.lesson == "qlora" and c.id not in CLAIM_IDS.values()])
    rep.done()
    return finish(result, args)


def _method_config(method: str) -> MethodConfig:
    if method == "full":
        return MethodConfig(method="full")
    return MethodConfig(method=method, targets=LINEARS, r=LORA_R, blocksize=64, double_quant=True)


def _grid_arg(text: str) -> tuple[str, tuple[float, ...]]:
    """``'lora=3e-3,1e-2'`` -> ``('lora', (0.003, 0.01))`` (an argparse type: errors exit with code 2)."""
    import argparse

    method, _, lrs = text.partition("=")
    try:
        grid = tuple(float(x) for x in lrs.split(","))
    except ValueError:
        grid = ()
    if method not in METHODS or not grid or not all(math.isfinite(x) and x > 0 for x in grid):
        raise argparse.ArgumentTypeError(f"--grid {text!r}: expected METHOD=LR,LR,... with METHOD one of {METHODS} "
                                         "and positive rates, e.g. --grid full=1e-3,3e-3,1e-2")
    return method, grid


def _add_arguments(p):
    p.add_argument("--size", default=None, choices=sorted(pretrained.SIZES),
                   help="base model size (default: tiny on the CPU, small on a GPU)")
    p.add_argument("--grid", type=_grid_arg, action="append", default=[], metavar="METHOD=LR,LR,...",
                   help="replace one method's learning-rate grid (repeatable), e.g. --grid full=1e-3,3e-3,1e-2")


if __name__ == "__main__":
    main()
