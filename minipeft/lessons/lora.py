"""Lesson: LoRA — what it trains, how small a rank suffices, why a merged adapter costs no
latency, and how low-rank a full fine-tuning update is.

``python -m minipeft.lessons.lora [--quick] [--device cuda] [--figures DIR] [--json FILE]``

LoRA (Hu et al. 2021, arXiv 2106.09685, eq. 3) freezes a pretrained weight W0 (d x k) and
learns its update as the product of two thin matrices: ``h = W0 x + (alpha/r) B A x``, with
B (d x r) = 0 and A (r x k) random at the start, so training starts from the base model.
On one downstream task (adapting minipeft's tiny English base model to Python code from the
local standard library) the lesson shows:

1. what LoRA trains: each adapted matrix's LoRA parameters r (d + k) against its d k, the
   totals (``print_trainable_parameters``), and the course's 512 x 64, r = 8 example;
2. a rank sweep r = 1 ... 32 next to full fine-tuning, asking whether the validation loss
   flattens as r grows, as in the paper's Table 6 and App. H.2 (there, a small r suffices);
3. inference latency: merged, ``W = W0 + (alpha/r) B A`` is an ordinary weight and the model
   is the base model's graph, so it adds nothing; the unmerged LoRA layer and a bottleneck
   adapter add work to every forward pass (paper §3 and Table 1);
4. why a low rank can suffice: how concentrated the singular values of a *full*
   fine-tuning update ``dW = W_ft - W0`` are, against a random matrix of the same shape and
   norm, and how much LoRA's learned ``dW = (alpha/r) B A`` lies along the full update's top
   singular directions (the subspace similarity of the paper's §7.2, eq. 4);
5. merging two adapters (Python code and C code) into one with ``add_weighted_adapter``, by
   each of peft's combination types (cat, svd, linear, TIES, DARE, magnitude pruning and
   their _svd variants), with the merged adapter's loss on both tasks.

Every number is computed or measured in the run; the course's and the paper's numbers are
printed beside them.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import io
import math
import re
import time

import numpy as np

from .. import pretrained
from ..backend import synchronize, to_device, to_numpy
from ..data import Corpus, lm_batches
from ..engine import no_grad
from ..nn import Linear
from ..peft import LoraConfig, LoraLayer, get_peft_model
from ..train import TrainConfig, train
from ._common import Report, finish, parse_args, save_figure
from ._lora_merges import merge_study, report_merges
from ._lora_spectra import (ENERGY_RANKS, RANDOM_DRAWS, delta_weights, energy_fractions, random_like,  # noqa: F401
                            rank_for_energy, right_singular, subspace_similarity, subspace_study)

#: every linear layer of each block (QLoRA's choice; the paper adapts attention only)
TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LORA_ALPHA_PER_R = 2  # lora_alpha = 2 r: the scaling alpha/r = 2 at every rank
# Peak learning rates (cosine, 5% warmup), one per method for all ranks, picked in 600-step trials on this
# task: full fine-tuning 3e-3 beat 1e-3; LoRA 1e-2 beat 3e-3 and 3e-2 (at 3e-2, r=32 diverges).
LR = {"full": 3e-3, "lora": 1e-2}
REFERENCE_R = 8  # the LoRA model used for latency and subspace similarity (the course's example rank)

# The LoRA paper's GPT-2 M validation loss on E2E by rank (App. H.2; the course's "Choosing the LoRA rank").
PAPER_RANK_LOSS = {1: 1.23, 2: 1.21, 4: 1.18, 8: 1.17, 16: 1.16, 32: 1.16, 64: 1.16}
# The paper's Table 1: GPT-2 M, one forward pass, batch 1 x 128 tokens, Quadro RTX8000.
PAPER_LATENCY_MS = {"fine-tune / LoRA": 19.8, "Adapter^L": 23.9, "Adapter^H": 25.8}
GPT3 = dict(n_layer=96, d_model=12288, r=4)  # GPT-3 175B, LoRA r = 4 on Wq and Wv (the paper's 35 MB checkpoint)


def _settings(args) -> dict:
    if args.quick:
        return dict(ranks=(1, 8, 16), steps=40, batch=8, block=64, val_batches=4, corpus_bytes=400_000,
                    lat_shapes=((1, 64), (8, 64)), lat_repeats=25)
    return dict(ranks=(1, 2, 4, 8, 16, 32), steps=600, batch=8, block=128, val_batches=16,
                corpus_bytes=4_000_000, lat_shapes=((1, 128), (16, 128)), lat_repeats=60)


# ------------------------------------------------------------------ 1. what LoRA trains


def course_example(d: int = 512, k: int = 64, r: int = 8, seed: int = 0) -> dict:
    """The course's example (a d x k = 512 x 64 weight, r = 8), counted on a real ``LoraLayer``."""
    layer = LoraLayer(Linear(k, d, bias=False, rng=seed))  # weight (out, in) = (d, k)
    layer.update_layer("default", LoraConfig(r=r), np.random.default_rng(seed))
    a, b = layer.lora_A["default"].weight.size, layer.lora_B["default"].weight.size  # r k, d r
    return dict(d=d, k=k, r=r, full=d * k, A=a, B=b, lora=a + b, reduction=1 - (a + b) / (d * k))


def gpt3_example() -> dict:
    """LoRA r = 4 on Wq and Wv of GPT-3 175B: trainable parameters and fp16 checkpoint size."""
    d, L, r = GPT3["d_model"], GPT3["n_layer"], GPT3["r"]
    trainable = 2 * L * r * (d + d)  # two d x d matrices per layer, r (d + k) each
    return dict(trainable=trainable, fraction=trainable / 175e9, fp16_bytes=2 * trainable)


def parameter_table(peft_model) -> list[dict]:
    """One row per adapted module type: layers, weight shape, d k, r (d + k), and their ratio."""
    rows: dict[str, dict] = {}
    for name, m in peft_model.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        key = re.sub(r"^.*\.h\.\d+\.", "", name)  # base_model.model.transformer.h.0.attn.c_attn -> attn.c_attn
        r = m.r["default"]
        row = rows.setdefault(key, dict(module=key, layers=0, shape=(m.out_features, m.in_features),
                                        weight=m.out_features * m.in_features,
                                        lora=r * (m.in_features + m.out_features)))
        row["layers"] += 1
    return list(rows.values())


def trainable_line(peft_model) -> str:
    """What ``print_trainable_parameters`` prints."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        peft_model.print_trainable_parameters()
    return buf.getvalue().strip()


# ------------------------------------------------------------------ 2. rank sweep


def build(base, r: int | None, seed: int = 0):
    """A copy of ``base`` for full fine-tuning (``r=None``) or with LoRA of rank ``r`` on ``TARGETS``."""
    model = copy.deepcopy(base)
    if r is None:
        return model
    cfg = LoraConfig(r=r, lora_alpha=LORA_ALPHA_PER_R * r, target_modules=list(TARGETS), seed=seed)
    return get_peft_model(model, cfg)


def finetune(model, train_tok, val_tok, s: dict, lr: float, seed: int) -> dict:
    """Train ``model`` for ``s['steps']`` steps on ``train_tok``; its validation loss, trainable count, s/step."""
    tc = TrainConfig(max_steps=s["steps"], batch_size=s["batch"], lr=lr, schedule="cosine",
                     warmup_steps=max(1, s["steps"] // 20), min_lr=lr / 10, weight_decay=0.0, grad_clip=1.0,
                     seed=seed, progress=False)
    t0 = time.perf_counter()
    train(model, lambda rng: lm_batches(train_tok, s["batch"], s["block"], rng), config=tc)
    seconds = time.perf_counter() - t0
    val = pretrained.validation_loss(model, val_tok, s["block"], batch_size=8, max_batches=s["val_batches"])
    trainable = sum(p.size for p in model.parameters() if p.requires_grad)
    return dict(model=model, val_loss=val, trainable=trainable, sec_per_step=seconds / s["steps"])


# ------------------------------------------------------------------ 3. latency


def adapter_model(base, seed: int = 0):
    """A bottleneck-adapter model of ``base`` from ``minipeft.peft.adapters`` if that module exists.

    Returns ``(model, label)`` or ``(None, why not)``. Prefers Houlsby (two adapters per block,
    the paper's Adapter^H), then Pfeiffer (one per block, after the MLP).
    """
    if importlib.util.find_spec("minipeft.peft.adapters") is None:
        return None, "minipeft.peft.adapters is not there yet: adapter row skipped"
    try:
        mod = importlib.import_module("minipeft.peft.adapters")
    except Exception as e:  # a module under construction must not break the lesson
        return None, f"minipeft.peft.adapters does not import ({type(e).__name__}: {e}): adapter row skipped"
    from ..peft import PeftConfig

    configs = [v for v in vars(mod).values()
               if isinstance(v, type) and issubclass(v, PeftConfig) and v is not PeftConfig and v.peft_type]
    configs.sort(key=lambda c: next((i for i, w in enumerate(("HOULSBY", "DOUBLE", "PFEIFFER", "SEQ", "BN", "ADAPTER"))
                                     if w in (c.peft_type or "").upper() + c.__name__.upper()), 99))
    errors = []
    for cls in configs:
        try:
            model = get_peft_model(copy.deepcopy(base), cls(seed=seed))
            return model, f"{cls.__name__} ({cls.peft_type}, default settings)"
        except Exception as e:  # try the next config class
            errors.append(f"{cls.__name__}: {type(e).__name__}: {e}")
    return None, "no adapter config of minipeft.peft.adapters could be applied: " + "; ".join(errors or ["none found"])


def time_forward(models: dict, idx, repeats: int, warmup: int = 3, device: str = "cpu", stat=np.median) -> dict:
    """Seconds of one forward pass (no graph) per model: ``stat`` (median) over ``repeats`` timings.

    The models are timed in turn, round-robin with the order rotating every round, so a
    slow moment of the machine is spread over all of them instead of hitting one.
    ``stat=None`` returns every timing.
    """
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    with no_grad():
        for m in models.values():
            m.eval()
            for _ in range(warmup):
                m(idx)
        synchronize(device)
        for k in range(repeats):
            for n in names[k % len(names):] + names[: k % len(names)]:
                t0 = time.perf_counter()
                models[n](idx)
                synchronize(device)
                times[n].append(time.perf_counter() - t0)
    return times if stat is None else {n: float(stat(t)) for n, t in times.items()}


# ------------------------------------------------------------------ the lesson


def main(argv=None) -> dict:
    args = parse_args(argv, __doc__.split("\n")[0])
    s = _settings(args)
    rep = Report("LoRA: what it trains, which rank suffices, merged inference, low-rank updates"
                 + (" (quick mode: seconds-long runs, rough numbers)" if args.quick else ""))
    base, meta = pretrained.load("tiny", "english", device=args.device, quick=args.quick, return_meta=True)
    base.eval()
    data = Corpus.load("python", max_bytes=s["corpus_bytes"], val_max_bytes=200_000)
    train_tok, val_tok = to_device(data.train, args.device), to_device(data.val, args.device)
    base_val = pretrained.validation_loss(base, val_tok, s["block"], batch_size=8, max_batches=s["val_batches"])

    # 1 ---------------------------------------------------------------------------------
    rep.section(f"1. What LoRA trains (r = {REFERENCE_R}, alpha = {LORA_ALPHA_PER_R * REFERENCE_R}, "
                "every linear layer of each block)")
    probe = build(base, REFERENCE_R, args.seed)
    table = parameter_table(probe)
    rep.table([(t["module"], t["layers"], f"{t['shape'][0]} x {t['shape'][1]}", t["weight"], t["lora"],
                f"{100 * t['lora'] / t['weight']:.1f}%") for t in table],
              ("module (per layer)", "layers", "W: d x k", "d k", "r (d + k)", "LoRA / W"))
    trainable, total = probe.get_nb_trainable_parameters()
    rep.text("print_trainable_parameters(): " + trainable_line(probe))
    rep.text(f"The base model has {base.num_parameters():,} parameters; full fine-tuning trains all of them, "
             f"LoRA r={REFERENCE_R} trains {trainable:,} ({100 * trainable / base.num_parameters():.1f}% of them).")
    ex, g3 = course_example(seed=args.seed), gpt3_example()
    rep.text("")
    rep.compare([
        ("512 x 64 weight: d k", "32,768", ex["full"]),
        ("  r = 8: A is r x k", "512", ex["A"]),
        ("  r = 8: B is d x r", "4,096", ex["B"]),
        ("  reduction in trained parameters", "86%", f"{100 * ex['reduction']:.1f}%"),
        ("GPT-3 175B, r = 4 on Wq, Wv: trained", "18M", f"{g3['trainable'] / 1e6:.1f}M"),
        ("  as a share of 175B", "0.01%", f"{100 * g3['fraction']:.4f}%"),
        ("  checkpoint in fp16", "35 MB", f"{g3['fp16_bytes'] / 1e6:.1f} MB ({g3['fp16_bytes'] / 2**20:.1f} MiB)"),
    ], headers=("course example (counted on a real LoraLayer / from GPT-3's shape)", "course", "minipeft"))
    del probe

    # 2 ---------------------------------------------------------------------------------
    rep.section(f"2. Rank sweep: the tiny English base adapted to Python code ({s['steps']} steps each)")
    rep.text(f"base: pretrained to {meta['val_loss']:.3f} nats/token on English; on Python code it starts at "
             f"{base_val:.3f}. Same data, batches, steps and schedule for every run; lr {LR['lora']} for LoRA at "
             f"every rank (alpha = {LORA_ALPHA_PER_R} r), {LR['full']} for full fine-tuning.")
    full = finetune(build(base, None), train_tok, val_tok, s, LR["full"], args.seed)
    sweep = {}
    for r in s["ranks"]:
        sweep[r] = finetune(build(base, r, args.seed), train_tok, val_tok, s, LR["lora"], args.seed)
    full_gain = base_val - full["val_loss"]
    best = min(v["val_loss"] for v in sweep.values())
    paper_best = min(PAPER_RANK_LOSS.values())
    rows = []
    for r, v in sweep.items():
        paper = PAPER_RANK_LOSS.get(r)
        rows.append((f"LoRA r={r}", v["trainable"], v["val_loss"],
                     f"{100 * (base_val - v['val_loss']) / full_gain:.0f}%",
                     f"{100 * (v['val_loss'] / best - 1):+.1f}%",
                     f"{paper:.2f} ({100 * (paper / paper_best - 1):+.1f}%)" if paper else "-"))
    rows.append(("full fine-tuning", full["trainable"], full["val_loss"], "100%", "", "-"))
    rows.append(("base model (no training)", 0, base_val, "0%", "", "-"))
    rep.table(rows, ("run", "trainable", "val loss", "of FT's gain", "vs best r", "paper: GPT-2 M E2E loss"))
    rs = list(sweep)
    steps = [(a, b, (sweep[a]["val_loss"] - sweep[b]["val_loss"]) / math.log2(b / a)) for a, b in zip(rs, rs[1:])]
    rep.text("Loss bought per doubling of r: " + ", ".join(f"r={a}->{b}: {g:.3f}" for a, b, g in steps)
             + " nats/token.")
    frac = {r: (base_val - v["val_loss"]) / full_gain for r, v in sweep.items()}
    r90 = next((r for r in rs if frac[r] >= 0.9), None)
    d_model = base.config.n_embd
    flat = next(r for r in rs if sweep[r]["val_loss"] <= 1.01 * best)
    paper_flat = next(r for r in sorted(PAPER_RANK_LOSS) if PAPER_RANK_LOSS[r] <= 1.01 * paper_best)
    rep.compare([
        ("loss of r=1 above the sweep's best rank", f"{100 * (PAPER_RANK_LOSS[1] / paper_best - 1):.1f}%",
         f"{100 * (sweep[rs[0]]['val_loss'] / best - 1):.1f}% (r={rs[0]})"),
        ("loss change from r=16 to r=32", f"{100 * (PAPER_RANK_LOSS[32] / PAPER_RANK_LOSS[16] - 1):+.1f}%",
         f"{100 * (sweep[32]['val_loss'] / sweep[16]['val_loss'] - 1):+.1f}%" if {16, 32} <= set(rs) else "-"),
        ("smallest r within 1% of the best rank's loss", f"r={paper_flat} ({100 * paper_flat / 1024:.1f}% of d 1024)",
         f"r={flat} ({100 * flat / d_model:.1f}% of d {d_model})"),
        ("smallest LoRA with 90% of full fine-tuning's gain",
         "intrinsic dim.: 200 params give 90% (RoBERTa, MRPC)",
         f"r={r90}: {sweep[r90]['trainable']:,} params ({100 * sweep[r90]['trainable'] / full['trainable']:.0f}%)"
         if r90 else f"none up to r={rs[-1]} (best {100 * max(frac.values()):.0f}%)"),
    ], headers=("", "course / paper", "minipeft"))
    flattens = len(steps) >= 2 and steps[-1][2] < steps[0][2] / 3
    rep.text(("The curve flattens: the last doubling of r buys less than a third of the first. "
              if flattens else "The curve has not flattened by the largest rank: each doubling of r still buys "
              "a similar amount. ")
             + f"In the paper the loss is within 1% of its best from r={paper_flat}, {100 * paper_flat / 1024:.1f}% of "
             f"GPT-2 M's width, "
             f"on a narrow task; here r=1 is already {100 / d_model:.1f}% of the width, r={rs[-1]} is "
             f"{100 * rs[-1] / d_model:.0f}% of each matrix's full rank, and the task (English to Python code) "
             "moves a tiny base far. How much rank suffices depends on the task and the base.")

    # 3 ---------------------------------------------------------------------------------
    rep.section("3. Inference latency of one forward pass (median of interleaved repeats, after warm-up)")
    lora_model = sweep[REFERENCE_R]["model"] if REFERENCE_R in sweep else sweep[rs[-1]]["model"]
    lora_r = REFERENCE_R if REFERENCE_R in sweep else rs[-1]
    merged = copy.deepcopy(lora_model).merge_and_unload()
    models = {"base": base, f"LoRA r={lora_r} unmerged": lora_model, f"LoRA r={lora_r} merged": merged}
    adapter, adapter_note = adapter_model(base, args.seed)
    if adapter is not None:
        models["adapter"] = adapter
    rng = np.random.default_rng(args.seed)
    latency, latency_min = {}, {}
    for B, T in s["lat_shapes"]:
        idx = to_device(rng.integers(0, base.config.vocab_size, (B, T)), args.device)
        times = time_forward(models, idx, s["lat_repeats"], device=args.device, stat=None)
        latency[f"{B}x{T}"] = {k: 1000 * float(np.median(v)) for k, v in times.items()}
        latency_min[f"{B}x{T}"] = {k: 1000 * float(np.min(v)) for k, v in times.items()}
    with no_grad():
        idx = to_device(data.val[None, : s["block"]].astype(np.int64), args.device)
        diff = float(np.abs(to_numpy(lora_model(idx).logits.data) - to_numpy(merged(idx).logits.data)).max())
    shapes = list(latency)
    rep.table([(n,) + tuple(f"{latency[sh][n]:.2f} ms ({latency[sh][n] / latency[sh]['base']:.2f}x)" for sh in shapes)
               for n in models], ("model", *(f"batch x tokens = {sh}" for sh in shapes)))
    if adapter is not None:
        n_ad = sum(p.size for p in adapter.parameters() if p.requires_grad)
        rep.text(f"adapter: {adapter_note}, {n_ad:,} trainable parameters (latency does not depend on training)")
    else:
        rep.text(f"adapter: {adapter_note}")
    rep.text(f"merged and unmerged logits differ by at most {diff:.2e} (float32 rounding): the same model.")
    one = shapes[0]
    paper_ft = PAPER_LATENCY_MS["fine-tune / LoRA"]

    def added(name: str) -> str:
        med = 100 * (latency[one][name] / latency[one]["base"] - 1)
        fastest = 100 * (latency_min[one][name] / latency_min[one]["base"] - 1)
        return f"{med:+.1f}% / {fastest:+.1f}%"

    rep.compare([
        ("LoRA merged vs base", "+0% (course: no added latency)", added(f"LoRA r={lora_r} merged")),
        ("LoRA unmerged vs base", "- (the paper merges)", added(f"LoRA r={lora_r} unmerged")),
        ("adapter vs base", f"Adapter^H {100 * (PAPER_LATENCY_MS['Adapter^H'] / paper_ft - 1):+.1f}%, "
                            f"Adapter^L {100 * (PAPER_LATENCY_MS['Adapter^L'] / paper_ft - 1):+.1f}%",
         added("adapter") if adapter is not None else "skipped"),
    ], headers=(f"added latency, batch x tokens = {one}", f"paper Table 1 (GPT-2 M, 1 x 128, {paper_ft} ms)",
                f"minipeft: median / fastest of {s['lat_repeats']}"))
    rep.text("Merging folds (alpha/r) B A into W0: the merged model runs exactly the base model's operations. "
             "Unmerged, every adapted layer runs two extra thin matmuls, a scale and an add; an adapter adds "
             "sequential layers. At batch 1 the fixed cost of each extra operation is largest relative to the work.")

    # 4 ---------------------------------------------------------------------------------
    rep.section("4. The singular values of the full fine-tuning update dW = W_ft - W0")
    names = [f"transformer.h.{i}.{t}" for i in range(base.config.n_layer) for t in TARGETS]
    dws = delta_weights(base, full["model"], names)
    rng = np.random.default_rng(args.seed + 1)
    spectra, spectra_rand, energy, energy_rand, r90 = {}, {}, {}, {}, {}
    for n, dw in dws.items():
        short = n.replace("transformer.", "")
        spectra[short] = np.linalg.svd(dw, compute_uv=False)
        spectra_rand[short] = np.linalg.svd(random_like(dw, rng), compute_uv=False)
        energy[short], energy_rand[short] = energy_fractions(spectra[short]), energy_fractions(spectra_rand[short])
        r90[short] = (rank_for_energy(spectra[short]), rank_for_energy(spectra_rand[short]), len(spectra[short]))
    w0n = {n.replace("transformer.", ""): np.linalg.norm(to_numpy(base.get_submodule(n).weight.data)) for n in names}
    rep.table([(n, f"{dw.shape[0]} x {dw.shape[1]}", f"{np.linalg.norm(dw) / w0n[n]:.3f}")
               + tuple(f"{energy[n][r]:.2f} ({energy_rand[n][r]:.2f})" for r in ENERGY_RANKS)
               + (f"{r90[n][0]} ({r90[n][1]}) of {r90[n][2]}",)
               for n, dw in ((k.replace("transformer.", ""), v) for k, v in dws.items())],
              ("matrix", "shape", "|dW|/|W0|", *(f"top-{r} energy" for r in ENERGY_RANKS), "r for 90%"))
    rep.text("(in brackets: a Gaussian matrix of the same shape and Frobenius norm)")
    mean_e = {r: float(np.mean([e[r] for e in energy.values()])) for r in ENERGY_RANKS}
    mean_er = {r: float(np.mean([e[r] for e in energy_rand.values()])) for r in ENERGY_RANKS}
    lo, hi = min(v[0] for v in r90.values()), max(v[0] for v in r90.values())
    lo_r, hi_r = min(v[1] for v in r90.values()), max(v[1] for v in r90.values())
    rep.text(f"Mean over the {len(energy)} matrices: the top 8 singular values hold {100 * mean_e[8]:.0f}% of the "
             f"update's energy, against {100 * mean_er[8]:.0f}% for a random matrix; 90% of the energy takes r = "
             f"{lo}..{hi} (random: {lo_r}..{hi_r}). The update full fine-tuning finds is far from random, with its "
             "energy in fewer directions (the course: 'intrinsic low-rank structure')"
             + (", and a rank-8 LoRA can hold almost all of it." if mean_e[8] >= 0.9 else
                f"; but a rank-8 LoRA could hold only about {100 * mean_e[8]:.0f}% of it, which is why the rank "
                "sweep above still gains from larger r."))

    # subspace similarity (paper §7.2): LoRA's dW against the full update, a larger-r LoRA, random matrices
    rep.text("")
    sims = subspace_study(base, full["model"], sweep, lora_r, rs[-1], rng)
    k, top = sims["k"], sims["top"]
    rep.table([(row["pair"], row["matrix"]) + tuple(f"{row[f'phi{i}']:.3f}" for i in (1, 4, 8))
               for row in sims["rows"]]
              + [("chance level max(i, j) / k", f"k = {k}") + tuple(f"{i / k:.3f}" for i in (1, 4, 8))],
              ("subspace similarity phi(i, i), right-singular vectors", "matrix", "i=1", "i=4", "i=8"))
    ratio = sims["ft"] / (top / k)
    rep.compare([
        (f"phi(1,1), LoRA r={lora_r} vs LoRA r={rs[-1]} (paper: r=8 vs r=64)", "> 0.5",
         f"{sims['lora1']:.2f} (mean of {base.config.n_layer} layers)"),
        (f"phi({top},{top}), LoRA r={lora_r} vs full fine-tuning", "-",
         f"{sims['ft']:.2f} = {ratio:.1f} x chance"),
        ("chance level max(i,j)/k at (1,1)", f"k=256: {1 / 256:.4f}",
         f"k={k}: {1 / k:.4f} expected, {sims['random1']:.4f} measured"),
    ], headers=("c_attn of each layer", "paper §7.2", "minipeft"))
    rep.text(f"LoRA's top {top} input directions overlap the full update's top {top} by phi = {sims['ft']:.2f}, "
             f"{ratio:.1f} times what random directions give: LoRA finds "
             + ("largely" if ratio > 3 else "partly" if ratio > 1.5 else "not clearly")
             + " the directions that full fine-tuning moves most (figure: the overlap against j).")

    # 5 ---------------------------------------------------------------------------------
    rep.section(f"5. Merging two adapters (r = {lora_r}): Python code and C code, by each add_weighted_adapter type")
    c_data = Corpus.load("c", max_bytes=s["corpus_bytes"], val_max_bytes=200_000)
    c_train, c_val = to_device(c_data.train, args.device), to_device(c_data.val, args.device)
    c_model = finetune(build(base, lora_r, args.seed + 1), c_train, c_val, s, LR["lora"], args.seed)["model"]
    val_tokens = {"python": val_tok, "c": c_val}
    base_losses = {t: pretrained.validation_loss(base, tok, s["block"], batch_size=8, max_batches=s["val_batches"])
                   for t, tok in val_tokens.items()}
    merges = merge_study(lora_model, c_model, val_tokens, s, args.seed)
    report_merges(rep, merges, base_losses)
    del c_model

    # figures ------------------------------------------------------------------------------
    from .figures.lora import lora_latency, lora_rank_sweep, lora_spectra

    paths = [
        save_figure(lora_rank_sweep(rs, [sweep[r]["val_loss"] for r in rs], full["val_loss"], base_val,
                                    paper=PAPER_RANK_LOSS,
                                    trainable=[sweep[r]["trainable"] for r in rs],
                                    title="LoRA rank sweep: tiny English base adapted to Python code"),
                    args, "lora_rank_sweep"),
        save_figure(lora_latency(latency, title="One forward pass: merged LoRA costs what the base costs"),
                    args, "lora_latency"),
        save_figure(lora_spectra({n: spectra[n] for n in spectra if n.endswith("c_attn")},
                                 {n: spectra_rand[n] for n in spectra_rand if n.endswith("c_attn")},
                                 overlap=(sims["js"], sims["curves"], sims["chance"], top),
                                 title="The full fine-tuning update dW = W_ft - W0 of c_attn, and LoRA's"),
                    args, "lora_spectra"),
    ]
    for p in paths:
        if p:
            rep.text(f"figure: {p}")
    return finish({
        "base_val_loss": base_val, "full_ft": {"val_loss": full["val_loss"], "trainable": full["trainable"]},
        "ranks": list(rs), "rank_sweep": {str(r): {"val_loss": v["val_loss"], "trainable": v["trainable"],
                                                   "sec_per_step": v["sec_per_step"]} for r, v in sweep.items()},
        "parameters": {"table": table, "trainable": trainable, "total": total, "base": base.num_parameters()},
        "course_example": ex, "gpt3_example": g3,
        "latency_ms": latency, "latency_min_ms": latency_min, "adapter": adapter_note, "merge_max_abs_diff": diff,
        "energy": {n: {str(r): v for r, v in e.items()} for n, e in energy.items()},
        "energy_random": {n: {str(r): v for r, v in e.items()} for n, e in energy_rand.items()},
        "rank_for_90pct_energy": {n: v[0] for n, v in r90.items()},
        "subspace": sims, "merges": dict(merges, base=base_losses),
    }, args, report=rep, lesson="lora")


if __name__ == "__main__":
    main()
