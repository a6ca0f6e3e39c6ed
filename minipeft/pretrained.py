"""Base models that minipeft pretrains itself on local text, and caches.

Nothing downloads: a "pretrained" model here is a GPT trained by minipeft on the
English text of the local Python installation (docstrings and pydoc topics, see
``minipeft.data.corpus``), or on any UTF-8 file a user gives. ``load(name)`` returns the
cached model, training it first if it is not there yet. The cache lives in
``$MINIPEFT_CACHE/pretrained`` (default ``~/.cache/minipeft/pretrained``), one
Hugging-Face-style directory per model (``config.json`` + ``model.safetensors``, so
``GPT2LMHeadModel.from_pretrained`` can read it too) plus ``meta.json`` with the
training record.

Sizes (the model ladder of methods.md §0.3, and GPT-2 small for a GPU):

* ``tiny``  (T0: 2 layers, d 64):  trains on 2 CPU cores in a few minutes.
* ``small`` (T1: 4 layers, d 128): minutes on a GPU, long on a CPU.
* ``medium`` (T2), ``large`` (T3), ``gpt2`` (12 layers, d 768): for a GPU.

``quick=True`` trains a few-second version of a size (for tests, CI and notebooks in
quick mode); it is cached separately and is not a good model.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .backend import resolve_device, to_device
from .data import Corpus, eval_batches, lm_batches
from .engine import no_grad
from .gpt import GPT, GPTConfig
from .train import TrainConfig, train


@dataclass(frozen=True)
class PretrainSpec:
    preset: str  # GPTConfig preset name (gpt.CONFIGS)
    max_steps: int  # optimizer steps
    batch_size: int  # sequences per step
    block_size: int  # tokens per sequence (<= the preset's block_size)
    lr: float  # peak learning rate (cosine decay, linear warmup)
    warmup_steps: int  # warmup steps
    max_bytes: int | None = None  # train bytes of the corpus to read (None: all)


SIZES: dict[str, PretrainSpec] = {
    "tiny": PretrainSpec("T0", max_steps=1500, batch_size=8, block_size=128, lr=3e-3, warmup_steps=50),
    "small": PretrainSpec("T1", max_steps=3000, batch_size=32, block_size=256, lr=2e-3, warmup_steps=100),
    "medium": PretrainSpec("T2", max_steps=4000, batch_size=32, block_size=256, lr=1e-3, warmup_steps=200),
    "large": PretrainSpec("T3", max_steps=5000, batch_size=32, block_size=512, lr=6e-4, warmup_steps=300),
    "gpt2": PretrainSpec("gpt2", max_steps=5000, batch_size=16, block_size=512, lr=3e-4, warmup_steps=300),
}
QUICK_STEPS = 120  # optimizer steps of a quick=True model


def cache_root() -> Path:
    """``$MINIPEFT_CACHE/pretrained`` (default ``~/.cache/minipeft/pretrained``)."""
    return Path(os.environ.get("MINIPEFT_CACHE", Path.home() / ".cache" / "minipeft")) / "pretrained"


def _corpus_tag(corpus: str) -> str:
    if Path(corpus).is_file():
        h = hashlib.sha256(Path(corpus).read_bytes()).hexdigest()[:12]
        return f"file-{h}"
    return corpus.replace("+", "_")


def model_dir(name: str, corpus: str = "english", quick: bool = False) -> Path:
    """Where ``load(name, corpus, quick)`` caches its model."""
    import sys

    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return cache_root() / f"{name}{'-quick' if quick else ''}-{_corpus_tag(corpus)}-{py}"


def _spec(name: str, quick: bool, steps: int | None) -> PretrainSpec:
    if name not in SIZES:
        raise ValueError(f"unknown pretrained size {name!r}; known sizes: {sorted(SIZES)}")
    s = SIZES[name]
    if quick:
        s = PretrainSpec(s.preset, QUICK_STEPS, s.batch_size, min(s.block_size, 64), s.lr, 10, 2_000_000)
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        s = PretrainSpec(s.preset, steps, s.batch_size, s.block_size, s.lr, min(s.warmup_steps, steps // 10),
                         s.max_bytes)
    return s


def validation_loss(model: GPT, tokens, block_size: int, batch_size: int = 16, max_batches: int = 20) -> float:
    """Mean next-token cross-entropy (nats/token) over the first windows of ``tokens``."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    with no_grad():
        for x, y in eval_batches(tokens, batch_size, block_size, max_batches=max_batches):
            loss = model(x, targets=y).loss.item()
            total += loss * x.size
            n += x.size
    model.train(was_training)
    return total / max(n, 1)


def pretrain(name: str = "tiny", corpus: str = "english", device: str = "cpu", quick: bool = False,
             steps: int | None = None, seed: int = 0, progress: bool = True, save: bool = True):
    """Train a base model of size ``name`` on ``corpus``; return ``(model, meta)``.

    ``corpus`` is a built-in corpus name ('english', 'python', 'mixed', ...) or the path of
    any UTF-8 text file. The model is saved under ``model_dir(name, corpus, quick)``.
    """
    device = resolve_device(device)
    spec = _spec(name, quick, steps)
    data = Corpus.load(corpus, max_bytes=spec.max_bytes)
    cfg = GPTConfig.preset(spec.preset, vocab_size=data.vocab_size)
    if spec.block_size > cfg.block_size:
        raise ValueError(f"block_size {spec.block_size} exceeds the preset's {cfg.block_size}")
    model = GPT(cfg, seed=seed).to(device)
    train_tokens = to_device(data.train, device)
    val_tokens = to_device(data.val, device)
    if len(data.val) <= spec.block_size + 1:
        raise ValueError(f"corpus {corpus!r} has too little validation text ({len(data.val)} tokens) "
                         f"for windows of {spec.block_size}; give a larger file")
    tc = TrainConfig(max_steps=spec.max_steps, batch_size=spec.batch_size, lr=spec.lr, schedule="cosine",
                     warmup_steps=spec.warmup_steps, min_lr=spec.lr / 10, weight_decay=0.1, grad_clip=1.0,
                     eval_every=max(spec.max_steps // 20, 1), seed=seed, progress=progress)
    t0 = time.perf_counter()
    val_before = validation_loss(model, val_tokens, spec.block_size)
    result = train(model, lambda rng: lm_batches(train_tokens, spec.batch_size, spec.block_size, rng), config=tc,
                   eval_fn=lambda m: validation_loss(m, val_tokens, spec.block_size, max_batches=4))
    val_after = validation_loss(model, val_tokens, spec.block_size)
    val_curve = [[0, val_before]] + [[int(s), float(m["val_loss"])] for s, m in result.eval_history]
    meta = {
        "name": name, "corpus": str(corpus), "quick": quick, "device": device, "seed": seed,
        "spec": asdict(spec), "config": cfg.to_dict(),
        "train_tokens": int(len(data.train)), "val_tokens": int(len(data.val)),
        "unigram_val_loss": float(data.unigram_baseline()),
        "val_loss_before": val_before, "val_loss": val_after,
        "train_losses": [float(v) for v in result.losses],
        "val_curve": val_curve,
        "tokens_per_sec": float(result.final.get("tokens_per_sec", 0.0)),
        "seconds": time.perf_counter() - t0,
    }
    if save:
        out = model_dir(name, corpus, quick)
        model.save_hf(out)
        (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return model, meta


def load(name: str = "tiny", corpus: str = "english", device: str = "cpu", quick: bool = False,
         progress: bool = True, return_meta: bool = False):
    """The cached base model ``name`` (trained first when missing), on ``device``."""
    d = model_dir(name, corpus, quick)
    if (d / "meta.json").exists() and (d / "model.safetensors").exists():
        model = GPT.from_hf(d).to(resolve_device(device))
        meta = json.loads((d / "meta.json").read_text())
    else:
        if progress:
            print(f"[minipeft] no cached base model {d.name!r}: pretraining it once (cached in {d.parent})")
        model, meta = pretrain(name, corpus, device=device, quick=quick, progress=progress)
    return (model, meta) if return_meta else model


def sample(model: GPT, tokenizer, prompt: str, max_new_tokens: int = 80, seed: int = 0, top_k: int = 20) -> str:
    """A sampled continuation of ``prompt`` (for before/after comparisons)."""
    xp_ids = to_device(tokenizer.encode(prompt)[None, :], model.device)
    out = model.generate(xp_ids, max_new_tokens, temperature=0.8, top_k=top_k, seed=seed)
    ids = np.asarray(to_device(out, "cpu"))[0, xp_ids.shape[1]:]
    return tokenizer.decode(ids)
