"""Lesson: side tuning — QST against QLoRA, LoRA and full fine-tuning, and where the activations go.

``python -m minipeft.lessons.side_tuning [--quick] [--device cuda] [--figures DIR]``

LoRA and QLoRA shrink the trainable parameters, their gradients and the optimizer state,
but they still back-propagate through the whole base model, so they keep nearly all of
its activations ("adapter networks ... require saving intermediate activations for back
propagation", says the course). Side tuning (methods.md §12) trains a separate narrow
network beside the frozen backbone: information flows from base to side and never back,
so the backbone runs under ``no_grad`` and keeps nothing for backward. QST (Zhang et al.
2024, arXiv 2401.07159) adds an NF4 backbone, adapter downsamples and an output mix that
starts at the base model.

On one base and one data set (minipeft's English base adapted to Python code, as in the
QLoRA lesson) the lesson

1. prints the course's QST-vs-QLoRA table, with the memory ratios computed from it;
2. trains full fine-tuning, LoRA, QLoRA, LST and QST (plus QST at smaller reductions):
   trainable parameters, validation loss, time per step;
3. measures one training step's memory by category as the batch size and the sequence
   length grow: weights, gradients, optimizer state, activations saved for backward (the
   engine's ledger) and the backbone hidden states the side network holds (arrays made
   under ``no_grad`` that a trainable downsample keeps; ``held_leaf_bytes``);
4. reports the ordering QST < QLoRA at the larger batches and the loss gap, as measured.

Activations below are saved (ledger) + held (backbone states and other non-parameter
inputs kept by the graph), for every method alike.
"""
from __future__ import annotations

import copy
import math

import numpy as np

from .. import pretrained
from ..backend import to_device
from ..data import Corpus, lm_batches
from ..memory import MethodConfig, TrainConfig as MemTrainConfig, activation_bytes, estimate_memory
from ..memory_measure import measure_training_step
from ..optim import AdamW
from ..peft import LSTConfig, QSTConfig, get_peft_model, held_leaf_bytes
from ..train import TrainConfig, train
from ._common import Report, finish, parse_args, save_figure
from .qlora import build as build_lora

METHODS = ("full", "lora", "qlora", "lst", "qst")
LR = {"full": 1e-3, "lora": 3e-3, "qlora": 3e-3, "lst": 1e-2, "qst": 1e-2}  # peak (cosine, 5% warmup)
QST_R, LST_R = 16, 8  # the papers' reduction factors
MB = 1e6

# QST paper Table 2 as the course's slide gives it: MMLU 5-shot accuracy / memory (GB), Alpaca, batch 4, seq 384
COURSE_TABLE = {
    "OPT-1.3B": (25.0, 6.3, 24.3, 3.2), "OPT-2.7B": (25.2, 10.1, 25.5, 4.8), "OPT-6.7B": (25.6, 15.5, 26.2, 7.2),
    "OPT-13B": (26.5, 25.4, 26.8, 12.6), "OPT-30B": (27.7, 46.8, 27.3, 25.7), "OPT-66B": (36.4, 87.5, 36.0, 52.3),
    "LLaMA-2-7B": (45.9, 15.6, 45.1, 7.3), "LLaMA-2-13B": (54.7, 25.4, 56.8, 12.6),
    "LLaMA-2-70B": (64.1, 95.5, 63.9, 56.0), "Avg.": (36.8, 36.5, 36.9, 20.2),
}  # (QLoRA accuracy, QLoRA GB, QST accuracy, QST GB)


def _settings(args) -> dict:
    if args.device == "cuda":
        return dict(size=args.extra.size or "small", steps=80 if args.quick else 600, batch=16, block=256,
                    val_batches=10, corpus_bytes=20_000_000, compute_dtype="float16",
                    batches=(1, 4, 16, 64), seqs=(32, 64, 128, 256), seq_batch=16, qst_rs=(8, 4))
    if args.quick:
        return dict(size=args.extra.size or "tiny", steps=20, batch=4, block=32, val_batches=3,
                    corpus_bytes=1_000_000, compute_dtype="float32", batches=(1, 4, 16), seqs=(8, 16, 32),
                    seq_batch=4, qst_rs=(8,))
    return dict(size=args.extra.size or "tiny", steps=400, batch=8, block=128, val_batches=12,
                corpus_bytes=4_000_000, compute_dtype="float32", batches=(1, 2, 4, 8, 16, 32),
                seqs=(16, 32, 64, 128), seq_batch=8, qst_rs=(8, 4))


def build(method: str, base, compute_dtype: str = "float32", seed: int = 0, r: int | None = None):
    """A copy of ``base`` with ``method`` applied (full/lora/qlora as the QLoRA lesson; lst; qst)."""
    if method in ("full", "lora", "qlora"):
        return build_lora(method, base, compute_dtype, seed)
    model = copy.deepcopy(base)
    if method == "lst":
        return get_peft_model(model, LSTConfig(reduction_factor=r or LST_R, seed=seed))
    if method == "qst":
        return get_peft_model(model, QSTConfig(reduction_factor=r or QST_R, compute_dtype=compute_dtype, seed=seed))
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def measure(model, batch) -> dict:
    """One training step's memory by category (bytes): the engine's ledger plus what the graph holds."""
    held = {}

    def loss_fn(m, b):
        loss = m(b[0], targets=b[1]).loss
        held["bytes"] = held_leaf_bytes(loss, m)  # backbone states kept by the side network's graph
        return loss

    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-12)  # the step barely moves
    meas = measure_training_step(model, batch, opt, loss_fn)
    out = meas.as_dict()
    out["weights"] = meas.weights_trainable + meas.weights_frozen + meas.quant_constants
    out["saved"], out["held"] = meas.activations, held["bytes"]
    out["activations"] = meas.activations + held["bytes"]
    out["total"] = meas.total + held["bytes"]
    base = model.get_base_model() if hasattr(model, "get_base_model") else None
    out["backbone_grads"] = 0 if base is None or model.peft_type not in ("LST", "QST") else sum(
        p.grad is not None for p in base.parameters())
    model.zero_grad()
    return out


def main(argv=None) -> dict:
    args = parse_args(argv, __doc__.split("\n")[0], _add_arguments)
    s = _settings(args)
    rep = Report("Side tuning: QST vs QLoRA vs LoRA vs full fine-tuning, and where the activations go"
                 + (" (quick mode)" if args.quick else ""))

    # 1. the course's table ---------------------------------------------------------------
    rep.section("1. The course's table (QST paper, Table 2): MMLU 5-shot accuracy / training memory")
    rows = [(k, f"{a:.1f} / {m:.1f} GB", f"{b:.1f} / {n:.1f} GB", f"{m / n:.2f}x", f"{b - a:+.1f}")
            for k, (a, m, b, n) in COURSE_TABLE.items()]
    rep.table(rows, ("model", "QLoRA", "QST", "memory QLoRA/QST", "QST - QLoRA acc."))
    qa, qm, sa, sm = COURSE_TABLE["Avg."]
    rep.text(f"On average QST needs {qm / sm:.2f}x less memory than QLoRA for {sa - qa:+.1f} MMLU points.")

    # 2. train every method ---------------------------------------------------------------
    base, meta = pretrained.load(s["size"], "english", device=args.device, quick=args.quick, return_meta=True)
    data = Corpus.load("python", max_bytes=s["corpus_bytes"], val_max_bytes=200_000)
    train_tok, val_tok = to_device(data.train, args.device), to_device(data.val, args.device)
    n_base = base.num_parameters()

    def val_loss(m) -> float:
        return pretrained.validation_loss(m, val_tok, s["block"], batch_size=8, max_batches=s["val_batches"])

    base_val = val_loss(base)
    rep.section(f"2. Adapting the '{s['size']}' English base to Python code ({s['steps']} steps each)")
    rep.text(f"base: {n_base:,} parameters (d = {base.config.n_embd}, L = {base.config.n_layer}), pretrained to "
             f"{meta['val_loss']:.3f} nats/token on English; on Python code it starts at {base_val:.3f}.")
    runs = [(m, None) for m in METHODS] + [("qst", r) for r in s["qst_rs"]]
    results, curves, models = {}, {}, {}
    for method, r in runs:
        name = method if r is None else f"{method} r={r}"
        model = build(method, base, s["compute_dtype"], args.seed, r)
        if r is None:
            models[method] = copy.deepcopy(model)  # untrained copies for the memory sweep
        trainable = sum(p.size for p in model.parameters() if p.requires_grad)
        start = val_loss(model)  # step 0: the base for LoRA/QLoRA/QST (NF4 for the latter two), not for LST
        tc = TrainConfig(max_steps=s["steps"], batch_size=s["batch"], lr=LR[method], schedule="cosine",
                         warmup_steps=max(1, s["steps"] // 20), weight_decay=0.0, grad_clip=1.0,
                         eval_every=max(1, s["steps"] // 8), seed=args.seed, progress=False)
        res = train(model, lambda g: lm_batches(train_tok, s["batch"], s["block"], g), config=tc, eval_fn=val_loss)
        results[name] = dict(trainable=trainable, trainable_pct=100 * trainable / n_base, val_start=start,
                             val_loss=val_loss(model), sec_per_step=res.final["sec_per_step"], r=r)  # median step
        if r is None:
            curves[name] = ([0] + [st for st, _ in res.eval_history],
                            [start] + [m["val_loss"] for _, m in res.eval_history])
        rep.text(f"  {name:<10} trained: val loss {results[name]['val_loss']:.3f}")

    # 3. memory as batch and sequence grow --------------------------------------------------
    rng = np.random.default_rng(args.seed)
    T, Bs = s["block"], s["batches"]
    batch_sweep = {m: [] for m in METHODS}
    for B in Bs:
        probe = lm_batches(train_tok, B, T, rng)  # the same batch for every method
        for m in METHODS:
            batch_sweep[m].append(measure(models[m], probe))
    seq_sweep = {m: [] for m in METHODS}
    for t in s["seqs"]:
        probe = lm_batches(train_tok, s["seq_batch"], t, rng)
        for m in METHODS:
            seq_sweep[m].append(measure(models[m], probe))
    top = {m: batch_sweep[m][-1] for m in METHODS}  # at the largest batch
    probe = lm_batches(train_tok, Bs[-1], T, rng)
    for r in s["qst_rs"]:
        results[f"qst r={r}"]["memory"] = measure(build("qst", base, s["compute_dtype"], args.seed, r), probe)
    for m in METHODS:
        results[m]["memory"] = top[m]

    rep.section(f"3. One training step's memory, measured (batch {Bs[-1]} x {T} tokens), and validation loss")
    q = results["qlora"]
    table = []
    for name, r in results.items():
        mem = r["memory"]
        table.append((name, r["trainable"], f"{r['trainable_pct']:.2f}%", mem["weights"] / MB,
                      (mem["gradients"] + mem["optimizer_state"]) / MB, mem["saved"] / MB, mem["held"] / MB,
                      mem["total"] / MB, r["val_start"], r["val_loss"], f"{r['val_loss'] - q['val_loss']:+.3f}",
                      f"{1000 * r['sec_per_step']:.0f}"))
    rep.table(table, ("method", "trainable", "of base", "weights MB", "grad+opt MB", "saved MB", "held MB",
                      "total MB", "val step 0", "val loss", "vs QLoRA", "ms/step"))
    rep.text("saved: the engine's ledger (ctx.save_for_backward); held: backbone states (no-grad leaves) the graph "
             "keeps, e.g. a downsample's input for its weight gradient.")
    if args.device == "cuda":
        rep.text("GPU pool peak per step (MB): " + ", ".join(f"{m} {top[m]['device_peak'] / MB:.1f}" for m in METHODS))

    rep.text(f"\nactivations (saved + held, MB) at {T} tokens per sequence, by batch size:")
    rep.table([(m, *[p["activations"] / MB for p in batch_sweep[m]]) for m in METHODS],
              ("method", *[f"B={B}" for B in Bs]))
    rep.text("(lora and qlora hold the same activations: quantizing the frozen base removes weight bytes, not "
             "activations.)")
    rep.text(f"activations (MB) at batch {s['seq_batch']}, by sequence length:")
    rep.table([(m, *[p["activations"] / MB for p in seq_sweep[m]]) for m in METHODS],
              ("method", *[f"T={t}" for t in s["seqs"]]))

    # 4. QST vs QLoRA -------------------------------------------------------------------------
    rep.section("4. QST against QLoRA, measured, beside the course")
    below = [B for B, a, b in zip(Bs, batch_sweep["qst"], batch_sweep["qlora"]) if a["total"] < b["total"]]
    from_b = next((B for i, B in enumerate(Bs) if all(b in below for b in Bs[i:])), None)
    act_ratio = top["qlora"]["activations"] / top["qst"]["activations"]
    tot_ratio = top["qlora"]["total"] / top["qst"]["total"]
    gap = results["qst"]["val_loss"] - q["val_loss"]
    rep.table([("total memory QLoRA / QST", f"{qm / sm:.2f}x (avg., batch 4 x 384)",
                f"{tot_ratio:.2f}x (batch {Bs[-1]} x {T})"),
               ("activations QLoRA / QST", "-", f"{act_ratio:.2f}x"),
               ("QST - QLoRA quality", f"{sa - qa:+.1f} MMLU points", f"{gap:+.3f} nats/token val loss")],
              ("", "course", "minipeft"))
    rep.text(f"At batch {Bs[-1]} x {T}: QST {top['qst']['total'] / MB:.2f} MB in total "
             f"({top['qst']['activations'] / MB:.2f} MB activations) against QLoRA's {top['qlora']['total'] / MB:.2f} "
             f"MB ({top['qlora']['activations'] / MB:.2f} MB). "
             + (f"QST < QLoRA in total memory at every batch size from {from_b} up." if from_b is not None
                else "QST is not below QLoRA at the largest batches here."))
    rep.text(f"Backbone parameters with a gradient after QST's step: {top['qst']['backbone_grads']}. "
             f"QST's validation loss is {gap:+.3f} nats/token from QLoRA's ({results['qst']['val_loss']:.3f} vs "
             f"{q['val_loss']:.3f}; the base starts at {base_val:.3f}).")
    d = base.config.n_embd
    rep.text(f"With d = {d}, r = {QST_R} leaves a side network {d // QST_R} channels wide (the paper's r = 16 was "
             f"chosen for d >= 2048). Smaller r, measured: " + "; ".join(
                 f"r={r} (width {d // r}): {results[f'qst r={r}']['memory']['activations'] / MB:.2f} MB activations, "
                 f"val {results[f'qst r={r}']['val_loss']:.3f}" for r in s["qst_rs"]) + ".")
    lst, qst = top["lst"], top["qst"]
    rep.text(f"QST against LST: the NF4 backbone saves {(lst['weights'] - qst['weights']) / MB:.2f} MB of weights, "
             f"but the adapter downsamples and the output mix keep {(qst['activations'] - lst['activations']) / MB:+.2f}"
             f" MB of activations: in total QST {qst['total'] / MB:.2f} MB vs LST {lst['total'] / MB:.2f} MB. Weights "
             f"are {lst['weights'] / max(lst['total'], 1):.0%} of LST's total here; the NF4 saving grows with the "
             "model (weights grow as d^2, activations per token as d).")
    mc = MethodConfig(method="side", reduction_factor=LST_R)
    pred = estimate_memory(base.config, mc, MemTrainConfig(batch_size=Bs[-1], seq_len=T, ledger_view=True))
    pred_all = estimate_memory(base.config, mc, MemTrainConfig(batch_size=Bs[-1], seq_len=T))
    rep.text(f"LST against the memory calculator (minipeft.memory): ledger {lst['saved']:,} B measured vs "
             f"{pred.activations:,} B predicted; backbone states held {lst['held']:,} B vs "
             f"{pred_all.activations - pred.activations:,} B predicted.")
    c = base.config
    terms = activation_bytes(Bs[-1], T, c.n_layer, c.n_embd, c.n_head, c.d_ff, c.vocab_size, 4,
                             side_width=c.n_embd // LST_R, side_inner=c.d_ff // LST_R, ledger_view=True)
    share = {k: sum(v for t, v in terms.items() if key in t) / MB
             for k, key in (("probs", "attn: probs"), ("ce", "cross_entropy"), ("ln_f", "ln_f"))}
    rep.text(f"Why the side network's activations do not shrink by r: of LST's {pred.activations / MB:.1f} MB saved, "
             f"{share['probs']:.1f} MB are its attention probabilities (heads x T per position, whatever the width), "
             f"{share['ce']:.1f} MB the loss's softmax over {c.vocab_size} tokens and {share['ln_f']:.1f} MB ln_f at "
             f"the full width d; and the backbone states it holds are d wide.")

    from ..plotting import side_tuning_memory

    fig = side_tuning_memory({m: (list(Bs), [p["activations"] for p in batch_sweep[m]]) for m in METHODS},
                             {m: (list(s["seqs"]), [p["activations"] for p in seq_sweep[m]]) for m in METHODS},
                             {m: top[m] for m in METHODS}, curves, base_val, seq_len=T, seq_batch=s["seq_batch"],
                             title=f"Side tuning vs (Q)LoRA on the '{s['size']}' base: memory and loss")
    path = save_figure(fig, args, "side_tuning_memory")
    if path:
        rep.text(f"figure: {path}")
    rep.done()

    def clean(mem: dict) -> dict:
        return {k: float(v) for k, v in mem.items()}

    out = {name: {**{k: v for k, v in r.items() if k != "memory"}, "memory": clean(r["memory"])}
           for name, r in results.items()}
    return finish({
        "base_val_loss": base_val, "methods": out,
        "batch_sweep": {"seq_len": T, "batch_sizes": list(Bs),
                        "activations": {m: [p["activations"] for p in batch_sweep[m]] for m in METHODS},
                        "total": {m: [p["total"] for p in batch_sweep[m]] for m in METHODS}},
        "seq_sweep": {"batch_size": s["seq_batch"], "seq_lens": list(s["seqs"]),
                      "activations": {m: [p["activations"] for p in seq_sweep[m]] for m in METHODS}},
        "qst_vs_qlora": {"batch": Bs[-1], "activation_ratio": act_ratio, "total_ratio": tot_ratio, "loss_gap": gap,
                         "qst_below_qlora_from_batch": from_b},
        "lst_calculator": {"measured_saved": lst["saved"], "predicted_saved": pred.activations,
                           "measured_held": lst["held"], "predicted_held": pred_all.activations - pred.activations},
        "course": {"table": {k: list(v) for k, v in COURSE_TABLE.items()}, "avg_memory_ratio": qm / sm,
                   "avg_accuracy_gap": sa - qa},
        "all_finite": all(math.isfinite(r["val_loss"]) for r in results.values()),
    }, args)


def _add_arguments(p):
    p.add_argument("--size", default=None, choices=sorted(pretrained.SIZES),
                   help="base model size (default: tiny on the CPU, small on a GPU)")


if __name__ == "__main__":
    main()
