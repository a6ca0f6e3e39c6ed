"""Claims about the memory of fine-tuning: the course's arithmetic, recomputed, and one real step, measured.

Arithmetic claims call minipeft's calculator (``minipeft.memory``: ``estimate_memory``,
``course_figures``, ``lora_matrix_param_count``, ``quant_constant_bits``); their source
names the function. Measured claims read the QLoRA lesson's recorded step
(``methods.<method>.measured.<category>``, ``optimizers``).
"""
from __future__ import annotations

from ._util import fmt, num, ratio, worst_ratio
from .core import SEED_CMU, SEED_CS639, SEED_FZENG, SEED_PEFT, Claim, Measurement
from .results import Missing
from .rules import Rule, at_least, at_most

GB = 1e9
WITHIN_1PCT = ((0.99, 1.01), (0.9, 1.1))  # arithmetic the course states exactly
COURSE_FIGURES = "minipeft.memory_course.course_figures()"


def _figure(r, case_start: str):
    """The course_figures() row whose case starts with ``case_start``."""
    from ..memory_course import course_figures

    r.computed(COURSE_FIGURES)
    for f in course_figures():
        if f.case.startswith(case_start):
            return f
    raise Missing(f"{COURSE_FIGURES} has no case starting {case_start!r} (was it renamed?)")


def _full_ft_24gb(r) -> Measurement:
    from ..memory import GB as _GB, MethodConfig, StepSetup, estimate_memory

    r.computed("minipeft.memory.estimate_memory(1.5e9, full, fp32 AdamW)")
    b = estimate_memory(1.5e9, MethodConfig("full"), StepSetup(weight_dtype="float32", optimizer="adamw"))
    gb = b.total / _GB
    return Measurement(gb, f"{fmt(gb)} GB (weights {b.weights_trainable / _GB:.0f} + gradients "
                           f"{b.gradients / _GB:.0f} + Adam state {b.optimizer_state / _GB:.0f} GB)",
                       relation=gb / 24, relation_text=f"minipeft/course = {gb / 24:.3f}")


def _bytes_per_param(r) -> Measurement:
    n = num(r.get("qlora", "methods", "full", "trainable"), "trainable")
    parts = {k: num(r.get("qlora", "methods", "full", "measured", k), k)
             for k in ("weights_trainable", "gradients", "optimizer_state")}
    per = {k: v / n for k, v in parts.items()}
    total = sum(per.values())
    return Measurement(total, f"measured {total:.2f} B/param (weights {per['weights_trainable']:.2f}, gradients "
                              f"{per['gradients']:.2f}, Adam state {per['optimizer_state']:.2f})",
                       relation=total / 16, relation_text=f"minipeft/course = {total / 16:.3f}")


def _gpt3_lora_share(r) -> Measurement:
    from ..memory import gpt2_param_count, lora_param_count

    r.computed("minipeft.memory.lora_param_count('gpt3-175b', (c_attn.q, c_attn.v), r=4)")
    n = lora_param_count("gpt3-175b", ("c_attn.q", "c_attn.v"), 4)
    share = 100 * n / gpt2_param_count("gpt3-175b")
    w = worst_ratio([(n / 1e6, 18), (share, 0.01)])
    return Measurement(share, f"{n / 1e6:.1f}M trainable = {share:.4f}% of 174.6B", relation=w,
                       relation_text=f"worst minipeft/course ratio = {w:.3f}")


def _gpt3_lora_memory(r) -> Measurement:
    full = _figure(r, "GPT-3 full FT, all 16-bit")
    lora = _figure(r, "GPT-3 LoRA r=4 (Wq, Wv): fp16 frozen weights")
    w = worst_ratio([(full.minipeft, full.course), (lora.minipeft, lora.course)])
    return Measurement(lora.minipeft, f"full FT {full.minipeft:.2f} TB -> LoRA {lora.minipeft:.0f} GB",
                       relation=w, relation_text=f"worst minipeft/course ratio = {w:.2f}")


def _gpt3_gpus(r) -> Measurement:
    states = _figure(r, "GPT-3 full FT, mixed-precision Adam")
    from ..memory import GB as _GB, gpt2_param_count

    r.computed("minipeft.memory.gpt2_param_count('gpt3-175b')")
    serve = -(-2 * gpt2_param_count("gpt3-175b") // int(40 * _GB))  # fp16 weights on A100-40GB
    lo = min(states.minipeft / 80, serve / 10)
    hi = max(states.minipeft / 80, serve / 10)
    return Measurement(states.minipeft, f"model states alone fill {states.minipeft:.0f} A100-40GB; fp16 weights "
                                        f"alone fill {serve}", relation=hi if hi > 1 else lo,
                       relation_text=f"minipeft/course = {states.minipeft / 80:.2f} (fine-tune), {serve / 10:.2f} (serve)")


def _qlora_single_gpu(r) -> Measurement:
    big = _figure(r, "llama-65b QLoRA")
    mid = _figure(r, "llama-33b QLoRA")
    worst = max(big.minipeft / 48, mid.minipeft / 24)
    return Measurement(big.minipeft, f"65B: {big.minipeft:.1f} GB of 48; 33B: {mid.minipeft:.1f} GB of 24 "
                                     "(weights, constants, LoRA, gradients; Adam state paged)",
                       relation=worst, relation_text=f"largest share of the GPU = {worst:.2f}")


def _guanaco_sizes(r) -> Measurement:
    from ..memory import RAW_COUNTS
    from ..quant import bits_per_parameter

    r.computed("minipeft.quant.bits_per_parameter(4, 64, double_quant=True) x minipeft.memory.RAW_COUNTS")
    bits = bits_per_parameter(4, 64, double_quant=True)
    course = {"llama-65b": 41, "llama-33b": 21, "llama-13b": 10, "llama-7b": 6}
    ours = {k: RAW_COUNTS[k] * bits / 8 / GB for k in course}
    inside = sum(0.5 * course[k] <= ours[k] <= course[k] for k in course)
    return Measurement(ours["llama-65b"], ", ".join(f"{k[6:].upper()} {ours[k]:.1f} GB" for k in course)
                       + f" (4-bit base at {bits:.3f} bit/param)", relation=inside / len(course),
                       relation_text=f"{inside} of {len(course)} within [0.5, 1] x the course's footprint")


def _dq_saving_65b(r) -> Measurement:
    from ..memory import RAW_COUNTS, quant_constant_bits

    r.computed("minipeft.memory.quant_constant_bits(64) - quant_constant_bits(64, double_quant=True)")
    saved = quant_constant_bits(64) - quant_constant_bits(64, double_quant=True)
    gb = RAW_COUNTS["llama-65b"] * saved / 8 / GB
    return Measurement(gb, f"saves {saved:.3f} bit/param = {gb:.2f} GB at 65.2B", relation=gb / 3,
                       relation_text=f"minipeft/course = {gb / 3:.3f}")


def _lora_512x64(r) -> Measurement:
    from ..memory import lora_matrix_param_count

    if r.has("lora", "course_example", "lora"):
        n, full = num(r.get("lora", "course_example", "lora")), num(r.get("lora", "course_example", "full"))
    else:
        r.computed("minipeft.memory.lora_matrix_param_count(512, 64, 8)")
        n, full = lora_matrix_param_count(512, 64, 8), 512 * 64
    cut = 100 * (1 - n / full)
    return Measurement(cut, f"{n:,.0f} trainable instead of {full:,.0f}: {cut:.1f}% fewer", relation=cut / 86,
                       relation_text=f"minipeft/course = {cut / 86:.3f}")


def _activations_dominate(r) -> Measurement:
    act = num(r.get("qlora", "methods", "lora", "measured", "activations"), "activations")
    lora = num(r.get("qlora", "methods", "lora", "measured", "weights_trainable"), "LoRA weights")
    q = act / lora
    return Measurement(q, f"one LoRA step: activations {act / 1e6:.1f} MB, LoRA parameters {lora / 1e6:.2f} MB",
                       relation_text=f"activations / LoRA parameters = {q:.0f}")


def _optimizer_row(r, name: str):
    for row in r.get("qlora", "optimizers"):
        if row and row[0] == name:
            return row
    raise Missing(f"the qlora run's optimizers table has no {name!r} row")


def _adamw8bit(r) -> Measurement:
    q = ratio(_optimizer_row(r, "AdamW8bit")[1], _optimizer_row(r, "AdamW (32-bit)")[1], "8-bit / 32-bit state")
    return Measurement(q, f"8-bit AdamW state is {q:.3f} of 32-bit AdamW's (full fine-tuning, measured)",
                       relation_text=f"8-bit/32-bit = {q:.3f}")


def _paged(r) -> Measurement:
    row = _optimizer_row(r, "PagedAdamW")
    q = ratio(row[2], row[1], "device peak / state")
    return Measurement(q, f"paged AdamW keeps at most {q:.2f} of its state on the device ({row[3]})",
                       relation_text=f"device peak / state = {q:.2f}")


def _base_4bit(r) -> Measurement:
    key = r.first("quantization", ("model",), ("NF4 + double quant", "NF4"), "bits_per_weight")[1]
    bits = num(key, "bits per weight")
    return Measurement(bits, f"NF4 + double quant linear layers: {bits:.3f} bits per weight (measured bytes)",
                       relation=bits / 4, relation_text=f"bits/4 = {bits / 4:.3f}")


CLAIMS = [
    Claim("memory-full-ft-24gb",
          "Full fine-tuning a 1.5B model in fp32 with Adam needs at least 1.5B x (4 + 4 + 8) bytes = 24 GB",
          SEED_FZENG, "24 GB", 24, "qlora", _full_ft_24gb,
          Rule("minipeft GB / course GB", *WITHIN_1PCT), from_results=False),
    Claim("memory-16-bytes-per-param",
          "fp32 Adam fine-tuning holds 16 bytes per trained parameter: weights 4, gradients 4, Adam m and v 8",
          SEED_FZENG, "4 + 4 + 8 = 16 B/param", 16, "qlora", _bytes_per_param,
          Rule("measured bytes per parameter / 16", *WITHIN_1PCT)),
    Claim("lora-gpt3-trainable",
          "LoRA on Wq and Wv (r=4) trains only ~0.01% of GPT-3 175B's parameters (18M)",
          SEED_FZENG, "18M, 0.01%", 0.01, "lora", _gpt3_lora_share,
          Rule("worst minipeft/course ratio over (18M, 0.01%)", at_most(1.1), at_most(1.5)), from_results=False),
    Claim("lora-gpt3-memory",
          "LoRA cuts GPT-3 175B's training memory from 1.2 TB to 350 GB (no gradients or Adam state for frozen "
          "weights)", SEED_CS639, "1.2 TB -> 350 GB", 350, "qlora", _gpt3_lora_memory,
          Rule("worst minipeft/course ratio over (1.2 TB, 350 GB)", at_most(1.05), at_most(1.25)),
          "The paper's 1.2 TB is measured; no standard accounting of 16-bit weights, gradients and Adam state "
          "(8 B/param) gives it: that is 1.40 TB.", from_results=False),
    Claim("gpt3-gpus",
          "Fine-tuning 175B GPT-3 takes eighty A100-40GB GPUs; serving one fine-tuned copy takes ten",
          SEED_CMU, "80 GPUs to fine-tune, 10 to serve", 80, "qlora", _gpt3_gpus,
          Rule("minipeft's GPU count (states / weights alone) / course's", (0.8, 1.0), (0.5, 1.0)),
          from_results=False),
    Claim("qlora-single-gpu",
          "QLoRA fine-tunes a 65B model on one 48 GB GPU and a 33B model on one 24 GB GPU",
          SEED_CS639, "65B in < 48 GB, 33B in < 24 GB", 1.0, "qlora", _qlora_single_gpu,
          Rule("largest share of the GPU taken before activations", at_most(0.95), at_most(1.0)),
          from_results=False),
    Claim("qlora-model-sizes",
          "4-bit Guanaco models take 41 / 21 / 10 / 6 GB at 65B / 33B / 13B / 7B parameters",
          SEED_CS639, "41 / 21 / 10 / 6 GB", 1.0, "qlora", _guanaco_sizes,
          Rule("share of sizes whose 4-bit base lies within [0.5, 1] x the course's footprint", at_least(1.0),
               at_least(0.5)), from_results=False),
    Claim("qlora-dq-saves-3gb",
          "Double quantization saves about 0.4 bits per parameter, about 3 GB on a 65B model",
          SEED_PEFT, "~0.4 bit/param, ~3 GB at 65B", 3, "qlora", _dq_saving_65b,
          Rule("minipeft GB / course GB", (0.95, 1.05), (0.8, 1.25)), from_results=False),
    Claim("lora-512x64-r8",
          "LoRA r=8 on a 512 x 64 weight trains 512 + 4,096 parameters instead of 32,768: 86% fewer",
          SEED_PEFT, "4,608 vs 32,768: 86% fewer", 86, "lora", _lora_512x64,
          Rule("minipeft % / course %", (0.995, 1.005), *WITHIN_1PCT[1:])),
    Claim("lora-activations-dominate",
          "Most of LoRA's training memory is activations, not adapter parameters "
          "(LLaMA 7B, batch 1: input gradients 567 MB vs LoRA parameters 26 MB)",
          SEED_FZENG, "567 MB vs 26 MB: 22x", 567 / 26, "qlora", _activations_dominate,
          Rule("measured activations / LoRA parameter bytes", at_least(10), at_least(1))),
    Claim("optim-8bit-quarter",
          "8-bit (block-wise quantized) Adam state takes about a quarter of 32-bit state: 75% less memory",
          SEED_FZENG, "8-bit states: 2.03 of 8 B/param (75% less)", 0.25, "qlora", _adamw8bit,
          Rule("measured 8-bit / 32-bit state bytes", at_most(0.3), at_most(0.5)),
          "Tensors under 4,096 elements keep 32-bit state (as bitsandbytes); in a tiny model they are a large share."),
    Claim("optim-paged",
          "Paged optimizers move optimizer state between GPU and CPU memory so memory spikes do not run out of "
          "device memory", SEED_FZENG, "state paged to the host; spikes absorbed", None, "qlora", _paged,
          Rule("device peak / optimizer state bytes", at_most(0.5), at_most(0.99))),
    Claim("qlora-4bit-base",
          "QLoRA stores the frozen base in 4-bit NormalFloat: about a quarter of its 16-bit size",
          SEED_CS639, "16 -> 4 bits per weight", 1.0, "quantization", _base_4bit,
          Rule("measured bits per weight / 4", at_most(1.1), at_most(1.5)),
          "Block constants and the per-tensor code tables add to the 4 bits; small tensors pay more per weight."),
]
