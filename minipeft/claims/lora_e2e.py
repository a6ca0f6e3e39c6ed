"""Claims about LoRA and the E2E tables: latency, rank, low-rank updates, and every method on E2E.

LoRA lesson keys: ``latency_min_ms.<shape>.{base, ... merged, adapter}``, ``rank_sweep.<r>.val_loss``,
``rank_for_90pct_energy``, ``parameters.table``. E2E lesson keys: ``methods.<method>.{BLEU,
val_loss}`` for ``full, top2, adapter_small, adapter_large, prefix`` and LoRA (the paper's
placement under ``lora_qv`` or ``lora``; every linear layer under ``lora_all``), and
``ranks.<r>.val_loss``, and ``lora_all_tuned`` (LoRA on every linear layer at the rank >= its own that
validation picks).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ._util import num, plateau_rank, ratio
from .core import SEED_CMU, SEED_CS639, SEED_FZENG, SEED_PEFT, Claim, Measurement
from .results import Missing
from .rules import Rule, at_least, at_most

LORA_PAPER = ("lora_qv", "lora_q_v", "lora")  # LoRA as Hu et al. placed it (W_q, W_v); today's 'lora' is c_attn
LORA_ALL = ("lora_all", "lora_all_linear", "lora_linear")  # LoRA on every linear layer (QLoRA's placement)
E2E_SCALE = ("minipeft's bases are 0.1-10M-parameter byte-level models trained for minutes, against GPT-2 Medium "
             "(355M) fine-tuned for 5 epochs; read the ranking, not the absolute scores.")
COURSE_RANK_LOSS = {1: 1.23, 2: 1.21, 4: 1.18, 8: 1.17, 16: 1.16, 32: 1.16, 64: 1.16}  # LoRA paper App. H.2


def _latency(r):
    r.timings("lora")
    lat = r.get("lora", "latency_min_ms")
    if not lat:
        raise Missing("the lora run recorded no latencies")
    shape = max(lat, key=lambda s: num(lat[s].get("base", 0)))
    row = r.get("lora", "latency_min_ms", shape)
    merged = next((k for k in row if "merged" in k and "unmerged" not in k), None)
    if merged is None or "adapter" not in row:
        raise Missing(f"the lora run's latency_min_ms.{shape} lacks a merged LoRA or an adapter entry")
    return shape, num(row["base"]), num(row[merged]), num(row["adapter"])


def _no_latency(r) -> Measurement:
    shape, base, merged, _ = _latency(r)
    q = merged / base
    return Measurement(q, f"forward {shape}: base {base:.2f} ms, merged LoRA {merged:.2f} ms",
                       relation_text=f"merged/base = {q:.3f}")


def _adapter_latency(r) -> Measurement:
    shape, base, _, adapter = _latency(r)
    q = adapter / base
    return Measurement(q, f"forward {shape}: base {base:.2f} ms, bottleneck adapter {adapter:.2f} ms",
                       relation_text=f"adapter/base = {q:.3f}")


def _rank_plateau(r) -> Measurement:
    if r.has("e2e", "ranks"):
        _checked("full", r.get("e2e", "methods", "full", "BLEU"))  # a run that learned nothing has no plateau
        ranks = r.get("e2e", "ranks")
        losses, where = {k: v["val_loss"] for k, v in ranks.items()}, "E2E"
    else:
        ranks = r.get("lora", "rank_sweep")
        losses, where = {k: v["val_loss"] for k, v in ranks.items()}, "Python (lora lesson)"
    p = plateau_rank(losses)
    items = sorted((int(k), num(v)) for k, v in losses.items())
    return Measurement(p, f"{where} val loss " + ", ".join(f"r={k} {v:.3f}" for k, v in items),
                       relation_text=f"within 2% of the best from r = {p}")


def _low_rank_update(r) -> Measurement:
    r90 = r.get("lora", "rank_for_90pct_energy")
    table = r.get("lora", "parameters", "table")
    side = {row["module"]: min(row["shape"]) for row in table}
    module = lambda name: name.split(".", 2)[-1]  # 'h.0.attn.c_attn' -> 'attn.c_attn'  # noqa: E731
    fr = [num(v) / side[module(k)] for k, v in r90.items() if module(k) in side]
    if not fr:
        raise Missing("the lora run's rank_for_90pct_energy names no module of parameters.table")
    q = float(np.mean(fr))
    return Measurement(q, f"90% of the full fine-tuning update's energy lies in rank {np.mean(list(map(num, r90.values()))):.1f} "
                          f"on average, of {int(np.mean(list(side.values())))}",
                       relation_text=f"rank for 90% / matrix side = {q:.3f}")


MIN_BLEU = 0.01  # below 1 BLEU point a method has not learned E2E (a quick run): ratios of such scores mean nothing


def _checked(key: str, bleu) -> float:
    b = num(bleu, f"{key} BLEU")
    if b < MIN_BLEU:
        raise Missing(f"{key}'s BLEU is {100 * b:.2f} (< 1 point): this run did not learn E2E, so its ratios "
                      "mean nothing (a quick run, or the CPU budget; the GPU run carries the verdict)")
    return b


def _bleu(r, candidates):
    key, bleu = r.first("e2e", ("methods",), candidates, "BLEU")
    return key, _checked(key, bleu)


def _vs_full(candidates, label):
    def measure(r) -> Measurement:
        key, b = _bleu(r, candidates)
        f = _checked("full", r.get("e2e", "methods", "full", "BLEU"))
        q = ratio(b, f)
        return Measurement(q, f"{label} ({key}) {100 * b:.1f} vs full fine-tuning {100 * f:.1f} BLEU",
                           relation_text=f"{label}/FT = {q:.2f}")
    return measure


def _lora_all_vs_full(r) -> Measurement:
    """LoRA on every linear layer with its rank chosen on validation (``lora_all_tuned``, r >= LoRA's own),
    as full fine-tuning's learning rate is; a run from before that row reads ``methods.lora_all``."""
    if not r.has("e2e", "lora_all_tuned"):
        return _vs_full(LORA_ALL, "LoRA all-linear")(r)
    t = r.get("e2e", "lora_all_tuned")
    b = _checked("lora_all_tuned", r.get("e2e", "lora_all_tuned", "BLEU"))
    f = _checked("full", r.get("e2e", "methods", "full", "BLEU"))
    q = ratio(b, f)
    return Measurement(q, f"LoRA all-linear (r={t.get('r')}, rank chosen on validation from r in "
                          f"{t.get('ranks_considered')}) {100 * b:.1f} vs full fine-tuning {100 * f:.1f} BLEU",
                       relation_text=f"LoRA all-linear/FT = {q:.2f}")


def _all_vs_attention(r) -> Measurement:
    _checked("full", r.get("e2e", "methods", "full", "BLEU"))  # a run that learned nothing compares nothing
    ka, la = r.first("e2e", ("methods",), LORA_ALL, "val_loss")
    kp, lp = r.first("e2e", ("methods",), LORA_PAPER, "val_loss")
    q = ratio(la, lp)
    return Measurement(q, f"val loss: every linear layer ({ka}) {num(la):.3f}, attention only ({kp}) {num(lp):.3f}",
                       relation_text=f"all/attention = {q:.3f}")


def _lora_vs_peft(r) -> Measurement:
    key, b = _bleu(r, LORA_PAPER)
    others = {k: _checked(k, r.get("e2e", "methods", k, "BLEU")) for k in ("adapter_small", "adapter_large", "prefix")}
    best = max(others, key=others.get)
    q = ratio(b, others[best])
    return Measurement(q, f"LoRA ({key}) {100 * b:.1f} BLEU; best other PEFT {best} {100 * others[best]:.1f}",
                       relation_text=f"LoRA/best other = {q:.2f}")


def _adapter_vs_top2(r) -> Measurement:
    m = _pair("adapter_large", "top2", "adapter", "FT-Top2")(r)
    if not (r.has("e2e", "methods", "top2", "trainable") and r.has("e2e", "methods", "full", "trainable")):
        return m
    share = num(r.get("e2e", "methods", "top2", "trainable")) / num(r.get("e2e", "methods", "full", "trainable"))
    note = (f"FT-Top2 here trains {100 * share:.0f}% of the base's parameters (the top 2 blocks of a shallow base), "
            "against 7% (25.19M of 354.92M) in the course's GPT-2 Medium.")
    return dataclasses.replace(m, note=note)


def _pair(a, b, label_a, label_b):
    def measure(r) -> Measurement:
        x, y = _checked(a, r.get("e2e", "methods", a, "BLEU")), _checked(b, r.get("e2e", "methods", b, "BLEU"))
        q = ratio(x, y)
        return Measurement(q, f"{label_a} {100 * x:.1f} vs {label_b} {100 * y:.1f} BLEU",
                           relation_text=f"{label_a}/{label_b} = {q:.2f}")
    return measure


BLEU_MATCH = (at_least(0.95), at_least(0.85))  # the "within 5% of full fine-tuning's BLEU or beats it"

CLAIMS = [
    Claim("lora-no-latency",
          "LoRA adds no inference latency: merged, W0 + BA is an ordinary weight",
          SEED_CMU, "no added latency when merged", 1.0, "lora", _no_latency,
          Rule("merged LoRA / base forward time", at_most(1.05), at_most(1.2))),
    Claim("adapters-add-latency",
          "Adapter layers add inference latency (a downside LoRA removes)",
          SEED_FZENG, "adapters: increased inference latency", None, "lora", _adapter_latency,
          Rule("adapter / base forward time", at_least(1.05), (1.0, float("inf"))),
          "A bottleneck adapter on a tiny base adds few FLOPs to a forward pass dominated by fixed per-op costs; "
          "the paper's latency shows at batch 1 on large models."),
    Claim("lora-rank-plateau",
          "The benefit of a higher LoRA rank plateaus: validation loss stops improving from a small rank on",
          SEED_PEFT, "val loss 1.23 (r=1) ... 1.16 from r=16 (within 2% from r=4)", plateau_rank(COURSE_RANK_LOSS),
          "e2e", _rank_plateau, Rule("smallest r from which every rank is within 2% of the best val loss",
                                     at_most(16), at_most(32)), E2E_SCALE),
    Claim("lora-low-rank-update",
          "Fine-tuning updates have a low intrinsic rank, which is why a low-rank update suffices",
          SEED_FZENG, "over-parameterized models have intrinsic low-rank structure", None, "lora", _low_rank_update,
          Rule("rank holding 90% of the full update's energy / matrix side", at_most(0.25), at_most(0.5))),
    Claim("lora-vs-ft-e2e",
          "LoRA (W_q, W_v, r=4) matches or beats full fine-tuning on E2E",
          SEED_CS639, "BLEU 70.4 vs 68.2 (GPT-2 M)", 70.4 / 68.2, "e2e", _vs_full(LORA_PAPER, "LoRA"),
          Rule("LoRA BLEU / full FT BLEU", *BLEU_MATCH), E2E_SCALE),
    Claim("lora-all-linear-vs-ft-e2e",
          "LoRA on every linear layer (QLoRA's placement) matches full fine-tuning",
          SEED_PEFT, "LoRA adapters at every layer minimize the accuracy trade-off", 1.0, "e2e",
          _lora_all_vs_full, Rule("LoRA (all linear, rank >= 8 chosen on validation) BLEU / full FT BLEU",
                                  *BLEU_MATCH),
          E2E_SCALE),
    Claim("lora-all-vs-attention",
          "Adapting every linear layer, not just attention, trains better at the same rank",
          SEED_PEFT, "LoRA adapters at every layer, not just attention layers", None, "e2e", _all_vs_attention,
          Rule("val loss, all linear / attention only", at_most(0.99), at_most(1.0))),
    Claim("lora-beats-peft-e2e",
          "LoRA works better than the other PEFT methods on E2E (adapters, prefix tuning)",
          SEED_CS639, "LoRA 70.4 > PreLayer 69.7 > Adapter 68.9 BLEU", 70.4 / 69.7, "e2e", _lora_vs_peft,
          Rule("LoRA BLEU / best other PEFT BLEU", at_least(1.0), at_least(0.95)), E2E_SCALE),
    Claim("prefix-vs-ft-e2e",
          "Prefix tuning with 0.1% of the parameters is comparable to fine-tuning on table-to-text",
          SEED_CS639, "E2E BLEU 69.7 vs 68.2", 69.7 / 68.2, "e2e", _pair("prefix", "full", "prefix", "FT"),
          Rule("prefix BLEU / full FT BLEU", *BLEU_MATCH), E2E_SCALE),
    Claim("adapter-size-e2e",
          "A larger adapter (3% of parameters) beats a small one (0.1%) on E2E",
          SEED_CS639, "BLEU 68.9 vs 66.3", 68.9 / 66.3, "e2e",
          _pair("adapter_large", "adapter_small", "large adapter", "small adapter"),
          Rule("large / small adapter BLEU", at_least(1.0), at_least(0.97)), E2E_SCALE),
    Claim("adapters-beat-top-layers",
          "Fine-tuning only the top layers is outperformed by adapters",
          SEED_FZENG, "E2E BLEU: Adapter (3%) 68.9 vs FT-Top2 68.1", 68.9 / 68.1, "e2e",
          _adapter_vs_top2,
          Rule("adapter BLEU / FT-Top2 BLEU", at_least(1.0), at_least(0.95)), E2E_SCALE),
]
