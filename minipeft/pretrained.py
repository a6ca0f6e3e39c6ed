"""Base models that minipeft pretrains itself on local text, and caches.

Nothing downloads: a "pretrained" model here is a GPT trained by minipeft on the
English text of the local Python installation (docstrings and pydoc topics, see
``minipeft.data.corpus``), or on any UTF-8 file a user gives. ``load(name)`` returns the
cached model, training it first if it is not there yet. The cache lives in
``$MINIPEFT_CACHE/pretrained`` (default ``~/.cache/minipeft/pretrained``), one
Hugging-Face-style directory per model (``config.json`` + ``model.safetensors``, so
``GPT2LMHeadModel.from_pretrained`` can read it too) plus ``meta.json`` with the
training record.

Sizes (``minipeft.sizes.BASES``, the one table; each base knows exactly the positions it
was pretrained on):

* ``tiny``  (T0: 2 layers, d 64, 128 positions): trains on 2 CPU cores in about a minute.
* ``tiny-512`` (T0 with 512 positions, for E2E on a CPU): the same tokens in windows of 512.
* ``small`` (T1: 4 layers, d 128), ``medium`` (T2), ``large`` (T3), 512 positions, and ``gpt2``
  (12 layers, d 768, 1024 positions): for a GPU.

``quick=True`` trains a few-second version of a size (for tests, CI and notebooks in
quick mode), on windows as long as its positions; it is cached separately and is not a
good model. The cache directory names the size, corpus, Python, and any non-default
steps or seed, so a short experiment never replaces the base the lessons use. A model is
written into a temporary directory and renamed into place, so a kill mid-save leaves the
previous model whole; ``load`` retrains a directory that is incomplete.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from .atomic import atomic_directory, recover
from .backend import resolve_device, to_device
from .data import Corpus, eval_batches, lm_batches
from .gpt import GPT, GPTConfig
from .integrity import dumps_with_digest, read_json
from .sizes import BASES, BaseSize
from .train import TrainConfig, train
from .train import validation_loss as train_validation_loss


SIZES: dict[str, BaseSize] = BASES  # the one table of base sizes (minipeft.sizes)
QUICK_STEPS = 120  # optimizer steps of a quick=True model
QUICK_TOKENS_PER_STEP = 512  # tokens per step of a quick=True model (batch = this // positions, at least 1)


def cache_root() -> Path:
    """``$MINIPEFT_CACHE/pretrained`` (default ``~/.cache/minipeft/pretrained``)."""
    return Path(os.environ.get("MINIPEFT_CACHE", Path.home() / ".cache" / "minipeft")) / "pretrained"


def _corpus_tag(corpus: str) -> str:
    if Path(corpus).is_file():
        h = hashlib.sha256(Path(corpus).read_bytes()).hexdigest()[:12]
        return f"file-{h}"
    return corpus.replace("+", "_")


def model_dir(name: str, corpus: str = "english", quick: bool = False, steps: int | None = None,
              seed: int = 0) -> Path:
    """Where ``pretrain``/``load`` cache a base: size, corpus, Python, and any non-default steps or seed."""
    import sys

    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    extra = (f"-steps{steps}" if steps is not None else "") + (f"-seed{seed}" if seed else "")
    return cache_root() / f"{name}{'-quick' if quick else ''}-{_corpus_tag(corpus)}-{py}{extra}"


def _spec(name: str, quick: bool, steps: int | None) -> BaseSize:
    if name not in SIZES:
        raise ValueError(f"unknown pretrained size {name!r}; known sizes: {sorted(SIZES)}")
    s = SIZES[name]
    if quick:  # windows as long as the positions, few tokens per step
        s = replace(s, max_steps=QUICK_STEPS, batch_size=max(1, QUICK_TOKENS_PER_STEP // s.block_size),
                    warmup_steps=10, max_bytes=2_000_000)
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        s = replace(s, max_steps=steps, warmup_steps=min(s.warmup_steps, steps // 10))
    return s


def validation_loss(model: GPT, tokens, block_size: int, batch_size: int = 16, max_batches: int = 20) -> float:
    """Mean next-token cross-entropy (nats/token) over the first windows of ``tokens`` (``train.validation_loss``)."""
    return train_validation_loss(model, eval_batches(tokens, batch_size, block_size, max_batches=max_batches))


def pretrain(name: str = "tiny", corpus: str = "english", device: str = "cpu", quick: bool = False,
             steps: int | None = None, seed: int = 0, progress: bool = True, save: bool = True):
    """Train a base model of size ``name`` on ``corpus``; return ``(model, meta)``.

    ``corpus`` is a built-in corpus name ('english', 'python', 'mixed', ...) or the path of
    any UTF-8 text file. The model is saved under ``model_dir(name, corpus, quick)``.
    """
    device = resolve_device(device)
    spec = _spec(name, quick, steps)
    data = Corpus.load(corpus, max_bytes=spec.max_bytes)
    cfg = GPTConfig.preset(spec.shape, vocab_size=data.vocab_size)
    assert spec.block_size == cfg.block_size, "a base is pretrained on windows as long as its positions"
    model = GPT(cfg, seed=seed).to(device)
    train_tokens = to_device(data.train, device)
    val_tokens = to_device(data.val, device)
    if len(data.val) <= spec.block_size + 1:
        raise ValueError(f"corpus {corpus!r} has too little validation text ({len(data.val)} tokens) "
                         f"for windows of {spec.block_size}; give a larger file")
    tc = TrainConfig(max_steps=spec.max_steps, batch_size=spec.batch_size, lr=spec.lr, schedule="cosine",
                     warmup_steps=spec.warmup_steps, min_lr=spec.lr / 10, weight_decay=0.1, grad_clip=1.0,
                     eval_every=max(spec.max_steps // (4 if quick else 20), 1), seed=seed, progress=progress)
    t0 = time.perf_counter()
    nb = 2 if quick else 20  # validation windows of 16 x block_size tokens (a quick model is not for reading)
    val_before = validation_loss(model, val_tokens, spec.block_size, max_batches=nb)
    result = train(model, lambda rng: lm_batches(train_tokens, spec.batch_size, spec.block_size, rng), config=tc,
                   eval_fn=lambda m: validation_loss(m, val_tokens, spec.block_size, max_batches=min(nb, 4)))
    val_after = validation_loss(model, val_tokens, spec.block_size, max_batches=nb)
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
        _save_atomically(model, meta, model_dir(name, corpus, quick, steps, seed))
    return model, meta


def _save_atomically(model: GPT, meta: dict, out: Path) -> None:
    """Write config, weights and ``meta.json`` into a temporary directory, then swap it in (``minipeft.atomic``)."""
    with atomic_directory(out) as tmp:
        model.save_hf(tmp)
        (tmp / "meta.json").write_text(dumps_with_digest(meta))


def load(name: str = "tiny", corpus: str = "english", device: str = "cpu", quick: bool = False,
         progress: bool = True, return_meta: bool = False):
    """The cached base model ``name`` (trained first when missing or damaged), on ``device``."""
    d = model_dir(name, corpus, quick)
    recover(d)  # a save killed between its two renames left the previous model aside
    model = meta = None
    if (d / "meta.json").exists() and (d / "model.safetensors").exists():
        try:
            meta = read_json(d / "meta.json", f"Delete {d} and rerun")
            model = GPT.from_hf(d).to(resolve_device(device))
        except Exception as e:  # a damaged cache entry is rebuilt, not fatal
            print(f"[minipeft] cached base model {d} is damaged ({type(e).__name__}: {e}); pretraining it again")
            model, meta = None, {}
    if model is None:
        if progress and meta is None:
            print(f"[minipeft] no cached base model {d.name!r}: pretraining it once (cached in {d.parent})")
        model, meta = pretrain(name, corpus, device=device, quick=quick, progress=progress)
    return (model, meta) if return_meta else model


def sample(model: GPT, tokenizer, prompt: str, max_new_tokens: int = 80, seed: int = 0, top_k: int = 20) -> str:
    """A sampled continuation of ``prompt`` (for before/after comparisons)."""
    xp_ids = to_device(tokenizer.encode(prompt)[None, :], model.device)
    out = model.generate(xp_ids, max_new_tokens, temperature=0.8, top_k=top_k, seed=seed)
    ids = np.asarray(to_device(out, "cpu"))[0, xp_ids.shape[1]:]
    return tokenizer.decode(ids)
