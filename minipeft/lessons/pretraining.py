"""Lesson: pretraining the base model every other lesson fine-tunes.

``python -m minipeft.lessons.pretraining [--quick] [--device cuda] [--figures DIR]``

Fine-tuning starts from a model that already learned something. Here minipeft trains
its own: a GPT-2-shaped model (the ``tiny`` size, 2 layers, d 64) on the English text
of the local Python installation, byte by byte. The report compares the validation loss
with two references computed on the same text: a model that has learned nothing (the
untrained initialisation, about ln V nats per byte) and a unigram model that knows only
byte frequencies. A base model worth fine-tuning must clearly beat the unigram baseline:
that means it learned context, which is what later lessons transfer. Samples before and
after training show the same thing in text.

The trained model is cached, so ``minipeft.pretrained.load("tiny")`` in the other
lessons reuses it.
"""
from __future__ import annotations

import math

import numpy as np

from .. import pretrained
from ..data import ByteTokenizer
from ..gpt import GPT, GPTConfig
from ._common import Report, finish, parse_args, save_figure

PROMPTS = ["The function returns", "If the argument is"]


def main(argv=None) -> dict:
    args = parse_args(argv, __doc__.split("\n")[0], _add_arguments)
    size = args.extra.size
    rep = Report(f"Pretraining the '{size}' base model on local English text"
                 + (" (quick mode: a few-second model, not a good one)" if args.quick else ""))
    tok = ByteTokenizer()
    spec = pretrained.SIZES[size]
    untrained = GPT(GPTConfig.preset(spec.shape, vocab_size=tok.vocab_size), seed=args.seed).to(args.device)
    before = {p: pretrained.sample(untrained, tok, p, 60, seed=args.seed) for p in PROMPTS}
    model, meta = pretrained.pretrain(size, "english", device=args.device, quick=args.quick, seed=args.seed,
                                      progress=True)
    after = {p: pretrained.sample(model, tok, p, 60, seed=args.seed) for p in PROMPTS}

    bits = 1 / math.log(2)
    rep.section("Model and data")
    rep.table([
        ("parameters", model.num_parameters()),
        ("non-embedding parameters N", model.num_parameters(non_embedding=True)),
        ("train tokens (bytes)", meta["train_tokens"]),
        ("validation tokens", meta["val_tokens"]),
        ("optimizer steps x tokens/step", f"{meta['spec']['max_steps']} x "
                                          f"{meta['spec']['batch_size'] * meta['spec']['block_size']}"),
        ("training time (s)", float(meta["seconds"])),
    ], headers=("", "minipeft"))
    rep.section("Validation loss (nats/token; bits/byte in brackets)")
    rows = [
        ("uniform guess, ln V", math.log(tok.vocab_size)),
        ("untrained model", meta["val_loss_before"]),
        ("unigram baseline", meta["unigram_val_loss"]),
        ("pretrained model", meta["val_loss"]),
    ]
    rep.table([(n, v, v * bits) for n, v in rows], headers=("", "nats/token", "bits/byte"))
    gap = meta["unigram_val_loss"] - meta["val_loss"]
    rep.text(f"\nThe pretrained model is {gap:.3f} nats/token below the unigram baseline: "
             + ("it has learned context beyond byte frequencies." if gap > 0.1 else
                "not clearly better yet (quick mode trains for seconds only)."))
    rep.section("Samples (temperature 0.8, top-k 20)")
    for p in PROMPTS:
        rep.text(f"prompt  : {p!r}")
        rep.text(f"  before: {before[p]!r}")
        rep.text(f"  after : {after[p]!r}")

    steps = np.arange(1, len(meta["train_losses"]) + 1)
    vs, vl = zip(*meta["val_curve"])
    from .figures.common import loss_curves

    fig = loss_curves({"train": (steps, meta["train_losses"]), "validation": (vs, vl)},
                      hlines={"unigram baseline": meta["unigram_val_loss"]},
                      title=f"Pretraining '{size}' on local English text")
    path = save_figure(fig, args, "pretraining_loss")
    if path:
        rep.text(f"\nfigure: {path}")
    rep.done()
    return finish({
        "size": size, "parameters": model.num_parameters(), "val_loss_before": meta["val_loss_before"],
        "unigram_val_loss": meta["unigram_val_loss"], "val_loss": meta["val_loss"],
        "beats_unigram_by": gap, "samples_before": before, "samples_after": after,
        "train_losses": meta["train_losses"], "val_curve": meta["val_curve"],
    }, args)


def _add_arguments(p):
    p.add_argument("--size", default="tiny", choices=sorted(pretrained.SIZES), help="model size (default tiny)")


if __name__ == "__main__":
    main()
