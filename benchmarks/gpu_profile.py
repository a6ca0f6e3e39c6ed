"""Where minipeft's training step spends its time on a GPU (CuPy): per op, per kernel, launches.

For each ``--modes`` entry (full, lora, qlora as in ``train_step.py``) it builds the same
GPT-2-shaped model and batch as ``benchmarks/train_step.py`` on CUDA and measures:

1. **Step time**: ``--steps`` steps, the device synchronized around each; the median.
2. **Per op**: every ``Function.forward``/``backward`` of ``minipeft/ops``, of the fast paths
   that replace them (``minipeft.kernels.functions``, ``minipeft.amp``) and of
   ``minipeft.quant.modules`` (and the optimizer's ``step``) is wrapped so that it records
   a CUDA event before and after itself on the stream. The elapsed time between the two
   events is the stretch of the GPU's timeline that the op's kernels took (gaps where the
   GPU waited for the host included). Summed per op and step, with calls per step; what
   lies outside every op (the engine's gradient accumulation, leaf copies, embedding
   index checks) is the remainder.
3. **Per kernel**: one step under ``torch.profiler`` (CUPTI sees every kernel of the
   process, CuPy's too): launches per step, GPU time per kernel name, and the share of
   the step the GPU was busy running kernels.

``MINIPEFT_KERNELS=0`` in the environment runs the same step without minipeft's fused
kernels (the NumPy-twin code through CuPy), for the before/after comparison.

    python benchmarks/gpu_profile.py --modes full,lora,qlora --json prof.json
    MINIPEFT_KERNELS=0 python benchmarks/gpu_profile.py --modes full --json prof_off.json
"""
from __future__ import annotations

import argparse
import collections
import datetime
import inspect
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import train_step as TS  # noqa: E402
from minipeft import amp  # noqa: E402
from minipeft.engine import Function  # noqa: E402
from minipeft.gpt import GPTConfig  # noqa: E402
from minipeft.fast import enabled as fused_enabled  # noqa: E402
from minipeft.optim import AdamW  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="gpt2", help="GPTConfig preset (default gpt2)")
    ap.add_argument("--modes", default="full,lora,qlora", help="comma-separated: full, lora, qlora")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    ap.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--compute-dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                    help="float16: the step under minipeft.amp.autocast with a GradScaler (as train_step.py); "
                         "bfloat16: the same without loss scaling")
    ap.add_argument("--top", type=int, default=15, help="rows of each table (default 15)")
    ap.add_argument("--no-kernel-trace", action="store_true", help="skip the torch.profiler kernel trace")
    ap.add_argument("--json", dest="json_out", default=None, help="write all results here")
    return ap.parse_args(argv)


# ------------------------------------------------------------------ per-op CUDA events


class OpTimer:
    """Wraps Function subclasses' forward/backward with CUDA events (undo with ``restore``)."""

    def __init__(self, cp, modules):
        self.cp = cp
        self.records = []  # (name, start event, end event)
        self.saved = []
        for mod in modules:
            for cname, cls in inspect.getmembers(mod, inspect.isclass):
                if not issubclass(cls, Function) or cls is Function or cls.__module__ != mod.__name__:
                    continue
                for meth in ("forward", "backward"):
                    if meth in cls.__dict__:
                        self._wrap(cls, meth, f"{cname}.{meth}")
        from minipeft.optim.core import Optimizer

        self._wrap(Optimizer, "step", "optimizer.step")

    def _wrap(self, cls, meth, name):
        """Time ``cls.meth`` (a staticmethod, a classmethod such as ``amp.AmpLinear.forward``, or a plain
        method) between two CUDA events, and put it back as the same kind of method."""
        orig = cls.__dict__[meth]
        kind = type(orig) if isinstance(orig, (staticmethod, classmethod)) else None
        fn = orig.__func__ if kind else orig
        cp, rec = self.cp, self.records

        def wrapper(*a, **k):
            e0 = cp.cuda.Event()
            e0.record()
            out = fn(*a, **k)
            e1 = cp.cuda.Event()
            e1.record()
            rec.append((name, e0, e1))
            return out

        setattr(cls, meth, kind(wrapper) if kind else wrapper)
        self.saved.append((cls, meth, orig))

    def restore(self):
        for cls, meth, orig in reversed(self.saved):
            setattr(cls, meth, orig)

    def table(self, n_steps):
        self.cp.cuda.Device().synchronize()
        agg = collections.defaultdict(lambda: [0, 0.0])
        for name, e0, e1 in self.records:
            a = agg[name]
            a[0] += 1
            a[1] += self.cp.cuda.get_elapsed_time(e0, e1)
        rows = [{"op": k, "calls": v[0] / n_steps, "ms": v[1] / n_steps} for k, v in agg.items()]
        rows.sort(key=lambda r: -r["ms"])
        return rows


# ------------------------------------------------------------------ kernel trace


def kernel_trace(torch, step, sync):
    """One step under torch.profiler: per kernel name (count, GPU ms), launches, busy time."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        sync()
    wall = time.perf_counter() - t0
    agg = collections.defaultdict(lambda: [0, 0.0])
    n = 0
    busy = 0.0
    for name, dur in _device_events(prof):
        key = "copy/memset: " + name.split(" ")[0] if name.startswith(("Memcpy", "Memset")) else name
        agg[key][0] += 1
        agg[key][1] += dur
        busy += dur
        n += 1
    rows = [{"kernel": k[:110], "launches": v[0], "ms": v[1]} for k, v in agg.items()]
    rows.sort(key=lambda r: -r["ms"])
    return {"launches": n, "gpu_busy_ms": busy, "wall_ms_under_profiler": 1e3 * wall, "kernels": rows}


def _device_events(prof):
    """(name, GPU ms) of every kernel, copy and memset the profiler saw on the GPU."""
    try:  # the raw kineto events: every device activity, whoever launched it
        out = []
        for e in prof.profiler.kineto_results.events():
            if "CUDA" in str(e.device_type()):
                out.append((e.name(), e.duration_ns() / 1e6))
        if out:
            return out
    except Exception:
        pass
    return [(ev.name, ev.time_range.elapsed_us() / 1e3) for ev in prof.events()
            if "CUDA" in str(getattr(ev, "device_type", ""))]


def summarize_kernels(rows):
    """Kernel time grouped by family: GEMM (cuBLAS/cutlass), CuPy elementwise/reduction, fused, other."""
    fam = collections.defaultdict(lambda: [0, 0.0])
    for r in rows:
        k = r["kernel"].lower()
        if any(s in k for s in ("gemm", "sgemm", "cutlass", "cublas", "xmma", "nvjet", "gemv")):
            f = "GEMM (cuBLAS)"
        elif any(s in k for s in ("layernorm_", "gelu_", "attn_softmax", "cross_entropy_", "adamw_update")):
            f = "minipeft fused kernels"
        elif "dequantize_4bit" in k or "quantize" in k:
            f = "4-bit dequantize"
        elif k.startswith("cupy_") or "reduce" in k or "scatter" in k:
            f = "CuPy elementwise / reduction"
        elif k.startswith("copy/memset"):
            f = "copies / memsets"
        else:
            f = "other"
        fam[f][0] += r["launches"]
        fam[f][1] += r["ms"]
    return {k: {"launches": v[0], "ms": v[1]} for k, v in sorted(fam.items(), key=lambda kv: -kv[1][1])}


# ------------------------------------------------------------------ main


def profile_mode(torch, cp, cfg, mode, args):
    from minipeft.kernels import functions as fused
    from minipeft.ops import attention, elementwise, linalg, norm_act, reduction, shape
    from minipeft.ops import loss as loss_ops
    from minipeft.quant import modules as qmodules

    B, T = args.batch, args.seq
    mini, kind, _ = TS.build_minipeft(cfg, mode, 0, "cuda")
    mini.to("cuda")
    opt = AdamW(mini, lr=1e-3, betas=TS.BETAS, eps=TS.EPS, weight_decay=TS.WEIGHT_DECAY)
    rng = np.random.default_rng(1)
    data = rng.integers(0, cfg.vocab_size, size=(B, T + 1)).astype(np.int64)
    idx, tgt = cp.asarray(data[:, :-1]), cp.asarray(data[:, 1:])
    sync = cp.cuda.Device().synchronize
    scaler = amp.GradScaler(enabled=args.compute_dtype == "float16")

    def step():
        return TS.minipeft_step(mini, opt, scaler, idx, tgt, args.compute_dtype)

    for _ in range(args.warmup):
        step()
    sync()
    ts = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        ts.append(time.perf_counter() - t0)
    step_ms = 1e3 * statistics.median(ts)
    loss = float(step().item())

    timer = OpTimer(cp, [attention, elementwise, linalg, loss_ops, norm_act, reduction, shape, fused, amp, qmodules])
    n_prof = max(2, args.steps // 2)
    tsi = []
    try:
        for _ in range(n_prof):
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            tsi.append(time.perf_counter() - t0)
        ops = timer.table(n_prof)
    finally:
        timer.restore()
    inst_ms = 1e3 * statistics.median(tsi)
    in_ops = sum(r["ms"] for r in ops)
    res = {"mode": mode, "compute_dtype": args.compute_dtype, "minipeft_impl": kind, "step_ms": step_ms, "step_ms_all": [1e3 * t for t in ts],
           "loss": loss, "instrumented_step_ms": inst_ms, "ops": ops, "ops_total_ms": in_ops,
           "outside_ops_ms": inst_ms - in_ops,
           "tokens_per_s": B * T / (step_ms / 1e3)}
    if not args.no_kernel_trace:
        try:
            kt = kernel_trace(torch, step, sync)
            kt["families"] = summarize_kernels(kt["kernels"])
            res["kernel_trace"] = kt
        except Exception as e:  # the profiler is a help, not a requirement
            res["kernel_trace_error"] = f"{type(e).__name__}: {e}"
    return res


def print_mode(r, top):
    print(f"\n## {r['mode']}: {r['step_ms']:.1f} ms/step ({r['tokens_per_s']:,.0f} tokens/s), loss {r['loss']:.4f}; "
          f"instrumented {r['instrumented_step_ms']:.1f} ms, of which ops {r['ops_total_ms']:.1f} ms, "
          f"outside ops {r['outside_ops_ms']:.1f} ms")
    print("| # | op | calls/step | GPU ms/step | % of step |")
    print("|---|---|---:|---:|---:|")
    for i, o in enumerate(r["ops"][:top], 1):
        print(f"| {i} | `{o['op']}` | {o['calls']:.0f} | {o['ms']:.2f} | {100 * o['ms'] / r['instrumented_step_ms']:.1f} |")
    kt = r.get("kernel_trace")
    if kt:
        print(f"kernels: {kt['launches']} launches/step, GPU busy {kt['gpu_busy_ms']:.1f} ms of "
              f"{kt['wall_ms_under_profiler']:.1f} ms under the profiler")
        print("| family | launches | GPU ms |")
        print("|---|---:|---:|")
        for k, v in kt["families"].items():
            print(f"| {k} | {v['launches']} | {v['ms']:.2f} |")
        print("| top kernel | launches | GPU ms |")
        print("|---|---:|---:|")
        for k in kt["kernels"][:top]:
            print(f"| `{k['kernel'][:80]}` | {k['launches']} | {k['ms']:.2f} |")
    elif "kernel_trace_error" in r:
        print("kernel trace failed:", r["kernel_trace_error"])


def main(argv=None):
    args = parse_args(argv)
    import cupy as cp
    import torch

    cfg = GPTConfig.preset(args.config, dropout=0.0)
    header = {"command": " ".join(["python", "benchmarks/gpu_profile.py"] + (sys.argv[1:] if argv is None else argv)),
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "device_name": torch.cuda.get_device_name(0), "cupy": cp.__version__, "torch": torch.__version__,
              "fused_kernels": fused_enabled(), "CUPY_TF32": os.environ.get("CUPY_TF32"),
              "config": args.config, "batch": args.batch, "seq": args.seq}
    print(json.dumps(header))
    out = {**header, "modes": []}
    for mode in args.modes.split(","):
        r = profile_mode(torch, cp, cfg, mode.strip(), args)
        cp.get_default_memory_pool().free_all_blocks()  # the mode's model is gone: give its memory back
        print_mode(r, args.top)
        out["modes"].append(r)
    if args.json_out:
        from minipeft.atomic import write_text_atomic        # a killed run leaves the old file whole
        write_text_atomic(args.json_out, json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
