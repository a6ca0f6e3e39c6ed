"""Lesson: every PEFT method on one task — parameters, loss, speed, memory — and when adapters win.

``python -m minipeft.lessons.peft_methods [--quick] [--device cuda] [--figures DIR] [--parts 123]``

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
   fine-tuning on 1k ... 1M training tokens with early stopping on the validation loss, and
   a learning-rate sweep of both.
3. **Prompt tuning vs model size** (Lester et al. 2021, Fig. 1: the gap to model tuning
   closes as the model grows): prompt tuning and full fine-tuning on bases of growing size.
   On the CPU the bases are ``tiny`` and a ``small``-shaped model pretrained with tiny's
   recipe (same steps and tokens, as Lester et al.'s T5 sizes; cached by this lesson, about
   4 minutes once); with ``--device cuda`` the cached ``tiny``, ``small`` and ``medium``.

Learning rates (``LR``): chosen once per method by a sweep in steps of about 3x at the CPU
default budget, seed 0, keeping the lowest final validation loss (ranges beside ``LR``);
``--lr METHOD=VALUE`` overrides one to check. With a short budget every method wants a
large rate, and methods that train few parameters, each of which moves the model a lot
(scaling vectors, biases, VeRA's vectors), want the largest.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time

import numpy as np

from .. import pretrained
from ..backend import synchronize, to_device
from ..data import Corpus, lm_batches
from ..gpt import GPT, GPTConfig
from ..memory import MethodConfig, TrainConfig as MemTrainConfig, estimate_memory, format_bytes
from ..memory_measure import measure_training_step
from ..optim import AdamW
from ..peft import (BitFitConfig, FullFineTuningConfig, HoulsbyConfig, IA3Config, LoHaConfig, LoKrConfig,
                    LoraConfig, PfeifferConfig, PrefixTuningConfig, PromptTuningConfig, TopKBlocksConfig,
                    VeraConfig, get_peft_model, remove_reparameterization)
from ..train import TrainConfig, train
from ._common import Report, finish, parse_args, save_figure

LINEARS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]  # the LoRA family adapts every linear layer
PROMPT_TOKENS = 20  # prompt tuning length (Lester et al.: 1 -> 20 is the big gain)
PREFIX_TOKENS = 10  # prefix length (Li & Liang's table-to-text setting)
PROMPT_TEXT = "Python source code:\n"  # 20 bytes: the prompt starts at their embeddings (the paper's best init)

# name -> (label, family); families are the course's taxonomy (Lialin et al. 2023)
METHODS = {
    "full": ("full fine-tuning", "full"),
    "top_k": ("top-k blocks", "selective"),
    "bitfit": ("BitFit", "selective"),
    "lora": ("LoRA r=8", "reparameterization"),
    "rslora": ("rsLoRA r=8", "reparameterization"),
    "dora": ("DoRA r=8", "reparameterization"),
    "loha": ("LoHa r=4", "reparameterization"),
    "lokr": ("LoKr r=8", "reparameterization"),
    "vera": ("VeRA r=256", "reparameterization"),
    "houlsby": ("Houlsby adapter", "additive: adapters"),
    "pfeiffer": ("Pfeiffer adapter", "additive: adapters"),
    "ia3": ("(IA)^3", "additive: adapters"),
    "prefix": (f"prefix tuning P={PREFIX_TOKENS}", "additive: soft prompts"),
    "prompt": (f"prompt tuning P={PROMPT_TOKENS}", "additive: soft prompts"),
}
# Peak learning rates: per method, the lowest final validation loss of a sweep in steps of about 3x,
# extended until the best lay inside the range (the smaller LR when two ended within 0.002 nats), at the CPU
# default budget (tiny base, 300 steps of 8 x 96 tokens, seed 0). Ranges swept: full 3e-4..1e-2; top-k
# 3e-4..3e-2; BitFit 3e-3..3e-1; LoRA, DoRA 1e-3..3e-2; rsLoRA 1e-3..1e-2; LoHa, LoKr, Houlsby, Pfeiffer
# 1e-3..1e-1; VeRA 3e-3..3e-1; (IA)3 1e-2..3e-1; prefix 1e-3..1e-1; prompt 3e-3..1e-1.
LR = {"full": 3e-3, "top_k": 1e-2, "bitfit": 1e-1, "lora": 1e-2, "rslora": 3e-3, "dora": 1e-2, "loha": 3e-2,
      "lokr": 3e-2, "vera": 1e-1, "houlsby": 3e-2, "pfeiffer": 3e-2, "ia3": 1e-1, "prefix": 3e-2, "prompt": 1e-2}

# Course numbers (lecture notes; methods.md §1, §7, §18.3): trainable share in the LoRA paper's
# GPT-2 M E2E table (354.92M parameters), Houlsby's GLUE result, LoRA's GPT-3 savings.
GPT2M = 354.92e6
COURSE_SHARE = {"full": 1.0, "top_k": 25.19e6 / GPT2M, "lora": 0.35e6 / GPT2M, "houlsby": 0.036,
                "prefix": 0.35e6 / GPT2M}


def method_config(name: str, n_layer: int, n_embd: int, seed: int = 0):
    """The ``PeftConfig`` of method ``name`` for a GPT with ``n_layer`` blocks of width ``n_embd``."""
    m = max(2, n_embd // 8)  # bottleneck width: d/8 (Houlsby's 3.6%-of-parameters regime on our bases)
    cfgs = {
        "full": lambda: FullFineTuningConfig(),
        # FT-TOP2 trains 2 of GPT-2 M's 24 blocks; a 2-block base trains its top 1 (2 would be all of them)
        "top_k": lambda: TopKBlocksConfig(top_k_blocks=min(2, n_layer - 1)),
        "bitfit": lambda: BitFitConfig(),
        "lora": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=LINEARS),
        "rslora": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=LINEARS, use_rslora=True),
        "dora": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=LINEARS, use_dora=True),
        "loha": lambda: LoHaConfig(r=4, alpha=8, target_modules=LINEARS),  # LoRA r=8's parameter count
        "lokr": lambda: LoKrConfig(r=8, alpha=8, target_modules=LINEARS),
        "vera": lambda: VeraConfig(r=256, target_modules=LINEARS, save_projection=False),  # A, B from the seed
        "houlsby": lambda: HoulsbyConfig(adapter_size=m),
        "pfeiffer": lambda: PfeifferConfig(adapter_size=m),
        "ia3": lambda: IA3Config(paper_kv_only=True),  # K, V and the MLP's hidden units, as the paper
        # trained through the MLP (hidden = d); the last Linear starts at 0, so the prefix starts at 0
        "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=PREFIX_TOKENS, prefix_projection=True,
                                             init_weights="zero"),
        "prompt": lambda: PromptTuningConfig(num_virtual_tokens=PROMPT_TOKENS, prompt_tuning_init="TEXT",
                                             prompt_tuning_init_text=PROMPT_TEXT),
    }
    if name not in cfgs:
        raise ValueError(f"unknown method {name!r}; methods: {list(cfgs)}")
    cfg = cfgs[name]()
    cfg.seed = seed
    return cfg


def build(name: str, base: GPT, seed: int = 0):
    """A copy of ``base`` with method ``name`` applied (a ``PeftModel``)."""
    c = base.config
    return get_peft_model(copy.deepcopy(base), method_config(name, c.n_layer, c.n_embd, seed))


def _settings(args) -> dict:
    s = dict(seed=args.seed, device=args.device, quick=args.quick)
    if args.quick:
        return {**s, "size": "tiny", "steps": 6, "batch": 4, "block": 32, "val_batches": 2, "corpus_bytes": 300_000,
                "data_sizes": (1_000, 10_000), "data_steps": 8, "eval_every": 2, "patience": 2, "data_seeds": 1,
                "lr_grid": (1e-3, 1e-2), "lr_steps": 4, "scale_sizes": ("tiny", "small"), "scale_steps": 6,
                "scale_block": 32, "time_rounds": 1, "time_steps": 1}
    lr_grid = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    if args.device == "cuda":
        return {**s, "size": "small", "steps": 1000, "batch": 16, "block": 192, "val_batches": 20,
                "corpus_bytes": 20_000_000, "data_sizes": (1_000, 10_000, 100_000, 1_000_000, 10_000_000),
                "data_steps": 2000, "eval_every": 50, "patience": 4, "data_seeds": 3, "lr_grid": lr_grid,
                "lr_steps": 600, "scale_sizes": ("tiny", "small", "medium"), "scale_steps": 1000, "scale_block": 96,
                "time_rounds": 5, "time_steps": 5}
    return {**s, "size": "tiny", "steps": 300, "batch": 8, "block": 96, "val_batches": 16, "corpus_bytes": 2_000_000,
            "data_sizes": (1_000, 10_000, 100_000, 1_000_000), "data_steps": 300, "eval_every": 20, "patience": 3,
            "data_seeds": 3, "lr_grid": lr_grid, "lr_steps": 150, "scale_sizes": ("tiny", "small"),
            "scale_steps": 300, "scale_block": 96, "time_rounds": 7, "time_steps": 5}


def _val(model, tokens, s) -> float:
    return pretrained.validation_loss(model, tokens, s["block"], batch_size=8, max_batches=s["val_batches"])


def _early_stop(patience: int):
    """A train() callback: stop once ``patience`` evaluations in a row did not beat the best one."""
    def cb(step, info):
        hist = info["result"].eval_history
        if not hist or hist[-1][0] != step:
            return None
        vals = [m["val_loss"] for _, m in hist]
        return len(vals) - 1 - int(np.argmin(vals)) >= patience
    return cb


def fine_tune(model, train_tok, val_tok, s, lr: float, steps: int, eval_every: int = 0, patience: int = 0) -> dict:
    """Train ``model`` (AdamW, cosine, 5% warmup, clip 1, no weight decay); its losses and speed.

    With ``eval_every`` and ``patience``: early stopping, and ``best_val`` is the lowest
    validation loss seen (the checkpoint early stopping keeps).
    """
    tc = TrainConfig(max_steps=steps, batch_size=s["batch"], lr=lr, schedule="cosine",
                     warmup_steps=max(1, steps // 20), weight_decay=0.0, grad_clip=1.0,
                     eval_every=eval_every, seed=s["seed"], progress=False)
    try:
        res = train(model, lambda r: lm_batches(train_tok, s["batch"], s["block"], r), config=tc,
                    eval_fn=(lambda m: _val(m, val_tok, s)) if eval_every else None,
                    callbacks=[_early_stop(patience)] if patience else [])
    except FloatingPointError:  # diverged (too large a learning rate)
        return dict(val_loss=float("nan"), best_val=float("nan"), steps=0, curve=[], sec_per_step=float("nan"),
                    tokens_per_sec=float("nan"), diverged=True)
    curve = [(st, m["val_loss"]) for st, m in res.eval_history]
    val = curve[-1][1] if curve else _val(model, val_tok, s)
    return dict(val_loss=val, best_val=min([v for _, v in curve] or [val]), steps=res.final["steps"], curve=curve,
                sec_per_step=res.final["sec_per_step"], tokens_per_sec=res.final["tokens_per_sec"], diverged=False)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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
        r = fine_tune(model, train_tok, val_tok, s, lrs[name], s["steps"])
        extra = {}
        if name == "prefix":  # keep only the prefix the MLP computes (what is stored and served)
            extra["val_with_mlp"] = r["val_loss"]
            remove_reparameterization(model)
            r["val_loss"] = _val(model, val_tok, s)
        kept = int(sum(a.size for a in model.peft_state_dict().values()))
        out[name] = dict(label=METHODS[name][0], family=METHODS[name][1], lr=lrs[name], trainable=int(trainable),
                         trainable_pct=100 * trainable / total, kept=kept, val_loss=r["val_loss"],
                         train_ms_per_step=1000 * r["sec_per_step"], memory=mem.as_dict(), diverged=r["diverged"],
                         **extra)
        _log(f"[peft_methods] {name:9s} lr {lrs[name]:.0e}  val {r['val_loss']:.4f}  "
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


MEMORY_MODELED = {  # the methods minipeft.memory's calculator models, as it describes them
    "full": lambda c: MethodConfig(method="full"),
    "lora": lambda c: MethodConfig(method="lora", targets=tuple(LINEARS), r=8),
    "prefix": lambda c: MethodConfig(method="prefix", n_virtual_tokens=PREFIX_TOKENS, prefix_projection=True,
                                     encoder_hidden_size=c.n_embd),
    "prompt": lambda c: MethodConfig(method="prompt", n_virtual_tokens=PROMPT_TOKENS),
}


def predicted_memory(config, s) -> dict:
    """The calculator's one-step total (bytes) for the methods it models."""
    tc = MemTrainConfig(batch_size=s["batch"], seq_len=s["block"], ledger_view=True)
    return {n: estimate_memory(config, f(config), tc).total for n, f in MEMORY_MODELED.items()}


# ---- 2. adapters vs full fine-tuning: data size and learning rate -------------------------------
PAIR = ("full", "houlsby")


def data_and_lr(base, train_tok, val_tok, s, lrs) -> dict:
    data = {m: [] for m in PAIR}
    for D in s["data_sizes"]:
        D = min(int(D), len(train_tok))
        # evaluate about four times per epoch (every 2 to eval_every steps): small sets overfit within an epoch
        every = int(np.clip(D // (4 * s["batch"] * s["block"]), 2, s["eval_every"]))
        for m in PAIR:
            best, steps = [], []
            for k in range(s["data_seeds"]):  # each seed: its own D-token slice, batches and init
                seed = s["seed"] + k
                start = int(np.random.default_rng([seed, D]).integers(0, len(train_tok) - D + 1))
                r = fine_tune(build(m, base, seed), train_tok[start:start + D], val_tok, dict(s, seed=seed), lrs[m],
                              s["data_steps"], eval_every=every, patience=s["patience"])
                best.append(r["best_val"])
                steps.append(r["steps"])
            data[m].append(dict(tokens=D, best_val=float(np.mean(best)), std=float(np.std(best)),
                                runs=best, steps=float(np.mean(steps))))
            _log(f"[peft_methods] {m:8s} {D:>9,} tokens: best val {np.mean(best):.4f} +- {np.std(best):.4f} "
                 f"after {np.mean(steps):.0f} steps")
    sweep = {m: {} for m in PAIR}
    for m in PAIR:
        for lr in s["lr_grid"]:
            r = fine_tune(build(m, base, s["seed"]), train_tok, val_tok, s, lr, s["lr_steps"])
            sweep[m][lr] = r["val_loss"]
            _log(f"[peft_methods] {m:8s} lr {lr:.0e}: val {r['val_loss']:.4f}")
    return {"data": data, "lr": sweep}


def lr_sensitivity(losses: dict) -> dict:
    """Spread of the final loss over the LR grid, and how many LRs land within 0.05 nats of the best."""
    v = np.array([x if math.isfinite(x) else np.inf for x in losses.values()])
    best = float(v.min())
    finite = v[np.isfinite(v)]
    spread = float(finite.max() - best) if finite.size else float("nan")  # every LR diverged: no spread
    return dict(best=best, best_lr=float(list(losses)[int(v.argmin())]), spread=spread,
                near_best=int((v <= best + 0.05).sum()), diverged=int((~np.isfinite(v)).sum()))


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
        return pretrain_with_tiny_recipe(size, s["seed"], steps=3, batch=4, block=32, max_bytes=300_000)
    if size == "tiny":
        return pretrained.load("tiny", "english", return_meta=True)
    d = pretrained.model_dir(size, "english")
    d = d.with_name(f"{d.name}-tiny-recipe")
    if (d / "meta.json").exists() and (d / "model.safetensors").exists():
        return GPT.from_hf(d), json.loads((d / "meta.json").read_text())
    _log(f"[peft_methods] pretraining a '{size}' base with tiny's recipe (once; cached in {d})")
    model, meta = pretrain_with_tiny_recipe(size, s["seed"])
    model.save_hf(d)
    (d / "meta.json").write_text(json.dumps(meta, indent=1))
    return model, meta


def pretrain_with_tiny_recipe(size: str, seed: int, steps=None, batch=None, block=None, max_bytes=None):
    """A GPT of ``size``'s shape pretrained on English with tiny's steps and batches and the size's own LR.

    ``pretrained.pretrain``'s settings otherwise; ``steps``/``batch``/``block``/``max_bytes`` shrink it (quick).
    """
    t, own = pretrained.SIZES["tiny"], pretrained.SIZES[size]
    spec = dataclasses.replace(t, preset=own.preset, lr=own.lr, max_steps=steps or t.max_steps,
                               batch_size=batch or t.batch_size, block_size=block or t.block_size,
                               warmup_steps=min(t.warmup_steps, (steps or t.max_steps) // 10),
                               max_bytes=max_bytes or t.max_bytes)
    data = Corpus.load("english", max_bytes=spec.max_bytes, val_max_bytes=max_bytes)
    model = GPT(GPTConfig.preset(spec.preset, vocab_size=data.vocab_size), seed=seed)
    tc = TrainConfig(max_steps=spec.max_steps, batch_size=spec.batch_size, lr=spec.lr, schedule="cosine",
                     warmup_steps=spec.warmup_steps, min_lr=spec.lr / 10, weight_decay=0.1, grad_clip=1.0, seed=seed,
                     progress=steps is None)
    t0 = time.perf_counter()
    train(model, lambda r: lm_batches(data.train, spec.batch_size, spec.block_size, r), config=tc)
    val = pretrained.validation_loss(model, data.val, spec.block_size, max_batches=20 if steps is None else 1)
    return model, {"name": size, "recipe": "tiny", "spec": dataclasses.asdict(spec), "val_loss": val,
                   "seconds": time.perf_counter() - t0}


def prompt_gap_vs_size(train_tok, val_tok, s, lrs) -> list[dict]:
    s = dict(s, block=s["scale_block"])  # one window for every size: tiny's 128 positions minus the prompt
    rows = []
    for size in s["scale_sizes"]:
        base, meta = scale_base(size, s)
        sp = meta["spec"]
        base_val = _val(base, val_tok, s)
        row = dict(size=size, params=int(base.num_parameters(non_embedding=True)), english_val=meta["val_loss"],
                   pretrain_steps=int(sp["max_steps"]),
                   pretrain_tokens=int(sp["max_steps"] * sp["batch_size"] * sp["block_size"]), base=base_val)
        for m in ("full", "prompt"):
            row[m] = fine_tune(build(m, base, s["seed"]), train_tok, val_tok, s, lrs[m], s["scale_steps"])["val_loss"]
        row["gap"] = row["prompt"] - row["full"]
        gain = row["base"] - row["full"]
        row["recovered"] = (row["base"] - row["prompt"]) / gain if gain > 0 else float("nan")
        rows.append(row)
        _log(f"[peft_methods] scale {size}: base {base_val:.4f} full {row['full']:.4f} prompt {row['prompt']:.4f}")
    return rows


# ---- the lesson -------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse_args(argv, __doc__.split("\n")[0], _add_arguments)
    s = _settings(args)
    lrs = dict(LR, **_parse_lr(args.extra.lr))
    parts = set(args.extra.parts)
    rep = Report("Every PEFT method on one task, and when adapters beat full fine-tuning"
                 + (" (quick mode: seconds-long runs, numbers not meaningful)" if args.quick else ""))
    base, meta = pretrained.load(s["size"], "english", device=args.device, quick=args.quick, return_meta=True)
    data = Corpus.load("python", max_bytes=s["corpus_bytes"], val_max_bytes=200_000)
    train_tok, val_tok = to_device(data.train, args.device), to_device(data.val, args.device)
    base_val = _val(base, val_tok, s)
    result = {"size": s["size"], "steps": s["steps"], "base_val_loss": base_val, "lr": lrs}
    rep.text(f"base: '{s['size']}' ({base.num_parameters():,} parameters, {base.config.n_layer} blocks, "
             f"d {base.config.n_embd}), pretrained to {meta['val_loss']:.3f} nats/token on English; on Python "
             f"code it starts at {base_val:.3f}.\ntask: next-byte prediction on {len(data.train):,} bytes of "
             f"standard-library code; validation {s['val_batches'] * 8 * s['block']:,} held-out bytes.")

    if "1" in parts:
        res = compare_methods(base, train_tok, val_tok, s, lrs)
        predicted = predicted_memory(base.config, s)
        _report_methods(rep, res, base_val, s, predicted)
        result["methods"] = res
        result["not_lowered"] = [n for n, r in res.items() if not r["val_loss"] < base_val]
        result["memory_predicted"] = predicted
        from ..plotting import peft_methods_tradeoff

        save_figure(peft_methods_tradeoff(res, base_val, title=f"{len(res)} methods on one task "
                                          f"({s['steps']} steps, '{s['size']}' base)"), args, "peft_methods")
    if "2" in parts:
        r2 = data_and_lr(base, train_tok, val_tok, s, lrs)
        _report_adapters(rep, r2, base_val, s)
        result["adapters_vs_full"] = r2
        from ..plotting import adapters_vs_full

        save_figure(adapters_vs_full(r2["data"], r2["lr"], base_val, labels={m: METHODS[m][0] for m in PAIR}),
                    args, "peft_methods_adapters")
    if "3" in parts:
        rows = prompt_gap_vs_size(train_tok, val_tok, s, lrs)
        _report_scale(rep, rows, s)
        result["scale"] = rows
        from ..plotting import prompt_tuning_scale

        save_figure(prompt_tuning_scale(rows), args, "peft_methods_scale")
    if args.figures is not None:
        rep.text(f"\nfigures: {args.figures}/peft_methods*.png")
    rep.done()
    if "1" in parts and result["not_lowered"] and not args.quick:
        raise AssertionError(f"these methods did not lower the base's validation loss ({base_val:.4f}): "
                             f"{result['not_lowered']}")
    return finish(result, args)


def _report_methods(rep, res, base_val, s, predicted) -> None:
    rep.section(f"1. Every method, {s['steps']} steps of {s['batch']} x {s['block']} tokens, its own peak LR")
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


def _pm(mean, std, sign: str = "") -> str:
    return f"{mean:{sign}.4f} +- {std:.4f}"


def _report_adapters(rep, r2, base_val, s) -> None:
    rep.section(f"2. Houlsby adapters vs full fine-tuning as the training set shrinks (early stopping, <= "
                f"{s['data_steps']} steps, {s['data_seeds']} seeds)")
    full, ad = r2["data"]["full"], r2["data"]["houlsby"]
    diff = [np.array(b["runs"]) - np.array(a["runs"]) for a, b in zip(full, ad)]  # paired by seed and slice
    rows = [(f"{a['tokens']:,}", _pm(a["best_val"], a["std"]), f"{a['steps']:.0f}", _pm(b["best_val"], b["std"]),
             f"{b['steps']:.0f}", _pm(d.mean(), d.std(), "+")) for a, b, d in zip(full, ad, diff)]
    rep.table(rows, ("train tokens", "full: best val", "steps", "Houlsby: best val", "steps", "Houlsby - full"))
    rep.text(f"base model: {base_val:.4f}. Each seed trains on its own random slice of the training set; "
             "'Houlsby - full' pairs the runs of one slice.\nAbove "
             f"{s['data_steps'] * s['batch'] * s['block']:,} tokens the {s['data_steps']}-step budget, not the data, "
             "limits training (less than one epoch).")
    ahead = [f"{a['tokens']:,} ({d.mean():+.3f})" for a, d in zip(full, diff) if d.mean() < 0]
    behind = [f"{a['tokens']:,} ({d.mean():+.3f})" for a, d in zip(full, diff) if d.mean() >= 0]
    rep.section(f"   learning-rate sweep ({s['lr_steps']} steps, full training set): final val loss")
    lrs = list(r2["lr"]["full"])
    rep.table([(f"{lr:.0e}", f"{r2['lr']['full'][lr]:.4f}", f"{r2['lr']['houlsby'][lr]:.4f}") for lr in lrs],
              ("LR", "full", "Houlsby"))
    sf, sa = lr_sensitivity(r2["lr"]["full"]), lr_sensitivity(r2["lr"]["houlsby"])
    r2["sensitivity"] = {"full": sf, "houlsby": sa}
    best_small = min(d.mean() for d in diff[:-1]) if len(diff) > 1 else diff[0].mean()
    worst = max(diff, key=lambda d: d.mean())
    rep.compare([
        ("adapters beat full FT with less data", "yes (He et al. 2021)",
         ("yes at " + ", ".join(ahead) + ("; not at " + ", ".join(behind) if behind else "")) if ahead else
         f"no: behind at every size, by {min(d.mean() for d in diff):+.3f} at least"),
        ("adapters' gap to full FT shrinks with less data", "yes",
         f"{'yes' if worst is diff[-1] and best_small < diff[-1].mean() else 'no'}: Houlsby - full "
         f"{diff[-1].mean():+.3f} at {full[-1]['tokens']:,} tokens, {best_small:+.3f} at best below"),
        ("adapters less sensitive to the LR", "yes (He et al. 2021)",
         f"{'yes' if sa['spread'] < sf['spread'] else 'no'}: loss range over the grid {sa['spread']:.3f} vs "
         f"{sf['spread']:.3f} nats; {sa['near_best']} vs {sf['near_best']} of {len(lrs)} LRs within 0.05 of the best"),
    ])


def _report_scale(rep, rows, s) -> None:
    rep.section(f"3. Prompt tuning vs full fine-tuning as the base grows ({s['scale_steps']} steps each)")
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
    rep.text("Lester et al.'s models span 60M to 11B parameters; ours are far below 1M, so this is at most the "
             "trend's direction.")


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


if __name__ == "__main__":
    main()
