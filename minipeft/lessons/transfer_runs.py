"""Scaling laws for transfer (Hernandez et al. 2021, arXiv 2102.01293): the runs.

A model of N non-embedding parameters is trained on D_F bytes of Python two ways: from
scratch, and fine-tuned from a base pretrained on a *source* (English text, or English
mixed 50/50 with C headers). Every run stops early at its best validation loss; the
losses go to ``transfer_fits.py``, which reads D_T off the scratch curves and fits its
power law.

Each run is cached as one JSON file under ``<cache>/runs`` named by a hash of every setting
that changes its result; base models under ``<cache>/bases`` (safetensors + JSON). The
default cache is ``$MINIPEFT_CACHE/transfer`` (``~/.cache/minipeft/transfer``).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..backend import resolve_device, to_device
from ..data import ByteTokenizer, Corpus, lm_batches, load_text_and_other_code
from ..data.corpus import cache_dir, python_tag
from ..gpt import GPT, GPTConfig
from ..parallel import spawn_map
from ..pretrained import validation_loss
from ..train import TrainConfig, train

FORMAT = 1  # bump when a run's procedure changes: it is part of every cache key
TARGET = "python"  # the fine-tuning distribution: standard-library code without docstrings
SOURCES = {"english": "English text", "english+c": "English + C headers, 50/50"}


@dataclass(frozen=True)
class ModelSize:
    n_layer: int  # transformer blocks
    n_embd: int  # width d
    n_head: int  # attention heads
    lr: float  # peak learning rate of this size's pretraining and scratch runs (x finetune_lr_scale to fine-tune)


SIZES: dict[str, ModelSize] = {  # N = non-embedding parameters (≈ 12 L d^2)
    "L1d8": ModelSize(1, 8, 1, 1e-2),  # N = 888
    "L1d16": ModelSize(1, 16, 1, 6e-3),  # N = 3.3K
    "L1d32": ModelSize(1, 32, 2, 5e-3),  # N = 12.8K
    "L2d32": ModelSize(2, 32, 2, 4e-3),  # N = 25K
    "T0": ModelSize(2, 64, 2, 3e-3),  # N = 100K (methods.md §0.3)
    "T1": ModelSize(4, 128, 4, 2e-3),  # N = 0.79M
    "T2": ModelSize(6, 256, 4, 1e-3),  # N = 4.7M
    "T3": ModelSize(8, 384, 6, 6e-4),  # N = 14M
}


@dataclass(frozen=True)
class TransferConfig:
    block_size: int = 64  # bytes per training window (the model's context)
    batch_size: int = 16  # windows per optimizer step
    max_steps: int = 500  # cap on every scratch / fine-tuning run (early stopping usually ends it sooner)
    warmup_steps: int = 20  # linear warmup, then cosine decay to lr/10 at max_steps
    eval_every: int = 20  # steps between early-stopping evaluations
    patience: int = 6  # evaluations without a new best validation loss before stopping, once also...
    min_rise: float = 0.02  # ... this fraction above the best (overfitting, not noise at a high lr), or
    plateau_epochs: float = 10.0  # ... this many passes over the data were made (nothing new left to learn)
    val_bytes: int = 8192  # Python validation bytes that early stopping watches (start of the val split)
    test_bytes: int = 32768  # the next validation bytes: the loss reported for the best step
    weight_decay: float = 0.1  # AdamW's decoupled weight decay
    finetune_lr_scale: float = 0.3  # fine-tuning peak lr = the size's lr times this (better than 1 at small D_F)
    pretrain_steps: int = 800  # step cap of each base model on its source (stops early on the source's val text)
    pretrain_batch_size: int = 16  # windows per pretraining step
    seed: int = 0  # model init and batch order (the same for every run: common random numbers)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("finetune_lr_scale", "min_rise", "plateau_epochs", "weight_decay"):
                if not v >= 0 or (f.name == "finetune_lr_scale" and v == 0):
                    raise ValueError(f"TransferConfig.{f.name} must be >= 0 (finetune_lr_scale > 0), got {v!r}")
            elif f.name != "seed" and (not isinstance(v, int) or v < 1):
                raise ValueError(f"TransferConfig.{f.name} must be a positive int, got {v!r}")


@dataclass(frozen=True)
class TransferGrid:
    sizes: tuple  # names in SIZES, smallest first
    scratch_D: tuple  # Python bytes of the from-scratch runs (must reach past the fine-tuned losses)
    finetune_D: tuple  # D_F of the fine-tuning runs (a subset of scratch_D, for same-D comparisons)
    sources: tuple = ("english", "english+c")  # pretraining distributions
    config: TransferConfig = field(default_factory=TransferConfig)  # shared training settings
    steps: dict = field(default_factory=dict)  # {size: (max_steps, pretrain_steps)}: per-size caps

    def __post_init__(self):
        bad = [s for s in self.sizes if s not in SIZES]
        if bad:
            raise ValueError(f"unknown sizes {bad}; known sizes: {sorted(SIZES)}")
        bad = [s for s in self.sources if s not in SOURCES]
        if bad:
            raise ValueError(f"unknown sources {bad}; known sources: {sorted(SOURCES)}")
        for name in ("scratch_D", "finetune_D"):
            v = getattr(self, name)
            if not v or any(int(d) != d or d <= self.config.block_size for d in v):
                raise ValueError(f"TransferGrid.{name} must be data sizes in bytes > block_size "
                                 f"({self.config.block_size}), got {v!r}")
        bad = sorted(set(self.steps) - set(self.sizes))
        if bad:
            raise ValueError(f"TransferGrid.steps names sizes {bad} that are not in sizes {self.sizes}")

    def config_for(self, size: str) -> TransferConfig:
        """The run settings of one size: ``config`` with that size's step caps, if any."""
        if size not in self.steps:
            return self.config
        max_steps, pretrain_steps = self.steps[size]
        return dataclasses.replace(self.config, max_steps=max_steps, pretrain_steps=pretrain_steps)


# Three grids. Small models cost little per step, so they get more steps: every size gets
# roughly the same compute per run, and the smallest ones get close to convergence.
# quick: seconds (CI). cpu: about 10 minutes on 2 cores, N 888..100K (113x), D_F 1e3..1e6.
# gpu: an H100, N 12.8K..4.7M (370x), D up to 5e6 (the Python training split holds 5.7 MB after the validation slices), 128-byte windows.
GRIDS: dict[str, TransferGrid] = {
    "quick": TransferGrid(("L1d8", "L1d16"), (1000, 3000, 10_000, 30_000), (1000, 3000, 10_000),
                          config=TransferConfig(max_steps=150, warmup_steps=10, eval_every=10, patience=3,
                                                val_bytes=2048, test_bytes=4096, pretrain_steps=300)),
    "cpu": TransferGrid(("L1d8", "L1d16", "L2d32", "T0"),
                        (1000, 3000, 10_000, 30_000, 100_000, 300_000, 1_000_000),
                        (1000, 3000, 10_000, 30_000, 100_000, 300_000, 1_000_000),
                        steps={"L1d8": (2500, 2000), "L1d16": (2000, 1500), "L2d32": (1200, 1000),
                               "T0": (700, 800)}),
    "gpu": TransferGrid(("L1d32", "T0", "T1", "T2"),
                        (1000, 3000, 10_000, 30_000, 100_000, 300_000, 1_000_000, 5_000_000),
                        (1000, 10_000, 30_000, 100_000, 300_000, 1_000_000),
                        config=TransferConfig(block_size=128, batch_size=64, max_steps=1000, warmup_steps=50,
                                              eval_every=25, val_bytes=32768, test_bytes=131072,
                                              pretrain_steps=1500, pretrain_batch_size=64),
                        steps={"L1d32": (1500, 1500), "T0": (1200, 1500), "T1": (1000, 1500), "T2": (800, 1500)}),
}


def default_cache() -> Path:
    """``$MINIPEFT_CACHE/transfer`` (default ``~/.cache/minipeft/transfer``)."""
    return cache_dir() / "transfer"


def model_config(size: str, config: TransferConfig) -> GPTConfig:
    s = SIZES[size]
    return GPTConfig(n_layer=s.n_layer, n_embd=s.n_embd, n_head=s.n_head, block_size=config.block_size,
                     vocab_size=ByteTokenizer().vocab_size)


def non_embedding_params(size: str) -> int:
    """N of a size: every parameter but wte, wpe and the tied head (Kaplan et al.)."""
    s = SIZES[size]
    d, L = s.n_embd, s.n_layer
    return L * (12 * d * d + 13 * d) + 2 * d  # 4 d^2 + 4d (attn) + 8 d^2 + 5d (mlp) + 4d (2 LN); ln_f 2d


# ---- data ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _tokens(corpus: str, split: str) -> np.ndarray:
    if corpus == "english+c":  # the paper's "50% text + 50% non-Python code"
        return ByteTokenizer().encode(load_text_and_other_code(split, code_fraction=0.5))
    c = Corpus.load(corpus)
    return c.train if split == "train" else c.val


def python_train(D: int) -> np.ndarray:
    """The first ``D`` bytes of the Python training split (nested subsets, in file-hash order)."""
    full = _tokens(TARGET, "train")
    if D > len(full):
        raise ValueError(f"D = {D:,} bytes but the Python training split holds {len(full):,}; use a smaller D")
    return full[:D]


def python_eval(config: TransferConfig) -> tuple[np.ndarray, np.ndarray]:
    """(early-stopping slice, test slice) of the Python validation split: disjoint, fixed for all runs."""
    val = _tokens(TARGET, "val")
    need = config.val_bytes + config.test_bytes
    if need > len(val):
        raise ValueError(f"val_bytes + test_bytes = {need:,} but the Python validation split holds {len(val):,}")
    return val[: config.val_bytes], val[config.val_bytes: need]


# ---- cache keys -----------------------------------------------------------------------------
_PRETRAIN_FIELDS = ("pretrain_steps", "pretrain_batch_size")


def _key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def base_spec(size: str, source: str, config: TransferConfig) -> dict:
    """Every setting that changes a base model (pretraining stops early on the source's validation text)."""
    cfg = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("max_steps", "batch_size",
                                                                              "finetune_lr_scale")}
    return {"format": FORMAT, "python": python_tag(), "size": size, "shape": dataclasses.asdict(SIZES[size]),
            "source": source, "config": cfg}


def run_spec(kind: str, size: str, D: int, source: str | None, config: TransferConfig) -> dict:
    """Every setting that changes a run's result (its cache key); pretraining ones only for fine-tuning."""
    if kind not in ("scratch", "finetune"):
        raise ValueError(f"kind must be 'scratch' or 'finetune', got {kind!r}")
    if (kind == "finetune") != (source is not None):
        raise ValueError("a 'finetune' run needs a source (e.g. 'english'); a 'scratch' run takes none")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known sizes: {sorted(SIZES)}")
    cfg = dataclasses.asdict(config)
    if kind == "scratch":
        cfg = {k: v for k, v in cfg.items() if k not in _PRETRAIN_FIELDS + ("finetune_lr_scale",)}
    return {"format": FORMAT, "python": python_tag(), "kind": kind, "size": size,
            "shape": dataclasses.asdict(SIZES[size]), "source": source, "D": int(D), "config": cfg}


def run_path(spec: dict, cache: Path | None = None) -> Path:
    src = (spec["source"] or "none").replace("+", "_")
    name = f"{spec['kind']}-{spec['size']}-{src}-D{spec['D']}-{_key(spec)}.json"
    return Path(cache or default_cache()) / "runs" / name


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)  # atomic: an interrupted run leaves no half-written result


# ---- training ---------------------------------------------------------------------------------
def _loss(model, tokens, config) -> float:
    return validation_loss(model, tokens, config.block_size, batch_size=32, max_batches=10**9)


def train_to_best(model, train_tokens, config: TransferConfig, lr: float, val_tokens, test_tokens) -> dict:
    """Train with early stopping; put back the weights of the best validation loss; score them on test.

    Evaluates every ``eval_every`` steps (and before the first); stops once ``patience``
    evaluations passed without a new best *and* either the latest is ``min_rise`` (relative)
    above the best -- the model overfits -- or ``plateau_epochs`` passes over the data were
    made; otherwise at ``max_steps``. A plateau that is only noise at a high learning rate,
    early on, does not stop a run that the cosine decay and fresh data would still improve.
    """
    snapshot = lambda: {n: p.data.copy() for n, p in model.named_parameters()}  # noqa: E731
    best = {"loss": _loss(model, val_tokens, config), "step": 0, "params": snapshot(), "bad": 0}
    curve = [[0, best["loss"]]]

    def early_stop(step, info):
        evals = info["result"].eval_history
        if not evals or evals[-1][0] != step:
            return None
        v = float(evals[-1][1]["val_loss"])
        curve.append([step, v])
        if v < best["loss"]:
            best.update(loss=v, step=step, params=snapshot(), bad=0)
        else:
            best["bad"] += 1
        epochs = step * config.batch_size * config.block_size / len(train_tokens)
        return best["bad"] >= config.patience and (v > best["loss"] * (1 + config.min_rise)
                                                   or epochs >= config.plateau_epochs)

    tc = TrainConfig(max_steps=config.max_steps, batch_size=config.batch_size, lr=lr, schedule="cosine",
                     warmup_steps=min(config.warmup_steps, config.max_steps), min_lr=lr / 10,
                     weight_decay=config.weight_decay, grad_clip=1.0, eval_every=config.eval_every,
                     seed=config.seed, progress=False)
    T, B = config.block_size, config.batch_size
    res = train(model, lambda rng: lm_batches(train_tokens, B, T, rng), config=tc,
                eval_fn=lambda m: _loss(m, val_tokens, config), callbacks=[early_stop])
    for n, p in model.named_parameters():
        p.data = best["params"][n]
    steps = int(res.final["steps"])
    return {"loss": _loss(model, test_tokens, config), "val_loss": best["loss"], "best_step": best["step"],
            "steps": steps, "stopped_early": steps < config.max_steps, "val_curve": curve,
            "epochs_at_best": best["step"] * B * T / len(train_tokens)}


def base_path(size: str, source: str, config: TransferConfig, cache: Path | None = None) -> Path:
    """The directory of a base model: config.json + model.safetensors + meta.json."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; known sources: {sorted(SOURCES)}")
    spec = base_spec(size, source, config)
    return Path(cache or default_cache()) / "bases" / f"{size}-{source.replace('+', '_')}-{_key(spec)}"


def load_base(size: str, source: str, config: TransferConfig, device: str = "cpu", cache: Path | None = None,
              log=None) -> tuple[GPT, dict]:
    """The base model of ``size`` pretrained on ``source`` (trained once, then read from the cache)."""
    spec = base_spec(size, source, config)
    d = base_path(size, source, config, cache)
    if (d / "meta.json").is_file() and (d / "model.safetensors").is_file():
        return GPT.from_hf(d).to(device), json.loads((d / "meta.json").read_text())
    t0, c0 = time.perf_counter(), time.process_time()
    model = GPT(model_config(size, config), seed=config.seed).to(device)
    train_tok, val_tok = _tokens(source, "train"), _tokens(source, "val")
    # the mixture's validation text is its parts one after the other: shuffle 1 KiB pieces so that
    # both slices sample every part (windows of a divisor of 1024 bytes never straddle two pieces)
    piece = 1024
    order = np.random.default_rng(config.seed).permutation(len(val_tok) // piece)
    val_tok = np.concatenate([val_tok[i * piece:(i + 1) * piece] for i in order])
    n_val = min(config.val_bytes, len(val_tok) // 2)  # early stopping on the source's own validation text
    val, test = val_tok[:n_val], val_tok[n_val: n_val + config.test_bytes]
    pre = dataclasses.replace(config, max_steps=config.pretrain_steps, batch_size=config.pretrain_batch_size)
    out = train_to_best(model, to_device(train_tok, device), pre, SIZES[size].lr, to_device(val, device),
                        to_device(test, device))
    py_val = to_device(python_eval(config)[1], device)
    meta = {**spec, "N": model.num_parameters(non_embedding=True), "device": device,
            "source_val_loss": out["loss"], "python_test_loss_zero_shot": _loss(model, py_val, config),
            "best_step": out["best_step"], "steps": out["steps"], "epochs_at_best": out["epochs_at_best"],
            "val_curve": out["val_curve"], "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0}
    model.save_hf(d)
    _write_json(d / "meta.json", meta)
    if log:
        log(f"  pretrained {size} on {source}: {meta['source_val_loss']:.3f} nats/byte on {source}, "
            f"{meta['python_test_loss_zero_shot']:.3f} on Python before fine-tuning ({meta['seconds']:.0f} s)")
    return model, meta


def run(kind: str, size: str, D: int, source: str | None = None, config: TransferConfig | None = None,
        device: str = "cpu", cache: Path | None = None, log=None) -> dict:
    """One scratch or fine-tuning run to its best validation loss; cached by every setting."""
    config = config or TransferConfig()
    spec = run_spec(kind, size, D, source, config)
    path = run_path(spec, cache)
    if path.is_file():
        return {**json.loads(path.read_text()), "cached": True}
    device = resolve_device(device)
    t0, c0 = time.perf_counter(), time.process_time()
    val, test = (to_device(t, device) for t in python_eval(config))
    lr = SIZES[size].lr
    if kind == "scratch":
        model = GPT(model_config(size, config), seed=config.seed).to(device)
    else:
        model, _ = load_base(size, source, config, device, cache, log)
        lr *= config.finetune_lr_scale
    out = train_to_best(model, to_device(python_train(int(D)), device), config, lr, val, test)
    record = {**spec, "N": model.num_parameters(non_embedding=True), "lr": lr, **out, "device": device,
              "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
    _write_json(path, record)
    return {**record, "cached": False}


def grid_jobs(grid: TransferGrid) -> list[tuple]:
    """(kind, size, D, source) of every run of a grid, size by size."""
    jobs = []
    for size in grid.sizes:
        jobs += [("scratch", size, D, None) for D in grid.scratch_D]
        jobs += [("finetune", size, D, src) for src in grid.sources for D in grid.finetune_D]
    return jobs


def _run_job(job) -> dict | None:
    """One job of a parallel grid, in a worker process: ``None`` if it would start past the deadline."""
    kind, size, D, src, cfg, device, cache, deadline = job
    if kind == "base":  # build (or read) a base model: fine-tuning runs wait for these
        if not (base_path(size, src, cfg, cache) / "meta.json").is_file() and time.time() > deadline:
            return None
        return {"kind": "base", "size": size, "source": src, **load_base(size, src, cfg, device, cache)[1]}
    if not run_path(run_spec(kind, size, D, src, cfg), cache).is_file() and time.time() > deadline:
        return None
    return run(kind, size, D, src, cfg, device, cache)


def run_grid(grid: TransferGrid, device: str = "cpu", cache: Path | None = None, budget_s: float | None = None,
             log=print, jobs: int = 1) -> tuple[list[dict], int]:
    """Every run of ``grid`` (cached ones are read back); returns ``(results, runs_left)``.

    With ``budget_s``, no new run starts once that many seconds have passed; running the
    same grid again continues where it stopped, since finished runs are cached.

    With ``jobs > 1``, that many worker processes share the runs (on a GPU they share the
    device: these small models leave it mostly idle, waiting on the host). Phase one
    pretrains the bases and runs the scratch runs, largest models first; phase two
    fine-tunes, once every base exists. The results are the same as with ``jobs=1``; only
    the seconds each run took change, since runs compete for the cores.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    t0, order = time.perf_counter(), grid_jobs(grid)
    deadline = math.inf if budget_s is None else time.time() + budget_s
    found: dict[int, dict] = {}

    def report(i, r):
        kind, size, D, src = order[i]
        found[i] = r
        if log:
            how = "cached" if r["cached"] else f"{r['seconds']:.1f} s"
            log(f"[{i + 1:>3}/{len(order)}] {kind:8s} {size:5s} {src or '':9s} D={D:>9,}: loss {r['loss']:.4f} "
                f"(best step {r['best_step']}/{r['steps']}, {r['epochs_at_best']:.1f} epochs) {how}")

    if jobs == 1:
        for i, (kind, size, D, src) in enumerate(order):
            cfg = grid.config_for(size)
            cached = run_path(run_spec(kind, size, D, src, cfg), cache).is_file()
            if cached or time.perf_counter() - t0 <= (math.inf if budget_s is None else budget_s):
                report(i, run(kind, size, D, src, cfg, device, cache, log))
    else:
        rank = {s: k for k, s in enumerate(grid.sizes)}
        bases = [("base", s, 0, src) for s in reversed(grid.sizes) for src in grid.sources]
        first = sorted((i for i, j in enumerate(order) if j[0] == "scratch"),
                       key=lambda i: (-rank[order[i][1]], -order[i][2]))  # biggest runs first: balance the tail
        phase1 = bases + [order[i] for i in first]
        ids1 = [None] * len(bases) + first
        for phase, ids in ((phase1, ids1), ([order[i] for i in range(len(order)) if order[i][0] == "finetune"],
                                            [i for i in range(len(order)) if order[i][0] == "finetune"])):
            work = [(k, s, D, src, grid.config_for(s), device, cache, deadline) for k, s, D, src in phase]
            for n, r in spawn_map(_run_job, work, jobs):
                if r is None:
                    continue
                if ids[n] is None:
                    if log:
                        log(f"  base {r['size']} on {r['source']}: {r['source_val_loss']:.3f} nats/byte on its "
                            f"source, {r['python_test_loss_zero_shot']:.3f} on Python ({r['seconds']:.0f} s)")
                else:
                    report(ids[n], r)
    return [found[i] for i in sorted(found)], len(order) - len(found)
