"""Claims about quantization: absmax vs zero-point, blocks, NF4, double quantization, bfloat16, LLM.int8().

Read from the quantization lesson's result (``absmax_codes_used``, ``outlier``, ``codes_4bit``,
``overhead``, ``floats``, ``llm_int8``, ``tiny_outliers``); where a number is pure
arithmetic and the lesson did not record it, computed with ``minipeft.quant``.
"""
from __future__ import annotations

import math

from ._util import num, ratio
from .core import SEED_CMU, SEED_FZENG, Claim, Measurement, OutOfScale
from .rules import Rule, at_least, at_most

Q = "quantization"


def _zeropoint(r) -> Measurement:
    a, z = num(r.get(Q, "absmax_codes_used")), num(r.get(Q, "zeropoint_codes_used"))
    ea, ez = num(r.get(Q, "absmax_error")), num(r.get(Q, "zeropoint_error"))
    q = z / a
    return Measurement(q, f"ReLU outputs: absmax uses {a:.0f} of 256 int8 codes, zero-point {z:.0f}; mean |error| "
                          f"{ea:.2e} vs {ez:.2e}", relation_text=f"codes zero-point/absmax = {q:.2f}")


def _blockwise_outlier(r) -> Measurement:
    t = num(r.get(Q, "outlier", "int8 absmax, one scale per tensor", "error_with_outlier"))
    b = num(r.get(Q, "outlier", "int8 absmax, blocks of 64", "error_with_outlier"))
    q = t / b
    return Measurement(q, f"one outlier of 40: mean |error| of the other values {t:.4f} (one scale) vs {b:.4f} "
                          "(blocks of 64)", relation_text=f"tensor-wise/block-wise error = {q:.1f}")


def _overhead(r, plain_fn: bool):
    mkey = "measured_plain" if plain_fn else "measured_double_quant"
    if r.has(Q, "overhead", mkey):
        return num(r.get(Q, "overhead", mkey)), "measured from the stored constants"
    from ..quant import bits_per_parameter

    r.computed(f"minipeft.quant.bits_per_parameter(4, 64, double_quant={not plain_fn})")
    return bits_per_parameter(4, 64, double_quant=not plain_fn) - 4, "computed"


def _constants_plain(r) -> Measurement:
    b, how = _overhead(r, True)
    return Measurement(b, f"{b:.4f} bit/param ({how})", relation=b / 0.5, relation_text=f"minipeft/course = {b / 0.5:.3f}")


def _constants_dq(r) -> Measurement:
    b, how = _overhead(r, False)
    return Measurement(b, f"{b:.4f} bit/param ({how}); {100 * (1 - b / 0.5):.1f}% less than 0.5",
                       relation=b / 0.127, relation_text=f"minipeft/course = {b / 0.127:.3f}")


def _nf4(r) -> Measurement:
    e = {k: num(r.get(Q, "codes_4bit", k, "abs"), f"{k} error") for k in ("nf4", "fp4", "int4")}
    q = e["nf4"] / min(e["fp4"], e["int4"])
    return Measurement(e["nf4"], f"mean |error| on N(0,1), block 64: NF4 {e['nf4']:.4f}, FP4 {e['fp4']:.4f}, "
                                 f"Int4 {e['int4']:.4f}", relation=q, relation_text=f"NF4 / best other = {q:.3f}")


def _bfloat16(r) -> Measurement:
    f = lambda name, k: num(r.get(Q, "floats", name, k), f"{name} {k}")  # noqa: E731
    range_ok = f("N(0,1) x 1e5 bfloat16", "overflow") < f("N(0,1) x 1e5 float16", "overflow")
    prec_ok = f("N(0,1) bfloat16", "rel_error") > f("N(0,1) float16", "rel_error")
    n = (int(range_ok) + int(prec_ok)) / 2
    return Measurement(n, f"N(0,1) x 1e5 overflows: float16 {f('N(0,1) x 1e5 float16', 'overflow'):.0%}, bfloat16 "
                          f"{f('N(0,1) x 1e5 bfloat16', 'overflow'):.0%}; relative error on N(0,1): bfloat16 "
                          f"{f('N(0,1) bfloat16', 'rel_error'):.1e}, float16 {f('N(0,1) float16', 'rel_error'):.1e}",
                       relation_text=f"{int(2 * n)} of 2 (wider range, less precision)")


def _outliers_essential(r) -> Measurement:
    loss = num(r.get(Q, "tiny_outliers", "loss"))
    top, rand = num(r.get(Q, "tiny_outliers", "zero_top_loss")), num(r.get(Q, "tiny_outliers", "zero_random_loss"))
    dims = num(r.get(Q, "tiny_outliers", "outlier_dims"))
    inc_top, inc_rand = math.exp(top - loss) - 1, math.exp(rand - loss) - 1
    if dims == 0:
        raise OutOfScale(f"no outlier features (|x| >= 6) emerge in minipeft's tiny base (the course: from 6.7B "
                         f"parameters); zeroing its largest feature changes perplexity by {100 * inc_top:+.2f}%, a "
                         f"random one by {100 * inc_rand:+.2f}%")
    q = inc_top / inc_rand if inc_rand > 0 else math.inf
    return Measurement(100 * inc_top, f"perplexity {100 * inc_top:+.1f}% zeroing the outlier features, "
                                      f"{100 * inc_rand:+.2f}% zeroing as many random ones ({dims:.0f} outlier dims)",
                       relation=q, relation_text=f"top/random increase = {q:.1f}")


def _int8_decomposition(r) -> Measurement:
    plain = num(r.get(Q, "llm_int8", "errors", "int8"))
    mixed = num(r.get(Q, "llm_int8", "errors", "llm_int8"))
    q = ratio(plain, mixed, "int8 / LLM.int8() error")
    return Measurement(q, f"relative matmul error on activations with outlier features: int8 {plain:.4f}, LLM.int8() "
                          f"{mixed:.4f}", relation_text=f"int8/LLM.int8() = {q:.1f}",
                       note="synthetic activations with planted outlier features (the tiny base has none)")


CLAIMS = [
    Claim("quant-zeropoint",
          "Absmax quantization wastes codes on asymmetric data (ReLU outputs are never negative); zero-point "
          "quantization uses the whole range", SEED_FZENG, "absmax leaves the negative half unused (2x fewer codes)",
          2.0, Q, _zeropoint, Rule("codes used, zero-point / absmax", at_least(1.5), at_least(1.0))),
    Claim("quant-blockwise-outlier",
          "Block-wise quantization isolates outliers: one large value no longer ruins the precision of the "
          "small common values", SEED_FZENG, "blocks improve precision by isolating outliers", None, Q,
          _blockwise_outlier, Rule("error of the other values, one scale / blocks of 64", at_least(3), at_least(1))),
    Claim("quant-blockwise-constants",
          "Block-wise quantization with blocks of 64 and fp32 constants costs 32/64 = 0.5 bits per parameter",
          SEED_CMU, "0.5 bit/param", 0.5, Q, _constants_plain,
          Rule("minipeft bits / course bits", (0.99, 1.01), (0.9, 1.1))),
    Claim("quant-double-quant",
          "Double quantization cuts the constants to 8/64 + 32/(64 x 256) = 0.127 bits per parameter (75% less)",
          SEED_CMU, "0.127 bit/param", 0.127, Q, _constants_dq,
          Rule("minipeft bits / course bits", (0.98, 1.02), (0.9, 1.1)),
          "Measured on a finite tensor: whole blocks and the one fp32 offset add to the large-tensor limit."),
    Claim("quant-nf4-lowest-error",
          "4-bit NormalFloat has a lower quantization error than FP4 and Int4 on normally distributed weights",
          SEED_FZENG, "bitsandbytes, block 64: NF4 0.0728 vs FP4 0.0965 mean |error|", 0.0728 / 0.0965, Q, _nf4,
          Rule("NF4 error / lowest of FP4, Int4", at_most(0.95), at_most(1.0))),
    Claim("quant-bfloat16-range",
          "bfloat16 spends more bits on the exponent: a wider range than float16, at lower precision",
          SEED_FZENG, "wider range, less significand precision", 1.0, Q, _bfloat16,
          Rule("share of {bfloat16 overflows less, bfloat16 is less precise}", at_least(1.0), at_least(0.5))),
    Claim("quant-outliers-essential",
          "Outlier features are essential: zeroing them raises perplexity by 600-1000%, zeroing as many random "
          "features by 0.1%", SEED_FZENG, "+600-1000% vs +0.1% (6.7B)", 6000, Q, _outliers_essential,
          Rule("perplexity increase, outlier features / random features", at_least(10), at_least(1))),
    Claim("quant-llm-int8",
          "LLM.int8()'s mixed-precision decomposition (outlier dimensions in 16-bit, the rest in int8) keeps "
          "8-bit matrix multiplication accurate", SEED_FZENG, "no degradation with the decomposition", None, Q,
          _int8_decomposition, Rule("error of plain int8 / LLM.int8()", at_least(2), at_least(1))),
]

