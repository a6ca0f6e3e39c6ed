"""Lesson: quantization, from absmax int8 to NF4, double quantization and LLM.int8().

``python -m minipeft.lessons.quantization [--quick] [--device cuda] [--figures DIR]``

Each section measures one claim of the course with minipeft's own quantizers
(``minipeft.quant``) and prints it next to the course's number where there is one:

1. absmax wastes half the int8 codes on ReLU outputs; zero-point uses them all;
2. one outlier ruins a tensor-wise scale; block-wise scales isolate it (Dettmers et al.
   2021, arXiv 2110.02861);
3. NF4 against FP4 against Int4 on Gaussian weights (QLoRA, arXiv 2305.14314, Sec. 3;
   bitsandbytes' measured errors);
4. the cost of the block scales, 0.5 bits per parameter at block 64, and 0.127 with
   double quantization;
5. bfloat16 against float16: range against precision, from the bit-level converters;
6. LLM.int8() (arXiv 2208.07339): outlier features, zeroing them against zeroing random
   features, and the mixed-precision decomposition; measured on synthetic activations
   with planted outlier features and on minipeft's pretrained ``tiny`` model;
7. ``quantize_model`` on the ``tiny`` model: validation loss and bytes, fp32 against NF4,
   FP4, Int4 and int8.
"""
from __future__ import annotations

import copy
import math

import numpy as np

from .figures import quantization as P
from .. import pretrained
from ..backend import to_device, to_numpy, xp_of
from ..data import Corpus
from ..nn import Module
from ..quant import (BFLOAT16, FLOAT16, FLOAT32, FP4, INT4, NF4, absmax_dequantize, absmax_quantize,
                     bits_per_parameter, dequantize_4bit, llm_int8_matmul, outlier_columns, quantize_4bit,
                     round_to_bfloat16, round_to_float16, zeropoint_dequantize, zeropoint_quantize)
from ..quant.modules import model_nbytes, quantize_model
from ._common import Report, finish, parse_args, save_figure

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
# bitsandbytes' measured mean |error| and mean relative error on randn(1024, 1024) (tests/test_functional.py
# test_4bit_quant, PR #1864 means; quantization.md section 9.2)
BNB_ERR = {"nf4": [0.067746, 0.072798, 0.076831, 0.080337, 0.083547, 0.086610, 0.089592, 0.092547],
           "fp4": [0.088925, 0.096543, 0.102969, 0.108684, 0.114115, 0.119333, 0.124556, 0.129536]}
BNB_RELERR_64 = {"nf4": 0.203339, "fp4": 0.260125}
THRESHOLD = 6.0  # LLM.int8()'s outlier threshold
LABEL = {"nf4": "NF4", "fp4": "FP4", "int4": "Int4"}


def main(argv=None) -> dict:
    args = parse_args(argv, __doc__.split("\n")[0])
    rep = Report("Quantization: absmax, zero-point, blocks, NF4, double quantization, bfloat16, LLM.int8()"
                 + (" (quick mode: small sizes)" if args.quick else ""))
    rng = np.random.default_rng(args.seed)
    dev = lambda a: to_device(np.asarray(a), args.device)             # noqa: E731
    S = _sizes(args.quick)
    out = {"quick": args.quick}
    out.update(_absmax_vs_zeropoint(rep, args, rng, dev, S))
    out["outlier"] = _one_outlier(rep, args, rng, dev)
    out["codes_4bit"], out["sweep_4bit"] = _four_bit_codes(rep, args, rng, dev, S)
    out["overhead"] = _scale_overhead(rep, args, rng, dev, S)
    out["floats"] = _floats(rep, args, rng, dev, S)
    out["llm_int8"], synth_max_abs = _llm_int8_synthetic(rep, args, rng, dev, S)
    model = pretrained.load("tiny", device=args.device, quick=args.quick, progress=not args.quick)
    val = dev(Corpus.load("english", max_bytes=1000, val_max_bytes=S["val_bytes"]).val)
    evaluate = lambda m: pretrained.validation_loss(m, val, **S["eval"])  # noqa: E731
    out["tiny_outliers"] = _tiny_outliers(rep, args, rng, model, evaluate, S, synth_max_abs)
    out["model"] = _quantize_tiny(rep, args, model, evaluate, out["codes_4bit"])
    return finish(out, args, report=rep, lesson="quantization")


def _sizes(quick: bool) -> dict:
    return dict(n_relu=1 << 16 if quick else 1 << 20, gauss=(128, 128) if quick else (1024, 1024),
                n_float=1 << 14 if quick else 1 << 20, tokens=128 if quick else 512,
                hidden=256 if quick else 1024, draws=2 if quick else 10, val_bytes=20_000 if quick else None,
                eval=dict(block_size=64, batch_size=4, max_batches=2) if quick
                else dict(block_size=128, batch_size=16, max_batches=10))


def _mean(a) -> float:
    return float(to_numpy(a.astype(xp_of(a).float64).mean()))


def _fig(args, fig, name, rep):
    path = save_figure(fig, args, name)
    if path:
        rep.text(f"figure: {path}")
    else:
        import matplotlib.pyplot as plt

        plt.close(fig)


# ---------------------------------------------------------------- 1. absmax vs zero-point
def _absmax_vs_zeropoint(rep, args, rng, dev, S):
    x = dev(np.maximum(rng.standard_normal(S["n_relu"]), 0).astype(np.float32))   # ReLU outputs, >= 0
    qa, amax = absmax_quantize(x)
    qz, scale, zp = zeropoint_quantize(x)
    ea, ez = (xp_of(x).abs(x - d) for d in (absmax_dequantize(qa, amax), zeropoint_dequantize(qz, scale, zp)))
    used = {k: int(np.unique(to_numpy(q)).size) for k, q in (("absmax", qa), ("zero-point", qz))}
    hi = float(to_numpy(x.max()))
    rep.section("1. Absmax vs zero-point int8 on ReLU outputs (max(0, N(0,1)), all >= 0)")
    rep.table([("int8 codes used (of 256)", used["absmax"], used["zero-point"]),
               ("mean |error|", _mean(ea), _mean(ez)),
               ("max |error|", float(to_numpy(ea.max())), float(to_numpy(ez.max()))),
               ("bound: absmax/254 | range/510", hi / 254, hi / 510)], headers=("", "absmax", "zero-point"))
    rep.text(f"course: 'absmax quantization is wasteful for asymmetric distributions (ReLU activations never "
             f"use negative values)'.\nminipeft: absmax leaves {256 - used['absmax']} codes unused; zero-point's "
             f"mean error is {_mean(ea) / _mean(ez):.2f}x smaller.")
    _fig(args, P.int8_code_histograms({"absmax": to_numpy(qa), "zero-point": to_numpy(qz)},
                                      "int8 codes of ReLU outputs"), "quant_absmax_vs_zeropoint", rep)
    return {"absmax_error": _mean(ea), "zeropoint_error": _mean(ez), "absmax_codes_used": used["absmax"],
            "zeropoint_codes_used": used["zero-point"]}


# ---------------------------------------------------------------- 2. one outlier
def _one_outlier(rep, args, rng, dev):
    n, bs, at, big = 4096, 64, 1000, 40.0
    x = rng.standard_normal(n).astype(np.float32)
    xo = x.copy()
    xo[at] = big
    others = np.arange(n) != at

    def int8(v, per_block):
        q, a = absmax_quantize(v.reshape(-1, bs) if per_block else v, per="row" if per_block else "tensor")
        return absmax_dequantize(q, a).reshape(-1)

    def nf4(v, blocksize):
        return dequantize_4bit(*quantize_4bit(v, blocksize=blocksize, quant_type="nf4"))

    methods = {"int8 absmax, one scale per tensor": lambda v: int8(v, False),
               f"int8 absmax, blocks of {bs}": lambda v: int8(v, True),
               "NF4, one block of 4096": lambda v: nf4(v, 4096),
               f"NF4, blocks of {bs}": lambda v: nf4(v, bs)}
    rows, res, per_block = [], {}, {}
    for name, f in methods.items():
        clean, dirty = (to_numpy(f(dev(v))) for v in (x, xo))
        e_clean = float(np.abs(clean - x)[others].mean())
        e_dirty = float(np.abs(dirty - xo)[others].mean())
        zeroed = float(((dirty == 0) & (xo != 0))[others].mean())
        rows.append((name, e_clean, e_dirty, e_dirty / e_clean, f"{100 * zeroed:.1f}%"))
        res[name] = {"error": e_clean, "error_with_outlier": e_dirty, "zeroed": zeroed}
        if name.startswith("int8"):
            per_block[name] = np.abs(dirty - xo).reshape(-1, bs).mean(axis=1)
    rep.section(f"2. One outlier ({big:g} among {n} N(0,1) values): tensor-wise vs block-wise scales")
    rep.table(rows, headers=("", "mean |err|", "with outlier", "ratio", "others -> 0"))
    rep.text("course: 'large outliers cause common small values to lose accuracy ... block-wise quantization "
             "isolates outliers'.\nminipeft: the outlier multiplies the error of every other value "
             f"{rows[0][3]:.0f}x with one int8 scale, {rows[1][3]:.1f}x with blocks of {bs} (only its own block).")
    _fig(args, P.blockwise_outlier_errors(per_block, at // bs, bs, "One outlier: where the error goes (int8)"),
         "quant_blockwise_outlier", rep)
    return res


# ---------------------------------------------------------------- 3. NF4 / FP4 / Int4
def _four_bit_codes(rep, args, rng, dev, S):
    A = dev(rng.standard_normal(S["gauss"]).astype(np.float32))
    xp = xp_of(A)
    sweep = {qt: {"abs": [], "rel": [], "mse": []} for qt in ("nf4", "fp4", "int4")}
    for bs in BLOCKSIZES:
        for qt, s in sweep.items():
            d = dequantize_4bit(*quantize_4bit(A, blocksize=bs, quant_type=qt)) - A
            s["abs"].append(_mean(xp.abs(d)))
            s["rel"].append(_mean(xp.abs(d) / (xp.abs(A) + np.float32(1e-8))))
            s["mse"].append(_mean(d * d))
    at64 = {qt: {k: v[BLOCKSIZES.index(64)] for k, v in s.items()} for qt, s in sweep.items()}
    rep.section(f"3. 4-bit codes on N(0,1) values {S['gauss']}, block size 64")
    rep.table([(LABEL[qt], f"{BNB_ERR[qt][1]:.4f}" if qt in BNB_ERR else "-", m["abs"],
                f"{BNB_RELERR_64[qt]:.4f}" if qt in BNB_RELERR_64 else "-", m["rel"], m["mse"])
               for qt, m in at64.items()],
              headers=("", "bnb |err|", "minipeft |err|", "bnb rel err", "minipeft rel", "minipeft MSE"))

    def order(key):
        return " < ".join(LABEL[q] for q in sorted(at64, key=lambda q: at64[q][key]))

    rep.text(f"course/bitsandbytes: NF4 ~0.0728 < FP4 ~0.0965 mean |error| (QLoRA: NF4 beats FP4 and Int4).\n"
             f"minipeft, mean |error|:    {order('abs')}\n"
             f"minipeft, mean rel error:  {order('rel')}\n"
             f"minipeft, MSE:             {order('mse')}\n"
             "Int4 (the uniform grid k/7) has a smaller mean |error| and MSE than bnb's FP4 at block 64, but a "
             "larger relative error:\nFP4 spends its codes near zero (0.0052, 0.17, 0.25), where most values lie "
             "but absolute errors are small. NF4 wins on every measure.")
    rep.table([(bs, *(sweep[qt]["abs"][i] for qt in sweep)) for i, bs in enumerate(BLOCKSIZES)],
              headers=("block size", "NF4 |err|", "FP4 |err|", "Int4 |err|"))
    codes = {"NF4": NF4, "FP4": FP4, "Int4": INT4}
    _fig(args, P.four_bit_codes(codes, {LABEL[qt]: (BLOCKSIZES, s["abs"]) for qt, s in sweep.items()},
                                {LABEL[qt]: (BLOCKSIZES, v) for qt, v in BNB_ERR.items()},
                                "4-bit codes on Gaussian weights"), "quant_4bit_codes", rep)
    return at64, {qt: s["abs"] for qt, s in sweep.items()}


# ---------------------------------------------------------------- 4. scale overhead
def _scale_overhead(rep, args, rng, dev, S):
    W = dev(rng.standard_normal(S["gauss"]).astype(np.float32))
    n = int(W.size)
    measured, err = {}, {}
    for dq in (False, True):
        packed, st = quantize_4bit(W, blocksize=64, compress_statistics=dq, quant_type="nf4")
        held = [st.absmax] + ([st.offset, st.state2.absmax] if dq else [])   # scales only (no code tables)
        measured[dq] = 8 * sum(int(a.nbytes) for a in held) / n
        err[dq] = _mean(xp_of(W).abs(dequantize_4bit(packed, st) - W))
    plain, dq = bits_per_parameter(4, 64) - 4, bits_per_parameter(4, 64, True) - 4
    rep.section("4. Scale overhead of block-wise 4-bit quantization (bits per parameter)")
    rep.table([("float32 absmax per block of 64", "0.5", plain, measured[False], err[False]),
               ("double quantization", "0.127", dq, measured[True], err[True]),
               ("reduction", "75%", f"{100 * (1 - dq / plain):.1f}%",
                f"{100 * (1 - measured[True] / measured[False]):.1f}%", "")],
              headers=("", "course", "formula", f"measured {S['gauss']}", "NF4 mean |err|"))
    rep.text("course: 'a block size of 64 with 32-bit constants gives 0.5 bits/parameter ... 8/64 + 32/(64*256) "
             "= 0.127 bits per parameter, reduction of 75%'.\nminipeft: double quantization moves NF4's mean "
             f"|error| from {err[False]:.5f} to {err[True]:.5f} ({100 * (err[True] / err[False] - 1):+.2f}%).")
    pb = [bits_per_parameter(4, b) - 4 for b in BLOCKSIZES]
    qb = [bits_per_parameter(4, b, True) - 4 for b in BLOCKSIZES]
    _fig(args, P.scale_overhead(BLOCKSIZES, pb, qb, 64, "Bits per parameter spent on block scales"),
         "quant_scale_overhead", rep)
    return {"plain": plain, "double_quant": dq, "measured_plain": measured[False], "measured_double_quant":
            measured[True], "nf4_error": err[False], "nf4_error_double_quant": err[True]}


# ---------------------------------------------------------------- 5. bfloat16 vs float16
def _floats(rep, args, rng, dev, S):
    fmts = (FLOAT32, FLOAT16, BFLOAT16)
    rep.section("5. bfloat16 vs float16: range against precision (from the bit patterns)")
    keys = ("exponent_bits", "mantissa_bits", "max", "min_normal", "min_subnormal", "epsilon", "decimal_digits")
    rep.table([(k, *(f.info()[k] for f in fmts)) for k in keys], headers=("", *(f.name for f in fmts)))
    z = rng.standard_normal(S["n_float"]).astype(np.float32)
    data = {"N(0,1)": z, "N(0,1) x 1e5": z * np.float32(1e5), "N(0,1) x 1e-6": z * np.float32(1e-6)}
    rounders = {"float16": round_to_float16, "bfloat16": round_to_bfloat16}
    res, rows = {}, []
    for dname, v in data.items():
        v = dev(v)
        xp = xp_of(v)
        for fname, rnd in rounders.items():
            r = rnd(v)
            lost = ~xp.isfinite(r) | ((r == 0) & (v != 0))
            rel = xp.abs(r - v) / xp.abs(v)
            m = {"rel_error": _mean(rel[~lost]) if bool((~lost).any()) else float("nan"),
                 "overflow": _mean(~xp.isfinite(r)), "to_zero": _mean((r == 0) & (v != 0))}
            res[f"{dname} {fname}"] = m
            rows.append((dname, fname, m["rel_error"], f"{100 * m['overflow']:.2f}%", f"{100 * m['to_zero']:.2f}%"))
    rep.table(rows, headers=("float32 values", "to", "mean rel err", "-> inf", "-> 0"))
    rep.text("course: bfloat16 'uses more bits for exponents to sacrifice significand precision; supports a "
             "wider range of values'.\nminipeft: bfloat16's error is ~8x float16's on ordinary values, but it "
             "keeps values float16 turns into inf or 0.")
    mags = np.logspace(-44, 38, 600)                                   # float32's whole range
    m = dev((mags[:, None] * (1 + rng.random((1, 64)))).astype(np.float32))   # (600, 64) mantissas per magnitude
    curves = {}
    for fname, rnd in rounders.items():
        r = rnd(m)
        xp = xp_of(r)
        rel = xp.where(xp.isfinite(r), xp.abs(r - m) / m, 1.0)
        curves[fname] = to_numpy(xp.minimum(rel, 1.0).mean(axis=1))
    _fig(args, P.float_rounding_error(mags, curves, {"float16": (FLOAT16.min_normal, FLOAT16.max),
                                                     "bfloat16": (BFLOAT16.min_normal, BFLOAT16.max)},
                                      "Rounding float32 to 16 bits"), "quant_bf16_vs_fp16", rep)
    return res


# ---------------------------------------------------------------- 6. LLM.int8(): synthetic
def _llm_int8_synthetic(rep, args, rng, dev, S):
    T, H, k = S["tokens"], S["hidden"], 6
    X = rng.standard_normal((T, H)).astype(np.float32)                 # (T, H) hidden states
    dims = np.sort(rng.choice(H, k, replace=False))                    # outlier feature dimensions
    rows = rng.random(T) < 0.75                                        # ~75% of positions (the paper's 6.7B+)
    X[np.ix_(rows, dims)] = rng.choice([-1.0, 1.0], k) * rng.uniform(6, 40, (int(rows.sum()), k))
    W = (rng.standard_normal((H, H)) / math.sqrt(H)).astype(np.float32)  # (out, in)
    ref = X.astype(np.float64) @ W.T.astype(np.float64)

    def rel(Y) -> float:
        return float(np.linalg.norm(to_numpy(Y) - ref) / np.linalg.norm(ref))

    Xd, Wd = dev(X), dev(W)
    found = [int(d) for d in to_numpy(outlier_columns(Xd, THRESHOLD))]
    keep = lambda drop: dev(np.where(np.isin(np.arange(H), drop), np.float32(0), X))  # noqa: E731
    rand = [rel(keep(rng.choice(np.setdiff1d(np.arange(H), dims), k, replace=False)) @ Wd.T)
            for _ in range(S["draws"])]
    errs = {"int8": rel(llm_int8_matmul(Xd, Wd, threshold=0.0)),
            "llm_int8": rel(llm_int8_matmul(Xd, Wd, threshold=THRESHOLD)),
            "llm_int8_float_outliers": rel(llm_int8_matmul(Xd, Wd, threshold=THRESHOLD, keep_float_outliers=True)),
            "zero_outliers": rel(keep(dims) @ Wd.T), "zero_random": float(np.mean(rand))}
    labels = {"int8": "int8 vector-wise, no decomposition",
              "llm_int8": "LLM.int8(): outlier columns x int8-dequantized W (bnb)",
              "llm_int8_float_outliers": "LLM.int8(): outlier columns x float W (paper)",
              "zero_outliers": f"float, the {k} outlier dims zeroed",
              "zero_random": f"float, {k} random dims zeroed ({S['draws']} draws)"}
    rep.section(f"6a. LLM.int8(): synthetic hidden states ({T} tokens x {H}) with {k} outlier dimensions")
    rep.table([("outlier dims found (|x| >= 6)", "~6-7 (6.7B-13B)", f"{len(found)} {found}"),
               ("share of features", "~0.1%", f"{100 * k / H:.2f}%"),
               ("positions with an outlier", "~75% (6.7B)", f"{100 * rows.mean():.0f}%"),
               ("values multiplied in int8", "> 99.9%", f"{100 * (1 - len(found) / H):.2f}%")],
              headers=("", "course/paper", "minipeft"))
    rep.table([(labels[n], e) for n, e in errs.items()], headers=("X W^T computed by", "relative error"))
    rep.text("course: zeroing the outlier features raises perplexity 600-1000%, zeroing as many random features "
             "~0.1%; 'don't quantize dimensions with outlier features'.\nminipeft: the outlier dimensions carry "
             f"most of the output ({errs['zero_outliers']:.2f} relative error when zeroed, {errs['zero_random']:.3f} "
             f"for random ones); the decomposition cuts int8's error {errs['int8'] / errs['llm_int8']:.1f}x "
             f"({errs['int8'] / errs['llm_int8_float_outliers']:.0f}x with float outlier weights).")
    _fig(args, P.labeled_bars({labels[n]: e for n, e in errs.items()}, "relative error of X W^T (log scale)",
                              "LLM.int8() on synthetic outlier features", log=True), "quant_llm_int8_errors", rep)
    return {"dims": [int(d) for d in dims], "found": found, "errors": errs}, np.abs(X).max(axis=0)


# ---------------------------------------------------------------- 6b. LLM.int8(): the tiny model
class _Probe(Module):
    """Wraps a Linear: records each input feature's max |x| and RMS, optionally zeroes features."""

    def __init__(self, base) -> None:
        super().__init__()
        self.base = base
        self.max_abs = self.sumsq = None
        self.rows = self.rows_hot = 0
        self.mask = None

    def forward(self, x):
        a = xp_of(x.data).abs(x.data).reshape(-1, x.shape[-1])         # (N, C)
        xp = xp_of(a)
        m, sq = a.max(axis=0), (a.astype(xp.float64) ** 2).sum(axis=0)
        self.max_abs = m if self.max_abs is None else xp.maximum(self.max_abs, m)
        self.sumsq = sq if self.sumsq is None else self.sumsq + sq
        self.rows += a.shape[0]
        self.rows_hot += int((a >= THRESHOLD).any(axis=1).sum())
        return self.base(x if self.mask is None else x * self.mask)


def _probed(model, names):
    m = copy.deepcopy(model)
    probes = {}
    for n in names:
        probes[n] = _Probe(m.get_submodule(n))
        m.set_submodule(n, probes[n])
    return m, probes


def _tiny_outliers(rep, args, rng, model, evaluate, S, synth_max_abs):
    linears = [n for n, m in model.named_modules() if n.endswith(("c_attn", "c_proj", "c_fc"))]
    probed, probes = _probed(model, linears)
    base_loss = evaluate(probed)
    stats = {}
    for n, p in probes.items():
        mx, rms = to_numpy(p.max_abs), np.sqrt(to_numpy(p.sumsq) / p.rows)
        stats[n] = {"max_abs": float(mx.max()), "outlier_dims": int((mx >= THRESHOLD).sum()),
                    "rows_with_outlier": p.rows_hot / p.rows,
                    "kurtosis": float((rms ** 4).mean() / (rms ** 2).mean() ** 2), "top_dim": int(mx.argmax())}
    rep.section("6b. LLM.int8(): the inputs of every Linear of minipeft's pretrained 'tiny' model")
    rep.table([(n.replace("transformer.", ""), s["max_abs"], s["outlier_dims"], f"{100 * s['rows_with_outlier']:.1f}%",
                s["kurtosis"]) for n, s in stats.items()],
              headers=("Linear input", "max |x|", "dims |x|>=6", "tokens hit", "kurtosis"))
    n_hot = sum(s["outlier_dims"] for s in stats.values())
    width = model.config.n_embd
    rep.text(f"course: outlier features emerge at ~6.7B parameters (smoothly with perplexity). minipeft's tiny "
             f"model (d {width}) has {n_hot} input features with |x| >= 6"
             + (": none, as expected at this scale." if n_hot == 0 else "."))
    # zero the largest feature of each attention/FFN input (ln_1, ln_2 outputs) against a random one
    ln_inputs = [n for n in linears if n.endswith(("attn.c_attn", "mlp.c_fc"))]

    def loss_with(chosen: dict) -> float:
        for n, p in probes.items():
            if n in chosen:
                mask = np.ones(p.base.in_features, np.float32)
                mask[chosen[n]] = 0
                p.mask = to_device(mask, args.device)
            else:
                p.mask = None
        return evaluate(probed)

    top = loss_with({n: stats[n]["top_dim"] for n in ln_inputs})
    rand = [loss_with({n: int(rng.choice([d for d in range(probes[n].base.in_features)
                                          if d != stats[n]["top_dim"]])) for n in ln_inputs})
            for _ in range(S["draws"])]
    loss_with({})
    ppl = lambda l: 100 * (math.exp(l - base_loss) - 1)                 # noqa: E731
    rep.table([("none", "-", base_loss, "-"),
               ("the largest-|x| feature of each", "+600-1000%", top, f"{ppl(top):+.1f}%"),
               (f"a random feature of each ({S['draws']} draws)", "~0.1%", float(np.mean(rand)),
                f"{ppl(float(np.mean(rand))):+.1f}%")],
              headers=("features zeroed at c_attn / c_fc inputs", "course ppl", "val loss", "minipeft ppl"))
    d_top, d_rand = top - base_loss, float(np.mean(rand)) - base_loss
    rep.text(f"minipeft: zeroing the largest feature costs {d_top:+.4f} nats, a random one {d_rand:+.4f}: "
             + ("without emergent outliers no single feature is essential." if d_top < 0.05 else
                "the large-magnitude features matter more than random ones, even at this scale."))
    planted, mx_planted = _planted(rep, args, model, evaluate, ln_inputs)
    mx_tiny = np.max([to_numpy(probes[n].max_abs) for n in ln_inputs], axis=0)
    _fig(args, P.outlier_features({"synthetic hidden states (6a)": synth_max_abs,
                                   "tiny model: c_attn/c_fc inputs": mx_tiny,
                                   "tiny model with planted outliers": mx_planted},
                                  THRESHOLD, "Outlier features: max |x| per hidden dimension"),
         "quant_outlier_features", rep)
    return {"layers": stats, "outlier_dims": n_hot, "loss": base_loss, "zero_top_loss": top,
            "zero_random_loss": float(np.mean(rand)), "planted": planted}


def _planted(rep, args, model, evaluate, ln_inputs, dims=(5, 22), s=20.0):
    """Plant outlier features without changing the function: LN gain/bias x s on a few dims, the next
    Linear's weight columns / s. The activations then look like a large model's; int8 sees them."""
    m = copy.deepcopy(model)
    idx = list(dims)
    for blk in m.transformer.h:
        for ln, lin in ((blk.ln_1, blk.attn.c_attn), (blk.ln_2, blk.mlp.c_fc)):
            for p in (ln.weight, ln.bias):
                p.data[idx] *= np.float32(s)
            lin.weight.data[:, idx] /= np.float32(s)
    probed, probes = _probed(m, ln_inputs)
    losses = {"fp32 (planted, same function)": evaluate(probed)}
    max_abs = np.max([to_numpy(p.max_abs) for p in probes.values()], axis=0)
    for name, t in (("int8 vector-wise, no decomposition", 0.0), ("LLM.int8(), threshold 6", THRESHOLD)):
        q = copy.deepcopy(m)
        quantize_model(q, bits=8, threshold=t)
        losses[name] = evaluate(q)
    rep.text(f"\nPlanted outliers: LayerNorm gain and bias x{s:g} on dims {idx} of every ln_1/ln_2 and the next "
             f"weight's columns / {s:g}:\nthe same function, but |x| up to {max_abs[idx].max():.0f} at those dims "
             f"({int((max_abs >= THRESHOLD).sum())} dims >= 6), as in a large model.")
    base = losses["fp32 (planted, same function)"]
    rep.table([(n, v, f"{100 * (v - base) / base:+.2f}%") for n, v in losses.items()],
              headers=("", "val loss", "vs fp32"))
    return losses, max_abs


# ---------------------------------------------------------------- 7. quantize_model
def _quantize_tiny(rep, args, model, evaluate, errors_64):
    variants = {"fp32": None,
                "NF4 + double quant": dict(quant_type="nf4", compress_statistics=True),
                "NF4 + DQ, bfloat16 compute": dict(quant_type="nf4", compute_dtype="bfloat16"),
                "NF4": dict(quant_type="nf4", compress_statistics=False),
                "FP4": dict(quant_type="fp4", compress_statistics=False),
                "Int4": dict(quant_type="int4", compress_statistics=False),
                "int8, LLM.int8() (threshold 6)": dict(bits=8, threshold=THRESHOLD),
                "int8, no decomposition": dict(bits=8, threshold=0.0)}
    res, rows = {}, []
    for name, kw in variants.items():
        m = copy.deepcopy(model)
        report = quantize_model(m, **kw) if kw is not None else None
        loss = evaluate(m)
        res[name] = {"loss": loss, "bytes": model_nbytes(m),
                     "linear_bytes": report.linear_bytes_after if report else None,
                     "layers": len(report.replaced) if report else 0}
    ref = res["fp32"]
    lins = [m for n, m in model.named_modules() if n.endswith(("c_attn", "c_proj", "c_fc"))]
    n_w = sum(m.in_features * m.out_features for m in lins)
    n_bias = sum(m.bias.size for m in lins if m.bias is not None)
    for name, r in res.items():
        lb = r["linear_bytes"]
        r["bits_per_weight"] = 8 * (lb - 4 * n_bias) / n_w if lb else 32.0
        rows.append((name, r["loss"], f"{100 * (r['loss'] - ref['loss']) / ref['loss']:+.2f}%",
                     r["bytes"] / 1024, f"{ref['bytes'] / r['bytes']:.2f}x", f"{r['bits_per_weight']:.3f}"))
    rep.section("7. quantize_model on the pretrained 'tiny' model (every Linear but the tied lm_head)")
    rep.table(rows, headers=("", "val loss", "vs fp32", "model KiB", "smaller", "bits/weight*"))
    by_loss = sorted(("NF4", "FP4", "Int4"), key=lambda n: res[n]["loss"])
    by_err = sorted(("NF4", "FP4", "Int4"), key=lambda n: errors_64[n.lower()]["abs"])
    rep.text(f"minipeft, 4-bit codes by validation loss: {' < '.join(by_loss)} ("
             + ("the order of their mean |error| on N(0,1) in section 3)." if by_loss == by_err else
                f"section 3's mean |error| on N(0,1): {' < '.join(by_err)}).")
             + ("" if not args.quick else " Quick mode's model has barely trained: differences are noise."))
    rep.text("course: QLoRA NF4 + DQ replicates 16-bit performance (MMLU: BF16 ~53.0, FP4 ~52.2, NF4 + DQ ~53.1; "
             "Pile-CC perplexity Int4 34.3 > FP4 31.1 > NF4 27.4).\n* bits per weight of the quantized layers, block "
             "scales and code tables included (4.127 + tables with double quantization).\n"
             "The model shrinks less than 8x: its embeddings "
             "(tied to lm_head), LayerNorms and biases stay float32.")
    _fig(args, P.quantized_model_summary({k: v["loss"] for k, v in res.items()},
                                         {k: v["bytes"] for k, v in res.items()}, "fp32",
                                         "quantize_model on the 'tiny' model"), "quant_tiny_model", rep)
    return res


if __name__ == "__main__":
    main()
