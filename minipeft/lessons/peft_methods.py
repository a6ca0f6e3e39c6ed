"""Lesson: every PEFT method on one task — parameters, loss, speed, memory — and when adapters win.

``python -m minipeft.lessons.peft_methods [--quick] [--device cuda] [--figures DIR] [--parts 123] [--jobs N]``

One pretrained base (minipeft's English model, ``minipeft.pretrained``) is adapted to one
downstream distribution, Python code from the local standard library, by every method of
the course through the one API ``get_peft_model`` and the one training loop:

1. **All methods, one budget.** Full fine-tuning; the top blocks only (FT-TOP2, Li & Liang
   2021, Table 1); BitFit (Ben Zaken et al. 2021); LoRA (Hu et al. 2021, eq. 3), rsLoRA
   (α/√r, Kalajdzievski 2023), DoRA (Liu et al. 2024, eq. 5); LoHa, LoKr; VeRA (Kopiczko
   et al. 2023); Houlsby and Pfeiffer adapters; (IA)³ (Liu et al. 2022, §3.3); prefix tuning
   trained through its MLP reparameterization and stored without it (Li & Liang §4.3); and
   prompt tuning (Lester et al. 2021). Each gets the same steps, batches and schedule and
   its own peak learning rate (``LR``), and the table shows measured numbers only:
   trainable parameters, validation loss, ms/step and tokens/s, and one real step's memory
   by category (``memory_measure``). The lesson checks that every method lowers the base
   model's validation loss, and says so when one does not.
2. **Adapters vs full fine-tuning** (He et al. 2021, the course's "adapters > FT with less
   data" and "adapters are less sensitive to the learning rate"): Houlsby adapters and full
   fine-tuning, each at its own LR, on 1k ... 1M training tokens, 3 seeds (data slice,
   batches, init), mean and spread. Early stopping (``early_stopping.EarlyStopping``) watches one
   half of the validation text and counts only evaluations after warm-up; the number
   reported is the other half's loss at the step it selected. Then a learning-rate sweep
   of both, over the same factors around each method's own LR, 3 seeds.
3. **Prompt tuning vs model size** (Lester et al. 2021, Fig. 1: the gap to model tuning
   closes as the model grows): prompt tuning and full fine-tuning on bases of growing size.
   On the CPU the bases are ``tiny`` and a ``small``-shaped model pretrained with tiny's
   recipe (same steps and tokens, as Lester et al.'s T5 sizes; cached by this lesson, about
   4 minutes once): two sizes, as the report says, because a third costs ~50x tiny's
   compute; with ``--device cuda`` the cached ``tiny``, ``small`` and ``medium``.

Learning rates (``LR``): chosen once per method by a sweep in steps of about 3x at the CPU
default budget, seed 0, keeping the lowest final validation loss (ranges beside ``LR``);
``--lr METHOD=VALUE`` overrides one to check. With a short budget every method wants a
large rate, and methods that train few parameters, each of which moves the model a lot
(scaling vectors, biases, VeRA's vectors), want the largest.
"""
from __future__ import annotations

import copy
import json
import time

import numpy as np

from .. import pretrained
from ..backend import synchronize, to_device
from ..data import Corpus, lm_batches
from ..gpt import GPT, GPTConfig
from ..memory import MethodConfig, StepSetup, estimate_memory, format_bytes
from ..memory_measure import measure_training_step
from ..optim import AdamW
from ..peft import remove_reparameterization
from ..train import TrainConfig, train
from ._peft_adapters import (LR_LADDER, PAIR, STOPPING_RULE, adapter_verdicts, data_and_lr,  # noqa: F401 (API)
                             early_stopped_run, lr_grid, lr_sensitivity, lr_sensitivity_over_seeds, lr_sweep,
                             report_adapters, split_validation)
from ._peft_recipes import (LINEARS, LR, METHODS, PREFIX_TOKENS, PROMPT_TEXT, PROMPT_TOKENS,  # noqa: F401 (API)
                            TABLE, build, fine_tune, log, method_config, scored_tokens, train_config, val_loss,
                            warmup_steps)
from ._common import Report, finish, parse_args, save_figure

_GPU_SCALE_SIZES = ("tiny", "small", "medium")  # part 3's bases with --device cuda (at least 3, Lester et al.'s trend)

# Course numbers (lecture notes; methods.md §1, §7, §18.3): trainable share in the LoRA paper's
# GPT-2 M E2E table (354.92M parameters), Houlsby's GLUE result, LoRA's GPT-3 savings.
GPT2M = 354.92e6
COURSE_SHARE = {"full": 1.0, "top_k": 25.19e6 / GPT2M, "lora": 0.35e6 / GPT2M, "houlsby": 0.036,
                "prefix": 0.35e6 / GPT2M}


def _settings(args) -> dict:
    """The budgets of each mode. Part 2: ``data_seeds``/``lr_seeds`` seeds (data draw, batches, init),
    ``lr_offsets`` rungs of the 1-3 LR ladder around each method's own LR; ``stop_batches`` of the
    stopping slice per early-stopping evaluation, ``val_batches`` of the reported slice."""
    s = dict(seed=args.seed, device=args.device, quick=args.quick)
    if args.quick:
        return {**s, "size": "tiny", "steps": 6, "batch": 4, "block": 32, "val_batches": 2, "stop_batches": 1,
                "corpus_bytes": 300_000, "data_sizes": (1_000, 10_000), "data_steps": 8, "eval_every": 2,
                "patience": 2, "data_seeds": 2, "lr_offsets": (-1, 1), "lr_seeds": 2, "lr_steps": 4,
                "scale_sizes": ("tiny", "small"), "scale_steps": 6, "scale_block": 32, "time_rounds": 1,
                "time_steps": 1}
    lr_offsets = (-2, -1, 0, 1, 2)  # 100x range centred on the method's own LR
    if args.device == "cuda":
        return {**s, "size": "small", "steps": 1000, "batch": 16, "block": 192, "val_batches": 20,
                "stop_batches": 10, "corpus_bytes": 20_000_000,
                "data_sizes": (1_000, 10_000, 100_000, 1_000_000, 10_000_000), "data_steps": 2000, "eval_every": 50,
                "patience": 4, "data_seeds": 3, "lr_offsets": lr_offsets, "lr_seeds": 3, "lr_steps": 600,
                "scale_sizes": _GPU_SCALE_SIZES, "scale_steps": 1000, "scale_block": 96,
                "time_rounds": 5, "time_steps": 5}
    return {**s, "size": "tiny", "steps": 300, "batch": 8, "block": 96, "val_batches": 16, "stop_batches": 8,
            "corpus_bytes": 2_000_000, "data_sizes": (1_000, 10_000, 100_000, 1_000_000), "data_steps": 300,
            "eval_every": 20, "patience": 3, "data_seeds": 3, "lr_offsets": lr_offsets, "lr_seeds": 3,
            "lr_steps": 100, "scale_sizes": ("tiny", "small"), "scale_steps": 300, "scale_block": 96,
            "time_rounds": 7, "time_steps": 5}


# ---- 1. every method on one task --------------------------------------------------------------
def compare_methods(base, train_tok, val_tok, s, lrs) -> dict:
    rng = np.random.default_rng(s["seed"])
    probe = lm_batches(train_tok, s["batch"], s["block"], rng)  # the batch whose step is measured and timed
    total = base.num_parameters()
    out, timed = {}, {}
    for name in METHODS:
        t0 = time.perf_counter()
        model = build(name, base, s["seed"])
        trainable = model.get_nb_trainable_parameters()[0]
        probe_model = copy.deepcopy(model)  # measure and time steps on a copy: training starts untouched
        opt = AdamW([p for p in probe_model.parameters() if p.requires_grad], lr=1e-12)
        mem = measure_training_step(probe_model, probe, opt)
        timed[name] = (probe_model, opt)
        r = fine_tune(model, train_tok, val_tok, s, lrs[name], s["steps"], name=name)
        extra = {}
        if name == "prefix":  # keep only the prefix the MLP computes (what is stored and served)
            extra["val_with_mlp"] = r["val_loss"]
            remove_reparameterization(model)
            r["val_loss"] = val_loss(model, val_tok, s)
        kept = int(sum(a.size for a in model.peft_state_dict().values()))
        out[name] = dict(label=METHODS[name][0], family=METHODS[name][1], lr=lrs[name], trainable=int(trainable),
                         trainable_pct=100 * trainable / total, kept=kept, val_loss=r["val_loss"],
                         train_ms_per_step=1000 * r["sec_per_step"], memory=mem.as_dict(), diverged=r["diverged"],
                         **extra)
        log(f"[peft_methods] part 1 {name:9s} seed {s['seed']} lr {lrs[name]:.0e}  val {r['val_loss']:.4f}  "
            f"({time.perf_counter() - t0:.0f} s)")
    ms = time_steps(timed, probe, s["time_rounds"], s["time_steps"])
    for name, r in out.items():
        r["ms_per_step"] = ms[name]
        r["tokens_per_sec"] = 1000 * s["batch"] * s["block"] / ms[name]
    return out


def time_steps(models: dict, batch, rounds: int, steps: int) -> dict:
    """Median ms per training step (forward, backward, AdamW) of each ``(model, optimizer)``.

    Round-robin: every round times ``steps`` steps of each method in turn, after one
    warm-up round, so a change in the machine's load hits every method alike.
    """
    x, y = batch
    times = {n: [] for n in models}
    for r in range(rounds + 1):
        for n, (model, opt) in models.items():
            synchronize(model.device)
            t0 = time.perf_counter()
            for _ in range(steps):
                opt.zero_grad()
                model(x, targets=y).loss.backward()
                opt.step()
            synchronize(model.device)
            if r:  # round 0 is the warm-up
                times[n].append((time.perf_counter() - t0) / steps)
    return {n: 1000 * float(np.median(t)) for n, t in times.items()}


def predicted_memory(config, s) -> dict:
    """The calculator's one-step total (bytes) for the methods it models (the method table's ``memory``)."""
    tc = StepSetup(batch_size=s["batch"], seq_len=s["block"], ledger_view=True)
    return {n: estimate_memory(config, MethodConfig(**r.memory(config.n_layer, config.n_embd)), tc).total
            for n, r in TABLE.items() if r.memory is not None}


# ---- 3. prompt tuning's gap to full fine-tuning as the base grows --------------------------------
def scale_base(size: str, s):
    """The base of ``size`` for the scale study, and its pretraining record.

    As Lester et al.'s T5 models, every size is pretrained on the same data for the same
    steps: on the CPU with ``tiny``'s recipe (the cached ``tiny`` itself; a larger shape
    trained with it once and cached by this lesson); on a GPU, the cached bases with their
    own recipes.
    """
    if s["device"] == "cuda":
        return pretrained.load(size, "english", device="cuda", return_meta=True)
    if s["quick"]:  # a 3-step model of each size, not cached
        return pretrain_with_tiny_recipe(size, s["seed"], steps=3, batch=4, block=64, max_bytes=300_000)
    if size == "tiny":
        return pretrained.load("tiny", "english", return_meta=True)
    d = pretrained.model_dir(size, "english")
    d = d.with_name(f"{d.name}-tiny-recipe-{pretrained.SIZES['tiny'].block_size}pos")
    if (d / "meta.json").exists() and (d / "model.safetensors").exists():
        return GPT.from_hf(d), json.loads((d / "meta.json").read_text())
    log(f"[peft_methods] part 3: pretraining a '{size}'-shaped base with tiny's recipe (once; cached in {d})")
    model, meta = pretrain_with_tiny_recipe(size, s["seed"])
    model.save_hf(d)
    (d / "meta.json").write_text(json.dumps(meta, indent=1))
    return model, meta


def _shape(size: str) -> str:
    """The GPT shape (``minipeft.sizes``: 'T0', 'T1', ...) of base size ``size``."""
    spec = pretrained.SIZES[size]
    return getattr(spec, "shape", None) or spec.preset  # `preset` in the table's older form


def pretrain_with_tiny_recipe(size: str, seed: int, steps=None, batch=None, block=None, max_bytes=None):
    """A GPT of ``size``'s layers and width pretrained on English with tiny's steps, batches and windows.

    Its position table is as long as tiny's windows (a base knows exactly the positions it
    was trained on); the size's own peak LR; ``pretrained.pretrain``'s settings otherwise.
    ``steps``/``batch``/``block``/``max_bytes`` shrink it (quick).
    """
    t, own = pretrained.SIZES["tiny"], pretrained.SIZES[size]
    n_steps, block = steps or t.max_steps, block or t.block_size
    spec = dict(shape=_shape(size), lr=own.lr, max_steps=n_steps, batch_size=batch or t.batch_size, block_size=block,
                warmup_steps=min(t.warmup_steps, n_steps // 10), max_bytes=max_bytes or t.max_bytes)
    data = Corpus.load("english", max_bytes=spec["max_bytes"], val_max_bytes=max_bytes)
    model = GPT(GPTConfig.preset(spec["shape"], vocab_size=data.vocab_size, block_size=block), seed=seed)
    tc = TrainConfig(max_steps=n_steps, batch_size=spec["batch_size"], lr=spec["lr"], schedule="cosine",
                     warmup_steps=spec["warmup_steps"], min_lr=spec["lr"] / 10, weight_decay=0.1, grad_clip=1.0,
                     seed=seed, progress=steps is None, run_name=f"pretrain {size} (tiny recipe) seed {seed}")
    t0 = time.perf_counter()
    train(model, lambda r: lm_batches(data.train, spec["batch_size"], block, r), config=tc)
    val = pretrained.validation_loss(model, data.val, block, max_batches=20 if steps is None else 1)
    return model, {"name": size, "recipe": "tiny", "spec": spec, "val_loss": val, "seconds": time.perf_counter() - t0}


def scale_note(s, rows: list) -> str:
    """How many base sizes part 3 used, and (on the CPU) why not a third, from the shapes' parameter counts."""
    used = ", ".join(r["size"] for r in rows)
    if s["device"] == "cuda":
        return f"{len(rows)} base sizes ({used}), each pretrained with its own recipe (minipeft.pretrained)."
    nxt = next((n for n in ("small", "medium", "large") if n not in s["scale_sizes"]), None)
    if nxt is None or not rows:
        return f"{len(rows)} base sizes ({used})."
    n_next = GPT(GPTConfig.preset(_shape(nxt), block_size=8), seed=0).num_parameters(non_embedding=True)
    ratio = n_next / rows[0]["params"]
    sec = rows[0].get("pretrain_seconds")
    cost = (f" (tiny's took {sec:.0f} s here: about {ratio * sec / 60:.0f} min for '{nxt}')"
            if sec and not s["quick"] else "")
    return (f"{len(rows)} base sizes on the CPU ({used}), not {len(rows) + 1}: a '{nxt}'-shaped base has {n_next:,} "
            f"non-embedding parameters, {ratio:.0f}x tiny's, so each of its pretraining and fine-tuning steps costs "
            f"about {ratio:.0f}x tiny's{cost}, beyond a minutes-long CPU run; `--device cuda` runs "
            f"{len(_GPU_SCALE_SIZES)} ({', '.join(_GPU_SCALE_SIZES)}).")


def prompt_gap_vs_size(train_tok, val_tok, s, lrs) -> list[dict]:
    s = dict(s, block=s["scale_block"])  # one window for every size: tiny's 128 positions minus the prompt
    rows = []
    for size in s["scale_sizes"]:
        base, meta = scale_base(size, s)
        sp = meta["spec"]
        base_val = val_loss(base, val_tok, s)
        row = dict(size=size, params=int(base.num_parameters(non_embedding=True)), english_val=meta["val_loss"],
                   pretrain_steps=int(sp["max_steps"]),
                   pretrain_tokens=int(sp["max_steps"] * sp["batch_size"] * sp["block_size"]), base=base_val,
                   pretrain_seconds=meta.get("seconds"))
        for m in ("full", "prompt"):
            row[m] = fine_tune(build(m, base, s["seed"]), train_tok, val_tok, s, lrs[m], s["scale_steps"],
                               name=f"{m} on {size}")["val_loss"]
            row[f"lr_{m}"] = lrs[m]
        row["gap"] = row["prompt"] - row["full"]
        gain = row["base"] - row["full"]
        row["recovered"] = (row["base"] - row["prompt"]) / gain if gain > 0 else float("nan")
        rows.append(row)
        log(f"[peft_methods] part 3 base {size} seed {s['seed']}: untuned {base_val:.4f}, full {row['full']:.4f}, "
            f"prompt {row['prompt']:.4f}")
    return rows


# ---- the lesson -------------------------------------------------------------------------------
def _task_data(s):
    """(base, its pretraining meta, train tokens, validation tokens) of the task: the cached base and the
    Python corpus."""
    base, meta = pretrained.load(s["size"], "english", device=s["device"], quick=s["quick"], return_meta=True)
    data = Corpus.load("python", max_bytes=s["corpus_bytes"], val_max_bytes=200_000)
    return base, meta, to_device(data.train, s["device"]), to_device(data.val, s["device"])


def compute_part(task, data=None) -> tuple[str, dict, float]:
    """Part ``'1'``, ``'2'`` or ``'3'`` of the lesson: (part, its raw result, seconds). Module-level, so a
    spawned worker process can run it (``--jobs``); there it loads the base and the corpus itself
    (``data``: what :func:`_task_data` returned, in this process)."""
    part, s, lrs = task
    t0 = time.perf_counter()
    base, _, train_tok, val_tok = data if data is not None else _task_data(s)
    if part == "3":
        out = {"rows": prompt_gap_vs_size(train_tok, val_tok, s, lrs)}
    else:
        out = (compare_methods if part == "1" else data_and_lr)(base, train_tok, val_tok, s, lrs)
    return part, out, time.perf_counter() - t0


def compute_parts(parts, s, lrs, jobs: int, data=None) -> dict:
    """``{part: (result, seconds)}``: in this process (on ``data``), or in ``jobs`` spawned processes
    (longest part first)."""
    order = [p for p in ("1", "3", "2") if p in parts]  # part 1 is the longest, then 3 (it pretrains a base once)
    tasks = [(p, s, lrs) for p in order]
    if jobs == 1 or len(tasks) == 1:
        return {p: (out, sec) for p, out, sec in (compute_part(t, data) for t in tasks)}
    from ..parallel import spawn_map
    from . import peft_methods  # pickled by its module's name, also when this file runs as __main__ (-m)

    log(f"[peft_methods] parts {', '.join(order)} in {min(jobs, len(tasks))} processes")
    return {p: (out, sec) for _, (p, out, sec) in spawn_map(peft_methods.compute_part, tasks, min(jobs, len(tasks)),
                                                            env={"OPENBLAS_NUM_THREADS": "1"})}


def main(argv=None) -> dict:
    args = parse_args(argv, __doc__.split("\n")[0], _add_arguments)
    s = _settings(args)
    lrs = dict(LR, **_parse_lr(args.extra.lr))
    parts = set(args.extra.parts)
    jobs = args.extra.jobs if args.extra.jobs is not None else (2 if args.device == "cpu" and not args.quick else 1)
    if jobs < 1:
        raise SystemExit(f"--jobs {jobs}: must be at least 1")
    rep = Report("Every PEFT method on one task, and when adapters beat full fine-tuning"
                 + (" (quick mode: seconds-long runs, numbers not meaningful)" if args.quick else ""))
    task = _task_data(s)
    base, meta, train_tok, val_tok = task
    base_val = val_loss(base, val_tok, s)
    done = compute_parts(parts, s, lrs, jobs, task)
    result = {"size": s["size"], "steps": s["steps"], "base_val_loss": base_val, "lr": lrs, "seconds": {}}
    rep.text(f"base: '{s['size']}' ({base.num_parameters():,} parameters, {base.config.n_layer} blocks, "
             f"d {base.config.n_embd}), pretrained to {meta['val_loss']:.3f} nats/token on English; on Python "
             f"code it starts at {base_val:.3f}.\ntask: next-byte prediction on {len(train_tok):,} bytes of "
             f"standard-library code; validation {s['val_batches'] * 8 * s['block']:,} held-out bytes.")

    if "1" in parts:
        res, result["seconds"]["part1"] = done["1"]
        predicted = predicted_memory(base.config, s)
        _report_methods(rep, res, base_val, s, predicted)
        result["methods"] = res
        result["not_lowered"] = [n for n, r in res.items() if not r["val_loss"] < base_val]
        result["memory_predicted"] = predicted
        from .figures.peft_methods import peft_methods_tradeoff

        save_figure(peft_methods_tradeoff(res, base_val, title=f"{len(res)} methods on one task "
                                          f"({s['steps']} steps, '{s['size']}' base)"), args, "peft_methods")
    if "2" in parts:
        r2, result["seconds"]["part2"] = done["2"]
        report_adapters(rep, r2, s)
        result["adapters_vs_full"] = r2
        from .figures.peft_methods import adapters_vs_full

        points = {m: [dict(tokens=p["tokens"], best_val=p["reported_mean"], std=p["reported_std"]) for p in pts]
                  for m, pts in r2["data"].items()}
        save_figure(adapters_vs_full(points, r2["lr"], r2["base_reported"], labels={m: METHODS[m][0] for m in PAIR},
                                     title="left: reported-slice loss at the checkpoint the stopping slice selected; "
                                           "right: mean final loss over seeds"), args, "peft_methods_adapters")
    if "3" in parts:
        rows, result["seconds"]["part3"] = done["3"][0]["rows"], done["3"][1]
        note = scale_note(s, rows)
        _report_scale(rep, rows, s, note)
        result["scale"] = rows
        result["scale_note"] = note
        result["prompt_gap_by_size"] = {r["size"]: r["gap"] for r in rows}  # prompt - full, nats/token
        from .figures.peft_methods import prompt_tuning_scale

        save_figure(prompt_tuning_scale(rows), args, "peft_methods_scale")
    if args.figures is not None:
        rep.text(f"\nfigures: {args.figures}/peft_methods*.png")
    finish(result, args, report=rep, lesson="peft_methods")  # the course's claims judged on this run, JSON
    if "1" in parts and result["not_lowered"] and not args.quick:
        raise AssertionError(f"these methods did not lower the base's validation loss ({base_val:.4f}): "
                             f"{result['not_lowered']}")
    return result


def _report_methods(rep, res, base_val, s, predicted) -> None:
    rep.section(f"1. Every method, {s['steps']} steps of {s['batch']} x {s['block']} tokens, its own peak LR")
    rep.text("recipe: AdamW (no weight decay), cosine to 0 after a 5% warm-up, clip 1; LR: each method's own, the best "
             "final validation loss of a sweep in ~3x steps\n(tiny base, CPU default budget, seed 0; `--lr METHOD=VALUE` "
             "overrides one).")
    rows = []
    for r in res.values():
        m = r["memory"]
        rows.append((r["label"], r["trainable"], f"{r['trainable_pct']:.2f}%", r["kept"], f"{r['lr']:.0e}",
                     f"{r['val_loss']:.4f}", f"{r['val_loss'] - base_val:+.3f}", f"{r['ms_per_step']:.1f}",
                     f"{r['tokens_per_sec']:,.0f}", format_bytes(_state(r)), format_bytes(m["activations"]),
                     format_bytes(m["total"])))
    rep.table(rows, ("method", "trainable", "share", "stored", "LR", "val loss", "vs base", "ms/step", "tok/s",
                     "train state", "activations", "step total"))
    rep.text("trainable: parameters that get gradients; stored: what the adapter file keeps (prefix tuning drops "
             "its MLP, VeRA keeps only b and d:\n  A and B come back from the seed). train state: trainable weights "
             "+ gradients + AdamW moments; activations: bytes saved for backward\n  (engine ledger); step total adds "
             f"the frozen weights; all measured on one step. ms/step, tok/s: median of {s['time_rounds']} rounds "
             f"of {s['time_steps']} steps,\n  timed round-robin over the methods after training.")
    if "prefix" in res:
        p = res["prefix"]
        rep.text(f"prefix tuning: val {p['val_with_mlp']:.5f} with the MLP, {p['val_loss']:.5f} after replacing it "
                 f"by the prefix it computes ({p['trainable']:,} -> {p['kept']:,} parameters).")
    rep.text("calculator (minipeft.memory) vs measured step total: " + ", ".join(
        f"{res[n]['label']} {res[n]['memory']['total'] / v:.3f}x" for n, v in predicted.items() if n in res))
    bad = [r["label"] for r in res.values() if not r["val_loss"] < base_val]
    rep.text("every method lowered the base's validation loss." if not bad else
             f"!! NOT every method lowered the base's validation loss ({base_val:.4f}): {', '.join(bad)}")
    rows = [(f"trainable share, {res[n]['label']}", f"{100 * c:.2f}%", f"{res[n]['trainable_pct']:.2f}%")
            for n, c in COURSE_SHARE.items() if n in res]
    if {"full", "houlsby", "lora"} <= set(res):
        f, h, lo = res["full"], res["houlsby"], res["lora"]
        rows += [("Houlsby vs full (GLUE points; here nats)", "80.0 vs 80.4 (-0.4)",
                  f"{h['val_loss']:.3f} vs {f['val_loss']:.3f} ({h['val_loss'] - f['val_loss']:+.3f})"),
                 ("LoRA training speed-up over full", "25% (GPT-3 175B)",
                  f"{100 * (f['ms_per_step'] / lo['ms_per_step'] - 1):+.0f}%"),
                 ("training memory, full / LoRA", "3.4x (1.2 TB / 350 GB)",
                  f"{f['memory']['total'] / lo['memory']['total']:.2f}x")]
    rep.compare(rows)
    if {"full", "lora"} <= set(res):
        f, lo = res["full"], res["lora"]
        rep.text(f"The course's shares are GPT-2 M's (24 blocks, d 1024); on a small base an adapter of the same "
                 f"shape is a larger share.\nMemory: backward still runs through every frozen layer and keeps its "
                 f"activations, which outweigh the weights here;\nLoRA drops the frozen weights' gradients and AdamW "
                 f"moments ({_state(f) / _state(lo):.1f}x less train state) but not the activations "
                 f"({f['memory']['total'] / lo['memory']['total']:.2f}x less in all).\nTimes on a shared CPU vary "
                 f"from run to run by tens of percent; per-op overhead dominates steps this small.")


def _state(r) -> int:
    m = r["memory"]
    return m["weights_trainable"] + m["gradients"] + m["optimizer_state"]


def _report_scale(rep, rows, s, note: str) -> None:
    rep.section(f"3. Prompt tuning vs full fine-tuning as the base grows ({s['scale_steps']} steps each)")
    rep.text(f"bases: {note}\nrecipe: as part 1 (no early stopping), full fine-tuning at LR {rows[0]['lr_full']:.0e}, "
             f"prompt tuning (P={PROMPT_TOKENS}, initialised from text) at {rows[0]['lr_prompt']:.0e}; "
             f"windows of {s['scale_block']} tokens.")
    rep.table([(r["size"], r["params"], f"{r['pretrain_steps']:,} x {r['pretrain_tokens'] // r['pretrain_steps']:,}",
                f"{r['english_val']:.3f}", f"{r['base']:.4f}", f"{r['full']:.4f}", f"{r['prompt']:.4f}",
                f"{r['gap']:+.4f}", f"{100 * r['recovered']:.0f}%") for r in rows],
              ("base", "N (non-emb.)", "pretraining tokens", "English val", "Python: base", "full FT", "prompt",
               "gap", "recovered"))
    rep.text("gap: prompt - full (nats/token); recovered: the share of full fine-tuning's gain over the base that "
             "prompt tuning gets,\n(base - prompt) / (base - full). Every base saw the same pretraining steps and "
             "tokens, as Lester et al.'s T5 models did." if s["device"] != "cuda" else
             "gap: prompt - full (nats/token); recovered: (base - prompt) / (base - full).")
    closes = all(b["recovered"] > a["recovered"] for a, b in zip(rows, rows[1:]))
    narrows = all(b["gap"] < a["gap"] for a, b in zip(rows, rows[1:]))
    rep.compare([("prompt tuning closes the gap as the model grows", "yes; matches model tuning at 11B (T5-XXL)",
                  f"{'yes' if closes else 'no'}: recovers " + " -> ".join(f"{100 * r['recovered']:.0f}%"
                                                                         for r in rows)),
                 ("  the gap in nats/token", "-", f"{'narrows' if narrows else 'does not narrow'}: "
                  + " -> ".join(f"{r['gap']:+.3f}" for r in rows))])
    rep.text(f"Lester et al.'s models span 60M to 11B parameters; ours span {rows[0]['params']:,} to "
             f"{rows[-1]['params']:,} non-embedding parameters, so this is at most the trend's direction"
             + (", and with two sizes a trend is only a difference." if len(rows) < 3 else "."))


def _parse_lr(items) -> dict:
    out = {}
    for it in items or []:
        name, _, val = it.partition("=")
        if name not in METHODS or not val:
            raise ValueError(f"--lr takes METHOD=VALUE with METHOD one of {list(METHODS)}, got {it!r}")
        out[name] = float(val)
    return out


def _add_arguments(p):
    p.add_argument("--lr", action="append", metavar="METHOD=VALUE", help="override a method's peak learning rate")
    p.add_argument("--parts", default="123", help="which parts to run (default 123)")
    p.add_argument("--jobs", type=int, default=None, help="run the parts in this many spawned processes "
                   "(default: 2 on a CPU, the cores of a laptop; 1 on a GPU and in quick mode)")


if __name__ == "__main__":
    main()
