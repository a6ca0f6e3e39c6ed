"""Peak memory of one training step at scale: full fine-tuning vs LoRA vs QLoRA, on a GPU.

    python benchmarks/qlora_memory.py --device cuda                      # GPT-2 XL, three methods
    python benchmarks/qlora_memory.py --device cuda --largest            # + the largest QLoRA that fits
    python benchmarks/qlora_memory.py --device cpu --models T1 --batch 2 --seq 64   # a check on the CPU

For each model and method it builds the model directly on the device (weights drawn
there, and for QLoRA quantized to NF4 layer by layer, so no full-precision copy of a
large model is ever held), runs one real training step (fp32 AdamW; LoRA r=8 on every
linear layer of every block for LoRA and QLoRA), and prints what the step held, by
category, beside ``minipeft.memory.estimate_memory``'s prediction:

* held before the step: weights (trainable, frozen, quantization constants);
* gradients, optimizer state, bytes saved for backward (engine ledger) — measured;
* device peak: bytes in use before the step + the peak the CuPy pool handed out during it
  (this also contains the temporaries of forward and backward, which no category holds).
  The measured step is the second one, so the optimizer state already exists, as in every
  step of a real run after the first.

``--checkpointing lora,qlora`` (the default) also runs those methods with gradient
checkpointing (``model.gradient_checkpointing_enable()``: each block keeps its input only and
is recomputed in backward), rows marked ``+gc``, predicted with the calculator's
``gradient_checkpointing=True``; a summary line per method sets the activations with and
without it beside the LoRA parameters (the course: activations dominate LoRA's memory).

``--largest`` walks a ladder of GPT shapes (2.7B ... 65B) and reports the largest whose
QLoRA step ran without running out of device memory.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minipeft.backend import get_xp, resolve_device  # noqa: E402
from minipeft.gpt import GPT, GPTConfig  # noqa: E402
from minipeft.memory import MethodConfig, StepSetup, estimate_memory, format_bytes  # noqa: E402
from minipeft.memory_measure import CATEGORIES, measure_training_step  # noqa: E402
from minipeft.nn import Linear  # noqa: E402
from minipeft.optim import AdamW  # noqa: E402
from minipeft.peft import LoraConfig, get_peft_model  # noqa: E402
from minipeft.quant.modules import Linear4bit  # noqa: E402

LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# GPT-shaped ladder for --largest: (name, n_layer, n_embd, n_head); GPT-3 paper shapes (Table 2.1)
LADDER = [("gpt-2.7b", 32, 2560, 32), ("gpt-6.7b", 32, 4096, 32), ("gpt-13b", 40, 5140, 40),
          ("gpt-30b", 48, 7168, 56), ("gpt-65b", 80, 8192, 64)]


def build(cfg: GPTConfig, method: str, device: str, seed: int = 0):
    """A GPT of shape ``cfg`` on ``device`` with ``method`` applied, built layer by layer."""
    xp = get_xp(device)
    rng = xp.random.default_rng(seed)
    model = GPT(cfg, init_weights=False)  # zero-filled host arrays, never touched: no host memory used
    proj_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    for name in [n for n, _ in model.named_modules()]:  # names only: no reference keeps a replaced layer alive
        mod = model.get_submodule(name)
        for pname, p in list(mod._parameters.items()):
            if p is None:
                continue
            if isinstance(mod, Linear) and pname == "weight" and name != "lm_head":
                std = proj_std if name.endswith("c_proj") else 0.02
                p.data = (rng.standard_normal(p.shape, dtype=np.float32) * np.float32(std))
            elif pname == "weight" and name.endswith(("wte", "wpe")):
                p.data = rng.standard_normal(p.shape, dtype=np.float32) * np.float32(0.02)
            elif pname == "weight" and name.endswith(("ln_1", "ln_2", "ln_f")):
                p.data = xp.ones(p.shape, np.float32)
            elif name != "lm_head":
                p.data = xp.zeros(p.shape, np.float32)
        if method == "qlora" and isinstance(mod, Linear) and name.endswith(LINEARS):
            model.set_submodule(name, Linear4bit(mod, quant_type="nf4", blocksize=64, compress_statistics=True))
            mod.weight.data = None  # drop the full-precision weight now, not at the end of the build
        del mod
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    model.to(device)
    if method != "full":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(LINEARS)))
    return model


def device_in_use(device: str) -> int:
    if device != "cuda":
        return 0
    pool = get_xp("cuda").get_default_memory_pool()
    return int(pool.used_bytes())


def free_device(device: str) -> None:
    gc.collect()
    if device == "cuda":
        get_xp("cuda").get_default_memory_pool().free_all_blocks()


def run_one(cfg, method, device, batch, seq, checkpointing: bool = False) -> dict:
    xp = get_xp(device)
    free_device(device)
    t0 = time.perf_counter()
    model = build(cfg, method, device)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq)))
    y = xp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq)))
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    measure_training_step(model, (x, y), opt)  # first step: creates the optimizer state
    before = device_in_use(device)  # steady state: weights and optimizer state in place
    meas = measure_training_step(model, (x, y), opt)
    mcfg = MethodConfig(method=method, targets=LINEARS, r=8, blocksize=64, double_quant=True)
    tcfg = StepSetup(batch_size=batch, seq_len=seq, ledger_view=True, resid_pdrop=cfg.dropout,
                      embd_pdrop=cfg.dropout, gradient_checkpointing=checkpointing)
    pred = estimate_memory(cfg, mcfg, tcfg)
    row = {"model": cfg_name(cfg), "method": method + ("+gc" if checkpointing else ""), "params": int(pred.n_params),
           "trainable": int(pred.n_trainable), "batch": batch, "seq": seq, "build_s": build_s,
           "step_s": meas.step_seconds, "loss": meas.loss,
           "measured": {k: getattr(meas, k) for k in CATEGORIES} | {"total": meas.total},
           "predicted": {k: getattr(pred, k) for k in CATEGORIES} | {"total": pred.total},
           "device_before_step": before, "device_peak": before + meas.device_peak}
    del model, opt, meas
    free_device(device)
    return row


def cfg_name(cfg) -> str:
    return f"L{cfg.n_layer}-d{cfg.n_embd}"


def print_row(r: dict) -> None:
    print(f"\n{r['model']} {r['method']}: {r['params']:,} parameters, {r['trainable']:,} trainable; "
          f"batch {r['batch']}x{r['seq']}; build {r['build_s']:.1f} s, step {r['step_s']:.2f} s, loss {r['loss']:.3f}")
    print(f"  {'category':<18}{'predicted':>12}{'measured':>12}  ratio")
    for k in CATEGORIES + ("total",):
        p, m = r["predicted"][k], r["measured"][k]
        ratio = f"{m / p:.3f}" if p else "-"
        print(f"  {k:<18}{format_bytes(p):>12}{format_bytes(m):>12}  {ratio}")
    if r["device_peak"]:
        print(f"  device peak during the step (pool in use before + step peak): {format_bytes(r['device_peak'])}")


def print_saving(plain: dict, gc_row: dict) -> None:
    """Activations with and without gradient checkpointing, beside the trained (LoRA) parameters."""
    a, g, w = plain["measured"]["activations"], gc_row["measured"]["activations"], plain["measured"]["weights_trainable"]
    print(f"  {plain['method']}: activations {format_bytes(a)} -> {format_bytes(g)} with gradient checkpointing "
          f"({a / max(g, 1):.1f}x less; predicted {format_bytes(gc_row['predicted']['activations'])}); "
          f"trainable weights {format_bytes(w)} (activations / weights: {a / max(w, 1):.0f}x -> {g / max(w, 1):.0f}x)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default="gpt2-xl", help="comma-separated GPTConfig presets")
    ap.add_argument("--methods", default="full,lora,qlora")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--checkpointing", default="lora,qlora",
                    help="methods also run with gradient checkpointing ('' for none)")
    ap.add_argument("--largest", action="store_true", help="also find the largest GPT shape whose QLoRA step fits")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    device = resolve_device(a.device)
    print(f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; device {device}; "
          f"command: python {' '.join(sys.argv)}")
    if device == "cuda":
        cp = get_xp("cuda")
        props = cp.cuda.runtime.getDeviceProperties(0)
        print(f"GPU {props['name'].decode()}, {props['totalGlobalMem'] / 2**30:.1f} GiB; cupy {cp.__version__}")
    rows = []
    for name in filter(None, a.models.split(",")):
        cfg = GPTConfig.preset(name)
        cfg = replace(cfg, block_size=max(cfg.block_size, a.seq))
        for method in a.methods.split(","):
            r = run_one(cfg, method, device, a.batch, a.seq)
            print_row(r)
            rows.append(r)
            if method in a.checkpointing.split(","):
                gc_row = run_one(cfg, method, device, a.batch, a.seq, checkpointing=True)
                print_row(gc_row)
                rows.append(gc_row)
                print_saving(r, gc_row)
    if a.largest:
        fitted = None
        for name, L, d, h in LADDER:
            cfg = GPTConfig(vocab_size=50257, block_size=max(1024, a.seq), n_layer=L, n_head=h,
                            n_embd=d - d % h)
            try:
                r = run_one(cfg, "qlora", device, a.batch, a.seq)
            except Exception as e:  # out of device memory: the previous shape was the largest
                if "OutOfMemory" not in type(e).__name__ and "out of memory" not in str(e).lower():
                    raise
                print(f"\n{name} ({L} layers, d {d}): QLoRA step does not fit: {type(e).__name__}")
                free_device(device)
                break
            r["model"] = name
            print_row(r)
            rows.append(r)
            fitted = name
        print(f"\nlargest GPT shape whose QLoRA step fits: {fitted}")
    if a.json:
        from minipeft.atomic import write_text_atomic        # a killed run leaves the old file whole
        write_text_atomic(a.json, json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
