"""Lesson: QLoRA — fine-tuning a 4-bit base with LoRA, and where the memory goes.

``python -m minipeft.lessons.qlora [--quick] [--device cuda] [--figures DIR]``

QLoRA (Dettmers et al. 2023, arXiv 2305.14314) freezes the base model in 4-bit NormalFloat
(NF4) with double quantization, trains LoRA adapters on every linear layer in 16-bit, and
pages optimizer state to the host when memory spikes. This lesson runs, on one pretrained
base and one downstream data set (adapting minipeft's English base model to Python code
from the local standard library), full fine-tuning against LoRA against QLoRA:

1. the memory arithmetic of the course, each number computed from its inputs beside the
   course's (``minipeft.memory.course_figures``);
2. for each method: trainable parameters, validation loss before and after, time per
   step, and one real training step's memory by category, measured (engine ledger,
   optimizer state, arrays held) beside the calculator's prediction;
3. optimizer state under AdamW, 8-bit AdamW (block-wise quantized states) and paged
   AdamW (state in host memory, paged in per update);
4. merging a QLoRA adapter: into the dequantized NF4 weights (the model that was
   trained) or into the original full-precision base — which is *not* the model that
   was trained, because LoRA learned to correct the quantized base.

On the CPU, compute is float32; on a GPU (``--device cuda``) QLoRA computes in float16.
"""
from __future__ import annotations

import copy
import time

import numpy as np

from .. import pretrained
from ..backend import to_device
from ..data import Corpus, lm_batches
from ..engine import no_grad
from ..memory import MethodConfig, TrainConfig as MemTrainConfig, course_figures, estimate_memory
from ..memory_measure import compare, measure_training_step
from ..optim import AdamW
from ..peft import LoraConfig, get_peft_model
from ..quant.modules import quantize_model
from ..train import TrainConfig, train
from ._common import Report, finish, parse_args, save_figure

METHODS = ("full", "lora", "qlora")
LR = {"full": 1e-3, "lora": 3e-3, "qlora": 3e-3}  # peak learning rates (cosine, 5% warmup)
LORA_R, LORA_ALPHA = 8, 16  # LoRA rank and alpha, on every linear layer of every block
LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _settings(args) -> dict:
    if args.device == "cuda":
        size = args.extra.size or "small"
        return dict(size=size, steps=80 if args.quick else 600, batch=16, block=256, val_batches=10,
                    corpus_bytes=20_000_000, compute_dtype="float16")
    size = args.extra.size or "tiny"
    return dict(size=size, steps=30 if args.quick else 400, batch=8, block=64 if args.quick else 128,
                val_batches=4 if args.quick else 12, corpus_bytes=1_000_000 if args.quick else 4_000_000,
                compute_dtype="float32")


def build(method: str, base, compute_dtype: str = "float32", seed: int = 0):
    """The model to train for ``method``: a copy of ``base`` with its method applied."""
    model = copy.deepcopy(base)
    if method == "full":
        return model
    if method == "qlora":
        quantize_model(model, quant_type="nf4", blocksize=64, compress_statistics=True,
                       compute_dtype=compute_dtype, verbose=False)
    cfg = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=list(LINEARS), seed=seed)
    return get_peft_model(model, cfg)


def _val_loss(model, tokens, block, batches) -> float:
    return pretrained.validation_loss(model, tokens, block, batch_size=8, max_batches=batches)


def main(argv=None) -> dict:
    args = parse_args(argv, __doc__.split("\n")[0], _add_arguments)
    s = _settings(args)
    rep = Report("QLoRA: a 4-bit base, LoRA on every linear layer, and the memory it saves"
                 + (" (quick mode)" if args.quick else ""))

    # 1. memory arithmetic --------------------------------------------------------------
    rep.section("1. Memory arithmetic of the course, computed from its inputs")
    figs = course_figures()
    rep.table([(f.case, f.unit, f.course, f.minipeft) for f in figs], ("case", "unit", "course", "minipeft"))

    # 2. the three methods on one base and one task ------------------------------------
    base, meta = pretrained.load(s["size"], "english", device=args.device, quick=args.quick, return_meta=True)
    data = Corpus.load("python", max_bytes=s["corpus_bytes"], val_max_bytes=200_000)
    train_tok, val_tok = to_device(data.train, args.device), to_device(data.val, args.device)
    rng = np.random.default_rng(args.seed)
    probe = lm_batches(train_tok, s["batch"], s["block"], rng)  # the batch whose step is measured
    base_val = _val_loss(base, val_tok, s["block"], s["val_batches"])
    rep.section(f"2. Adapting the '{s['size']}' English base to Python code ({s['steps']} steps each)")
    rep.text(f"base: {base.num_parameters():,} parameters, pretrained to {meta['val_loss']:.3f} nats/token "
             f"on English; on Python code it starts at {base_val:.3f}.")
    results, curves, memory = {}, {}, {}
    for method in METHODS:
        model = build(method, base, s["compute_dtype"], args.seed)
        trainable = sum(p.size for p in model.parameters() if p.requires_grad)
        # one measured step on a separate copy, so training below starts from the same state
        probe_model = copy.deepcopy(model)
        opt = AdamW([p for p in probe_model.parameters() if p.requires_grad], lr=1e-9)
        measured = measure_training_step(probe_model, probe, opt)
        predicted = estimate_memory(base.config, _method_config(method),
                                    MemTrainConfig(batch_size=s["batch"], seq_len=s["block"], ledger_view=True))
        del probe_model, opt
        tc = TrainConfig(max_steps=s["steps"], batch_size=s["batch"], lr=LR[method], schedule="cosine",
                         warmup_steps=max(1, s["steps"] // 20), weight_decay=0.0, grad_clip=1.0,
                         eval_every=max(1, s["steps"] // 8), seed=args.seed, progress=True)
        t0 = time.perf_counter()
        res = train(model, lambda r: lm_batches(train_tok, s["batch"], s["block"], r), config=tc,
                    eval_fn=lambda m: _val_loss(m, val_tok, s["block"], s["val_batches"]))
        seconds = time.perf_counter() - t0
        val = _val_loss(model, val_tok, s["block"], s["val_batches"])
        results[method] = dict(model=model, trainable=trainable, val_loss=val, measured=measured,
                               predicted=predicted, sec_per_step=seconds / s["steps"])
        curves[method] = ([0] + [st for st, _ in res.eval_history],
                          [base_val] + [m["val_loss"] for _, m in res.eval_history])
        memory[method] = (predicted, measured)

    total = base.num_parameters()
    rep.table([(m, r["trainable"], f"{100 * r['trainable'] / total:.2f}%", base_val, r["val_loss"],
                f"{1000 * r['sec_per_step']:.0f}") for m, r in results.items()],
              ("method", "trainable", "of base", "val before", "val after", "ms/step"))
    gap = results["qlora"]["val_loss"] - results["lora"]["val_loss"]
    rep.text(f"QLoRA ends {gap:+.3f} nats/token from LoRA; full fine-tuning "
             f"{results['full']['val_loss'] - results['lora']['val_loss']:+.3f}.")

    rep.section(f"3. One training step's memory (batch {s['batch']} x {s['block']} tokens): predicted vs measured")
    worst = 0.0
    for method, (pred, meas) in memory.items():
        rows = compare(pred, meas)
        rep.text(f"{method}:")
        rep.table([(n, p, m, r) for n, p, m, r in rows], ("  category", "predicted B", "measured B", "ratio"))
        for n, p, m, _ in rows:
            if p:
                worst = max(worst, abs(m / p - 1))
        if meas.device_peak:
            rep.text(f"  GPU memory pool peak during the step: {meas.device_peak:,} B")
    rep.text(f"largest deviation of a measured category from its prediction: {100 * worst:.1f}%")

    # 3. optimizers ----------------------------------------------------------------------
    rep.section("4. Optimizer state for full fine-tuning: AdamW, 8-bit AdamW, paged AdamW")
    opt_rows = _optimizer_states(base, probe)
    rep.table(opt_rows, ("optimizer", "state bytes", "on device at peak", "note"))

    # 4. merging QLoRA -------------------------------------------------------------------
    rep.section("5. Merging the QLoRA adapter")
    merge = _merge_study(results["qlora"]["model"], base, val_tok, s)
    rep.table([(k, v) for k, v in merge.items()], ("model", "val loss"))
    rep.text("Merged into the dequantized NF4 weights, the model is the one that was trained (same loss up to "
             "float rounding). Merged into the original full-precision base, it is not: the adapter learned to "
             "correct the NF4 base's rounding, which the original weights do not have. Quantizing the merged "
             "weights to NF4 again rounds the sum once more.")

    from ..plotting import loss_curves, memory_breakdown

    p1 = save_figure(loss_curves(curves, hlines={"base model": base_val},
                                 title="Adapting the English base to Python code"), args, "qlora_loss")
    p2 = save_figure(memory_breakdown({m: meas.as_dict() for m, (_, meas) in memory.items()},
                                      {m: pred.as_dict() for m, (pred, _) in memory.items()},
                                      title="One training step: measured memory by category"),
                     args, "qlora_memory")
    for p in (p1, p2):
        if p:
            rep.text(f"figure: {p}")
    rep.done()
    out = {m: {"trainable": r["trainable"], "val_loss": r["val_loss"], "sec_per_step": r["sec_per_step"],
               "measured": r["measured"].as_dict(), "predicted": r["predicted"].as_dict()}
           for m, r in results.items()}
    return finish({"base_val_loss": base_val, "methods": out, "max_memory_deviation": worst,
                   "optimizers": [list(r) for r in opt_rows], "merge": merge,
                   "course_figures": [(f.case, f.course, f.minipeft) for f in figs]}, args)


def _method_config(method: str) -> MethodConfig:
    if method == "full":
        return MethodConfig(method="full")
    return MethodConfig(method=method, targets=LINEARS, r=LORA_R, blocksize=64, double_quant=True)


def _optimizer_states(base, batch) -> list[tuple]:
    from ..optim import AdamW8bit, PagedAdamW

    rows = []
    for name, make in (("AdamW (32-bit)", lambda ps: AdamW(ps, lr=1e-4)),
                       ("AdamW8bit", lambda ps: AdamW8bit(ps, lr=1e-4)),
                       ("PagedAdamW", lambda ps: PagedAdamW(ps, lr=1e-4, page_size=PAGE,
                                                            device_budget_bytes=_budget(base)))):
        model = copy.deepcopy(base)
        opt = make(list(model.parameters()))
        meas = measure_training_step(model, batch, opt)
        peak, note = meas.optimizer_state, ""
        if name == "PagedAdamW":
            stats = opt.paging_stats()
            peak = stats["peak_device_bytes"]
            note = f"{stats['page_ins']} page-ins of {stats['pages']} pages; budget {stats['device_budget_bytes']:,} B"
        elif name == "AdamW8bit":
            note = "tensors < 4096 elements keep 32-bit state"
        rows.append((name, meas.optimizer_state, peak, note))
    return rows


PAGE = 4096  # elements per page of paged optimizer state


def _budget(base) -> int:
    """A device budget for paged state: a quarter of what 32-bit AdamW state needs (>= 2 pages)."""
    return max(8 * base.num_parameters() // 4, 2 * 8 * PAGE)


def _merge_study(qlora_model, base, val_tok, s) -> dict:
    """Validation loss of the QLoRA model as trained and after each way of merging it."""
    out = {"QLoRA as trained (NF4 base + LoRA)": _val_loss(qlora_model, val_tok, s["block"], s["val_batches"])}
    deltas = {}
    with no_grad():
        for name, m in qlora_model.named_modules():
            if hasattr(m, "get_delta_weight") and hasattr(m, "lora_A"):
                key = name.split("base_model.model.", 1)[-1]
                deltas[key] = (m.get_delta_weight("default").data, m.base_weight())
    dequant = copy.deepcopy(base)
    original = copy.deepcopy(base)
    for key, (delta, w_nf4) in deltas.items():
        dequant.get_submodule(key).weight.data = (w_nf4 + delta).astype(np.float32)
        lin = original.get_submodule(key)
        lin.weight.data = lin.weight.data + delta
    out["merged into the dequantized NF4 base"] = _val_loss(dequant, val_tok, s["block"], s["val_batches"])
    out["merged into the original fp32 base"] = _val_loss(original, val_tok, s["block"], s["val_batches"])
    requant = copy.deepcopy(dequant)
    quantize_model(requant, quant_type="nf4", blocksize=64, compress_statistics=True, verbose=False)
    out["merged, then re-quantized to NF4"] = _val_loss(requant, val_tok, s["block"], s["val_batches"])
    out["original base (no adapter)"] = _val_loss(base, val_tok, s["block"], s["val_batches"])
    return out


def _add_arguments(p):
    p.add_argument("--size", default=None, choices=sorted(pretrained.SIZES),
                   help="base model size (default: tiny on the CPU, small on a GPU)")


if __name__ == "__main__":
    main()
