"""The fair comparison behind the side-tuning lesson: QLoRA and QST tuned alike, compared at matched accuracy.

The QST paper (Zhang et al. 2024, arXiv 2401.07159, Table 2) reports QST's memory next to
QLoRA's at about the same accuracy. To compare the two honestly on a small base:

* **QLoRA as its paper ran it** (Dettmers et al. 2023, arXiv 2305.14314): the base in NF4
  with double quantization, LoRA on every linear layer of the blocks (``LINEARS``);
  r = ``QLORA_R``, alpha = ``QLORA_ALPHA``, dropout ``QLORA_DROPOUT``. The learning rate is swept.
* **QST** at several reduction factors r (side width d/r) and learning rates: the paper
  chose r = 16 for d >= 2048; on a base with d = 64 that leaves a side network 4 wide.
* **Choosing without peeking**: ``split_validation`` cuts the validation text into two
  disjoint halves. Each (method, r) keeps the learning rate whose loss on the first half
  (the stopping slice) is lowest; only that run is scored on the second half (the reported
  slice), which nothing was chosen on.
* **At matched accuracy** (``matched_accuracy``): the QST settings whose reported loss is at
  most QLoRA's + ``MATCH_TOL``; among them, the one that needs the least memory per step
  (measured). The verdict is computed from those numbers by the rule the function states.
"""
from __future__ import annotations

import copy
import time

import numpy as np

from ..backend import xp_of
from ..data import lm_batches, split_validation  # noqa: F401  (re-exported: the lessons' one split)
from ..memory import MethodConfig, StepSetup, estimate_memory
from ..memory_measure import measure_training_step
from ..optim import AdamW
from ..peft import LoraConfig, LSTConfig, QSTConfig, get_peft_model, get_qlora_model, held_leaf_bytes
from ..train import TrainConfig, train, validation_loss

METHODS = ("full", "lora", "qlora", "lst", "qst")  # the methods whose memory the lesson measures
LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # every linear layer of a block (QLoRA)
QLORA_R, QLORA_ALPHA = 8, 16  # LoRA rank and alpha (scale alpha / r = 2)
QLORA_DROPOUT = 0.0  # qlora.py's default (its 7B/13B scripts: 0.1); QST's side network has no dropout either
QST_R, LST_R = 16, 8  # the papers' reduction factors
MATCH_TOL = 0.02  # nats/token: a QST loss at most QLoRA's + this counts as matched accuracy
MB = 1e6


def slice_loss(model, tokens, block_size: int, n_windows: int, batch_size: int = 8) -> float:
    """Mean next-token loss (nats/token) over ``n_windows`` windows of ``block_size`` spread evenly over ``tokens``.

    Spreading the windows (rather than reading the first ones) makes a slice's loss stand for
    all of its text; the same windows are read for every model.
    """
    T, n = int(block_size), len(tokens)
    if n < T + 2 or n_windows < 1:
        raise ValueError(f"a slice of {n} tokens cannot hold {n_windows} windows of {T} + 1 tokens; "
                         "shorten the windows or give more validation text")
    starts = np.unique(np.linspace(0, n - T - 1, int(n_windows)).astype(np.int64))  # (W,)
    xp = xp_of(tokens)

    def windows():
        for i in range(0, len(starts), batch_size):
            idx = xp.asarray(starts[i:i + batch_size, None] + np.arange(T)[None, :])  # (b, T)
            yield tokens[idx].astype(xp.int64), tokens[idx + 1].astype(xp.int64)

    return validation_loss(model, windows())


def build(method: str, base, compute_dtype: str = "float32", seed: int = 0, r: int | None = None):
    """A copy of ``base`` with ``method`` applied: full, lora / qlora (all block linears), lst or qst (width d/r)."""
    model = copy.deepcopy(base)
    if method == "full":
        return model
    if method in ("lora", "qlora"):
        cfg = LoraConfig(r=QLORA_R, lora_alpha=QLORA_ALPHA, lora_dropout=QLORA_DROPOUT, target_modules=list(LINEARS),
                         seed=seed)
        if method == "qlora":  # NF4 base, blocks of 64, double quantization (minipeft.peft.qlora)
            return get_qlora_model(model, cfg, compute_dtype=compute_dtype)
        return get_peft_model(model, cfg)
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


def predict(config, method: str, r: int | None, batch: int, seq_len: int) -> dict:
    """The memory calculator's bytes for one step of ``method`` ('qlora' or 'qst'), arrays held included.

    For QST the calculator models LST's linear downsamples with an NF4 backbone, not QST's
    adapter downsamples and output mix: its trainable bytes are an upper bound, its
    activations close (the held backbone states are the same).
    """
    if method == "qlora":
        mc = MethodConfig(method="qlora", targets=LINEARS, r=QLORA_R, lora_dropout=QLORA_DROPOUT)
    elif method == "qst":
        mc = MethodConfig(method="side", quantize=True, reduction_factor=r or QST_R)
    else:
        raise ValueError(f"predict covers 'qlora' and 'qst', got {method!r}")
    return estimate_memory(config, mc, StepSetup(batch_size=batch, seq_len=seq_len)).as_dict()


def _setting(method: str, r: int | None) -> str:
    return method if r is None else f"{method} r={r}"


def train_setting(model, method: str, r: int | None, lr: float, s: dict, seq_len: int, train_tokens, select_loss,
                  seed: int = 0, start: float | None = None) -> dict:
    """Train ``model`` with ``lr`` for ``s['steps']`` steps; its row of the sweep (loss on the stopping slice)."""
    steps, B = s["steps"], s["batch"]
    trainable = sum(p.size for p in model.parameters() if p.requires_grad)
    tc = TrainConfig(max_steps=steps, batch_size=B, lr=lr, schedule="cosine", warmup_steps=max(1, steps // 20),
                     weight_decay=0.0, grad_clip=1.0, eval_every=max(1, steps // 4), seed=seed, progress=False)
    row = dict(setting=_setting(method, r), method=method, r=r,
               side_width=model.get_base_model().config.n_embd // r if r else None, lr=lr, trainable=trainable,
               chosen=False, at_grid_edge=False, val_report=None, diverged=False)
    t0 = time.perf_counter()
    try:
        res = train(model, lambda g: lm_batches(train_tokens, B, seq_len, g), config=tc, eval_fn=select_loss)
    except FloatingPointError:  # the loss became inf/nan: this learning rate is too high
        return row | dict(val_select=float("inf"), train_loss=float("nan"), diverged=True,
                          sec_per_step=(time.perf_counter() - t0) / steps, curve=([0], [start]))
    evals = [(st, m["val_loss"]) for st, m in res.eval_history]  # the last one is at the final step
    return row | dict(val_select=evals[-1][1], train_loss=res.final["train_loss"],
                      sec_per_step=res.final["sec_per_step"],
                      curve=([0] + [st for st, _ in evals], [start] + [v for _, v in evals]))


def run_sweep(base, s: dict, seq_len: int, train_tokens, select_loss, report_loss, seed: int = 0, log=print) -> dict:
    """QLoRA over ``s['qlora_lrs']``; QST over ``s['qst_rs']`` x ``s['qst_lrs']``; choose, then report.

    ``select_loss(model)`` scores the stopping slice, ``report_loss(model)`` the reported
    slice. Returns ``rows`` (every run, in order), ``chosen`` {(method, r): the run with the
    lowest stopping-slice loss of its group, with ``val_report``} and ``start_select``
    (the NF4 base on the stopping slice: step 0 of both methods).
    """
    start = select_loss(build("qlora", base, s["compute_dtype"], seed))  # B = 0 and alpha = 1: the NF4 base
    groups = [("qlora", None, tuple(s["qlora_lrs"]))] + [("qst", r, tuple(s["qst_lrs"])) for r in s["qst_rs"]]
    rows, chosen = [], {}
    for method, r, lrs in groups:
        best, best_model = None, None
        for lr in lrs:
            model = build(method, base, s["compute_dtype"], seed, r)
            row = train_setting(model, method, r, lr, s, seq_len, train_tokens, select_loss, seed, start)
            rows.append(row)
            log(f"  [{row['setting']} lr={lr:g}] {s['steps']} steps: "
                + ("diverged" if row["diverged"] else f"train loss {row['train_loss']:.3f}, stopping-slice loss "
                   f"{row['val_select']:.3f}") + f" ({1000 * row['sec_per_step']:.0f} ms/step)")
            if best is None or row["val_select"] < best["val_select"]:
                best, best_model = row, model
        best["chosen"] = True
        best["at_grid_edge"] = len(lrs) > 1 and best["lr"] in (min(lrs), max(lrs))
        best["val_report"] = report_loss(best_model)
        chosen[(method, r)] = best
        log(f"  [{best['setting']}] chosen lr={best['lr']:g} (stopping slice {best['val_select']:.3f}"
            + (", at the edge of the grid" if best["at_grid_edge"] else "")
            + f"); reported slice {best['val_report']:.3f}")
    return {"rows": rows, "chosen": chosen, "start_select": start}


def matched_accuracy(chosen: dict, tol: float = MATCH_TOL) -> dict:
    """QST against QLoRA at matched accuracy, from the chosen settings' reported losses and measured memory.

    ``chosen`` maps ("qlora", None) and ("qst", r) to dicts with ``val_report``, ``lr``,
    ``memory['total']`` (bytes per step). The rule is returned with the verdict.
    """
    q = chosen[("qlora", None)]
    qst = {r: c for (m, r), c in chosen.items() if m == "qst"}
    if not qst:
        raise ValueError("matched_accuracy needs at least one ('qst', r) setting in chosen")
    ql, qmem = q["val_report"], q["memory"]["total"]
    gap = {r: c["val_report"] - ql for r, c in qst.items()}
    mem = {r: c["memory"]["total"] for r, c in qst.items()}
    best_r = min(qst, key=lambda r: qst[r]["val_report"])
    closest_r = min(qst, key=lambda r: abs(gap[r]))
    within = [r for r in qst if gap[r] <= tol]
    matched_r = min(within, key=lambda r: mem[r]) if within else None
    rule = (f"a QST setting (reduction factor r at its chosen learning rate) is matched when its reported loss is at "
            f"most QLoRA's + {tol} nats/token; among matched settings the one with the least measured memory per "
            "step counts. reproduced: it uses less memory than QLoRA; contradicted: it uses more, or no setting is "
            "matched and the best QST uses more; partly: no setting is matched but the best QST uses less.")
    r = matched_r if matched_r is not None else best_r
    c, ratio = qst[r], qmem / mem[r]
    where = (f"r = {r} (width {c['side_width']}, lr {c['lr']:g}): {mem[r] / MB:.3f} MB per step against QLoRA's "
             f"{qmem / MB:.3f} MB ({ratio:.2f}x), reported loss {c['val_report']:.3f} vs {ql:.3f} ({gap[r]:+.3f})")
    if matched_r is not None and mem[r] < qmem:
        verdict, sentence = "reproduced", f"QST uses less memory than QLoRA at a loss within {tol} nats/token: {where}."
    elif matched_r is not None:
        verdict = "contradicted"
        sentence = f"QST matches QLoRA's loss within {tol} nats/token only where it uses more memory: {where}."
    elif mem[r] < qmem:
        verdict = "partly"
        sentence = (f"QST uses less memory than QLoRA, but no width tried reaches QLoRA's loss within {tol} "
                    f"nats/token; the best QST is {where}.")
    else:
        verdict = "contradicted"
        sentence = (f"No QST width tried reaches QLoRA's loss within {tol} nats/token, and the best uses more "
                    f"memory: {where}.")
    return {"tolerance": tol, "rule": rule, "verdict": verdict, "sentence": sentence,
            "qlora_lr": q["lr"], "qlora_loss": ql, "qlora_memory": qmem,
            "best_r": best_r, "best_lr": qst[best_r]["lr"], "best_loss": qst[best_r]["val_report"],
            "best_gap": gap[best_r], "best_memory": mem[best_r],
            "closest_r": closest_r, "closest_gap": gap[closest_r],
            "matched_r": matched_r, "matched_lr": qst[matched_r]["lr"] if matched_r is not None else None,
            "matched_loss": qst[matched_r]["val_report"] if matched_r is not None else None,
            "matched_gap": gap[matched_r] if matched_r is not None else None,
            "matched_memory": mem[matched_r] if matched_r is not None else None,
            "memory_ratio": ratio}
