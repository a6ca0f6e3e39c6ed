"""The course's memory figures, each recomputed by the calculator from its inputs.

Each row states what is computed, the number ``minipeft.memory`` gives, the number the
lecture notes (or the paper they cite) state, and the relation that must hold between them
(≈ within a tolerance, or a bound). ``minipeft.claims`` and the QLoRA lesson print them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .memory import (GB, MB, RAW_COUNTS, MethodConfig, StepSetup, estimate_memory, gpt2_param_count,
                     lora_matrix_param_count, lora_param_count, quant_constant_bits)


@dataclass(frozen=True)
class CourseFigure:
    case: str  # what is computed
    minipeft: float  # computed here from the case's inputs
    course: float  # as stated in the lecture notes / issue
    unit: str
    relation: str = "≈"  # '≈' within rel_tol, '≤' / '<' a bound the course number states
    rel_tol: float = 0.01
    note: str = ""

    @property
    def ok(self) -> bool:
        if self.relation == "≤":
            return self.minipeft <= self.course * (1 + 1e-12)
        if self.relation == "<":
            return self.minipeft < self.course
        if self.relation == "≥":
            return self.minipeft >= self.course * (1 - 1e-12)
        return abs(self.minipeft - self.course) <= self.rel_tol * abs(self.course)


# LLaMA dims (released configs: layers, hidden, intermediate) only to size QLoRA's r=64 adapters
_LLAMA_DIMS = {"llama-33b": (60, 6656, 17920), "llama-65b": (80, 8192, 22016)}


def course_figures() -> list[CourseFigure]:
    """Each course memory figure recomputed from its inputs, next to the number the course states."""
    F = CourseFigure
    rows = []
    full32 = StepSetup(weight_dtype="float32", optimizer="adamw")
    b = estimate_memory(1.5e9, MethodConfig("full"), full32)
    rows.append(F("1.5B params, fp32 AdamW: weights 4 + grads 4 + m,v 8 B/param", b.total / GB, 24, "GB",
                  note="model states only; activations, buffers and fragmentation come on top"))
    b = estimate_memory("gpt2-xl", MethodConfig("full"), full32)
    rows.append(F("GPT-2 XL exact count (1,557,611,200), same accounting, states only",
                  (b.total - b.activations) / GB, 24, "GB", "≥"))
    bits, dq = quant_constant_bits(64), quant_constant_bits(64, double_quant=True)
    rows.append(F("block-wise fp32 absmax constants, block 64", bits, 0.5, "bit/param", rel_tol=0))
    rows.append(F("double quant: 8-bit constants + fp32 per 256 blocks", dq, 0.127, "bit/param", rel_tol=0.005))
    rows.append(F("double quant: reduction of constant memory", 100 * (1 - dq / bits), 75, "%", rel_tol=0.01))
    rows.append(F("double quant saving at 65B (LLaMA 65.2B)", RAW_COUNTS["llama-65b"] * (bits - dq) / 8 / GB, 3,
                  "GB", rel_tol=0.05, note=f"saving {bits - dq:.3f} bit/param (course: ~0.4)"))
    lo = lora_matrix_param_count(512, 64, 8)
    rows.append(F("LoRA r=8 on 512x64: trainable (A 8x64 + B 512x8)", lo, 512 + 4096, "params", rel_tol=0))
    rows.append(F("LoRA r=8 on 512x64: trainable cut vs 32,768", 100 * (1 - lo / (512 * 64)), 86, "%", rel_tol=0.005))
    g3 = gpt2_param_count("gpt3-175b")
    rows.append(F("GPT-3 175B parameters from its shape (96 x 12288, vocab 50257, ctx 2048)", g3 / 1e9, 175, "B",
                  note="tied head, GPT-2 architecture"))
    lq = MethodConfig("lora", targets=("c_attn.q", "c_attn.v"), r=4)
    nl = lora_param_count("gpt3-175b", lq.targets, 4)
    rows.append(F("GPT-3 LoRA r=4 on Wq, Wv: trainable", nl / 1e6, 18, "M", rel_tol=0.05,
                  note="LoRA paper §7.1 budget of 18M; the course's '18M' is rounded down"))
    rows.append(F("GPT-3 LoRA r=4 on Wq, Wv: share of all parameters", 100 * nl / g3, 0.01, "%", rel_tol=0.1))
    half = StepSetup(batch_size=1, seq_len=1, weight_dtype="float16", state_dtype="float16")
    b = estimate_memory("gpt3-175b", MethodConfig("full"), half)
    rows.append(F("GPT-3 full FT, all 16-bit: weights, grads, Adam m, v (8 B/param)", (b.total - b.activations) / 1e12,
                  1.2, "TB", rel_tol=0.2, note="the paper's 1.2 TB is measured; it implies "
                  f"{1.2e12 / g3:.2f} B/param: no standard accounting gives it (16 B/param: 2.79 TB)"))
    b = estimate_memory("gpt3-175b", lq, half)
    rows.append(F("GPT-3 LoRA r=4 (Wq, Wv): fp16 frozen weights + LoRA states", (b.total - b.activations) / GB,
                  350, "GB", note="= the fp16 checkpoint: 2 B x 174.6B; LoRA adds 0.15 GB"))
    rows.append(F("GPT-3 LoRA checkpoint (A, B in fp16)", nl * 2 / MB, 35, "MB", rel_tol=0.1,
                  note="LoRA paper: 350 GB -> 35 MB"))
    b = estimate_memory("gpt3-175b", MethodConfig("full"), StepSetup(
        seq_len=1, weight_dtype="float16", state_dtype="float32", master_weights=True))
    rows.append(F("GPT-3 full FT, mixed-precision Adam (16 B/param): A100-40GB GPUs for states",
                  math.ceil((b.total - b.activations) / (40 * GB)), 80, "GPUs", "≤",
                  note="states alone; activations and buffers need the rest"))
    for name, course in (("llama-7b", 6), ("llama-13b", 10), ("llama-33b", 21), ("llama-65b", 41)):
        n = RAW_COUNTS[name]
        rows.append(F(f"{name} ({n / 1e9:.1f}B) 4-bit base, NF4 bs 64 + double quant", n * (4 + dq) / 8 / GB,
                      course, "GB", "≤", note="course: Guanaco footprint (base + adapters + 16-bit parts)"))
    rows.append(F("llama-13b in 16 bit (Vicuna 13B)", RAW_COUNTS["llama-13b"] * 2 / GB, 26, "GB"))
    for name, gpu in (("llama-65b", 48), ("llama-33b", 24)):
        L, d, ff = _LLAMA_DIMS[name]
        n_lora = L * 64 * (4 * (d + d) + 3 * (d + ff))  # r=64 on q,k,v,o,gate,up,down
        b = estimate_memory(name, MethodConfig("qlora", trainable_params=n_lora), StepSetup(
            weight_dtype="bfloat16", optimizer="paged_adamw"))
        rows.append(F(f"{name} QLoRA (r=64 all linears, bf16 LoRA, paged fp32 AdamW) on device",
                      b.device_total / GB, gpu, "GB", "<", note=f"{gpu - b.device_total / GB:.1f} GB left for "
                      f"activations; {n_lora / 1e6:.0f}M LoRA params"))
    b = estimate_memory("llama-65b", MethodConfig("full"), StepSetup(weight_dtype="float16"))
    rows.append(F("llama-65b 16-bit full FT: fp16 W + grads + fp32 m, v (12 B/param)", b.total / GB, 780, "GB",
                  "≥", note="QLoRA paper '>780 GB' (methods.md §18.4, unverified)"))
    return rows


def format_course_figures(rows=None) -> str:
    rows = course_figures() if rows is None else rows
    out = [f"{'case':<78}{'minipeft':>12} {'course':>9} {'unit':<10} ok"]
    for r in rows:
        out.append(f"{r.case:<78}{r.minipeft:>12.6g} {r.relation}{r.course:>8g} {r.unit:<10} "
                   f"{'yes' if r.ok else 'NO'}{'  ' + r.note if r.note else ''}")
    return "\n".join(out)
