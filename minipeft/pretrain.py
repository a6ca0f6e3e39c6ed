"""Pretrain a base model: ``python -m minipeft.pretrain --size tiny [--corpus PATH] [--device cuda]``.

Trains on the local English corpus (or any UTF-8 text file given with ``--corpus``),
with a progress bar, then prints validation loss against the unigram baseline and
caches the model for ``minipeft.pretrained.load``.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from . import pretrained
from .atomic import check_writable_dir
from .backend import resolve_device


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m minipeft.pretrain", description=__doc__.split("\n")[0])
    p.add_argument("--size", default="tiny", choices=sorted(pretrained.SIZES), help="model size (default tiny)")
    p.add_argument("--corpus", default="english",
                   help="built-in corpus name (english, python, mixed, ...) or path of a UTF-8 text file")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--steps", type=int, default=None, help="override the number of optimizer steps")
    p.add_argument("--quick", action="store_true", help="a few-second model (for checks, not for lessons)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-save", action="store_true", help="do not write the model to the cache")
    a = p.parse_args(argv)

    def fail(msg: str):  # a user error: one line, exit code 2, no traceback
        p.exit(2, f"{p.prog}: error: {msg}\n")

    if a.steps is not None and a.steps < 1:
        fail(f"--steps {a.steps}: must be a positive number of optimizer steps")
    if a.seed < 0:
        fail(f"--seed {a.seed}: must be >= 0")
    try:
        device = resolve_device(a.device)
    except (ValueError, RuntimeError) as e:
        fail(f"--device {a.device}: {e}")
    if a.corpus not in ("english",) and not Path(a.corpus).exists():
        from .data.corpus import is_corpus_name

        if not is_corpus_name(a.corpus):
            fail(f"--corpus {a.corpus!r}: no such file, and not a built-in corpus name")
    if not a.no_save:
        why = check_writable_dir(pretrained.cache_root())
        if why:
            fail(f"cannot save the model: {why} (set MINIPEFT_CACHE to a writable folder, or pass --no-save)")
    try:
        model, meta = pretrained.pretrain(a.size, a.corpus, device=device, quick=a.quick, steps=a.steps,
                                          seed=a.seed, save=not a.no_save)
    except (ValueError, FileNotFoundError, UnicodeDecodeError) as e:
        fail(str(e))
    bits = 1 / math.log(2)
    print(f"\nmodel {a.size} ({model.num_parameters():,} parameters) on {meta['corpus']}: "
          f"{meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, {meta['seconds']:.0f} s "
          f"on {meta['device']}")
    print(f"  validation loss before training : {meta['val_loss_before']:.3f} nats/token")
    print(f"  unigram baseline                : {meta['unigram_val_loss']:.3f} nats/token "
          f"({meta['unigram_val_loss'] * bits:.2f} bits/byte)")
    print(f"  validation loss after training  : {meta['val_loss']:.3f} nats/token "
          f"({meta['val_loss'] * bits:.2f} bits/byte)")
    if not a.no_save:
        print(f"  saved to {pretrained.model_dir(a.size, a.corpus, a.quick, a.steps, a.seed)}")
    return meta


if __name__ == "__main__":
    main()
