"""Evaluate a base model or an adapter on E2E-format data: decode every MR, score it as the challenge does.

``python -m minipeft.lessons.e2e_eval --adapter DIR [--base tiny|HF_DIR] [--data FILE.csv] [--beam 5] [--out OUT.txt]``

1. The base model: ``--base`` is a Hugging Face GPT-2 directory (``config.json`` +
   ``model.safetensors``) or a size of ``minipeft.pretrained`` (``tiny``, ``small``...);
   without it, the adapter's ``base_model_name_or_path`` (the lessons write the path of
   the base they trained on). ``--adapter`` is a directory written by ``save_adapter``
   (or peft's ``save_pretrained``); without it the base alone is scored.
2. The data: any CSV with ``mr`` and ``ref`` columns (the E2E challenge's format; the
   references are grouped by MR), or, without ``--data``, the held-out test MRs of the
   synthetic set the E2E lesson trains on.
3. Every MR's prompt (``name : X | Type : Y ...||``, microsoft/LoRA's format) is decoded
   with beam search (``minipeft.decoding``; beam 5 as prefix tuning's E2E runs, length
   penalty and no-repeat n-gram on request) and scored with BLEU, NIST, ROUGE-L and CIDEr
   exactly as ``tuetschek/e2e-metrics`` computes them (``minipeft.metrics``; BLEU and
   ROUGE-L in [0, 1] as that script prints them; papers print them x100).

Writes the outputs (one line per MR, in the file's MR order: what ``measure_scores.py``
reads) and a JSON file of the scores and settings.

**Positions.** An E2E prompt and its text take up to ~550 bytes. The E2E lesson's bases are
pretrained with 512 positions (``tiny-512``, ``small`` ...: ``minipeft.sizes``), so every
position they meet was learned. ``--block-size N`` stretches a shorter base's table by
copying it (``extend_positions``; the copy initialisation of Longformer, Beltagy et al.
2020, arXiv 2004.05150, §5) — an explicit choice with a warning, because copied rows were
never trained at their new places and a frozen-base method cannot fix them; an adapter
of full fine-tuning carries its own position table, and its length is used automatically.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from ..atomic import check_writable_dir, write_text_atomic
from ..backend import resolve_device, to_numpy
from ..data.e2e import E2EData, load_e2e_csv, split_by_mr, synthetic_e2e
from ..data.tokenizer import ByteTokenizer
from ..decoding import DecodeConfig, decode
from ..gpt import GPT, GPTConfig
from ..integrity import read_metadata
from ..metrics import e2e_scores

SYNTHETIC_MRS = 600  # distinct MRs of the synthetic E2E set the lesson trains on
SYNTHETIC_SEED = 0  # its seed
VAL_FRACTION, TEST_FRACTION = 0.1, 0.1  # held-out MRs (split by MR, never by row)
METRICS = ("BLEU", "NIST", "ROUGE_L", "CIDEr")


# ------------------------------------------------------------------ data


def e2e_splits(data: E2EData, val_fraction: float = VAL_FRACTION, test_fraction: float = TEST_FRACTION,
               seed: int = 0) -> tuple[E2EData, E2EData, E2EData]:
    """``(train, val, test)`` by distinct MR: no MR is in two of them."""
    if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be > 0 and sum "
                         "to less than 1")
    if len(data) < 3:
        raise ValueError(f"need at least 3 distinct MRs for train/val/test, got {len(data)}")
    rest, test = split_by_mr(data, test_fraction, seed)
    train, val = split_by_mr(rest, val_fraction / (1 - test_fraction), seed + 1)
    return train, val, test


def synthetic_splits(n_mrs: int = SYNTHETIC_MRS, seed: int = SYNTHETIC_SEED):
    """The lesson's synthetic data set, split by MR into ``(train, val, test)``."""
    return e2e_splits(synthetic_e2e(n_mrs, seed=seed), seed=seed)


# ------------------------------------------------------------------ models


def extend_positions(model: GPT, block_size: int) -> GPT:
    """A copy of ``model`` with ``block_size`` learned positions: the old table repeated (Longformer §5).

    Positions ``p`` and ``p + block_size_old`` start with the same vector, so the local
    order the model learned is kept everywhere; fine-tuning can then specialise them.
    """
    old = model.config.block_size
    if block_size <= old:
        if block_size == old:
            return model
        raise ValueError(f"block_size {block_size} is smaller than the model's {old}; positions are only extended")
    cfg = GPTConfig.from_dict({**model.config.to_dict(), "block_size": int(block_size)})
    device = model.device
    state = {k: to_numpy(v) for k, v in model.state_dict().items()}
    wpe = state["transformer.wpe.weight"]  # (old, C)
    state["transformer.wpe.weight"] = np.concatenate([wpe] * math.ceil(block_size / old))[:block_size]
    new = GPT(cfg, init_weights=False)
    new.load_state_dict(state)
    return new.to(device).train(model.training)


def load_base(base: str, device: str = "cpu", block_size: int | None = None, quick: bool = False) -> GPT:
    """A base GPT from a Hugging Face directory or a ``minipeft.pretrained`` size, positions extended if asked."""
    from .. import pretrained

    path = Path(base)
    if path.is_dir():
        model = GPT.from_hf(path).to(device)
    elif base in pretrained.SIZES:
        model = pretrained.load(base, device=device, quick=quick, progress=True)
    else:
        raise FileNotFoundError(f"base {base!r} is neither a directory (Hugging Face GPT-2: config.json + "
                                f"model.safetensors) nor a minipeft size {sorted(pretrained.SIZES)}")
    if block_size is not None and block_size != model.config.block_size:
        print(f"[minipeft] warning: extending the base's {model.config.block_size} learned positions to "
              f"{block_size} by copying; positions past {model.config.block_size} were never trained there. "
              "Prefer a base pretrained at that length (e.g. --base tiny-512).", file=sys.stderr)
        model = extend_positions(model, block_size)
    return model.eval()


def _adapter_base_and_positions(adapter: str) -> tuple[str | None, int | None]:
    """The base named in ``adapter_config.json``, and the position-table length a saved wpe implies."""
    from ..peft.io import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config

    d = Path(adapter)
    if not d.is_dir():
        raise FileNotFoundError(f"adapter directory {d} not found (expected {CONFIG_NAME} and {WEIGHTS_NAME}, as "
                                "save_adapter writes them)")
    if not (d / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{d / CONFIG_NAME} not found: {d} is not an adapter directory")
    read_adapter_config(str(d / CONFIG_NAME))  # fails early, naming the file, if it is damaged
    base = json.loads((d / CONFIG_NAME).read_text()).get("base_model_name_or_path")
    n_pos = None
    if (d / WEIGHTS_NAME).is_file():
        from safetensors import safe_open

        read_metadata(d / WEIGHTS_NAME, f"Resave the adapter into {d}")  # a damaged header fails here, named
        with safe_open(str(d / WEIGHTS_NAME), framework="numpy") as f:
            for k in f.keys():
                if k.endswith("transformer.wpe.weight"):
                    n_pos = int(f.get_slice(k).get_shape()[0])
    return base, n_pos


def load_model(adapter: str | None, base: str | None = None, device: str = "cpu", block_size: int | None = None):
    """The model to evaluate: ``base`` with the adapter in ``adapter`` loaded (frozen), in eval mode."""
    named_base, n_pos = _adapter_base_and_positions(adapter) if adapter else (None, None)
    base = base or named_base
    if base is None:
        raise ValueError("no base model: pass --base (a Hugging Face GPT-2 directory or a minipeft size such as "
                         "'tiny'); the adapter's adapter_config.json names none")
    model = load_base(base, device, block_size or n_pos)
    if adapter:
        from ..peft.io import load_adapter

        model = load_adapter(model, adapter)
    return model.eval()


# ------------------------------------------------------------------ decoding and scoring


def decode_texts(model, prompts: list[str], config: DecodeConfig | None = None, tokenizer=None,
                 progress: bool = False) -> list[str]:
    """One output line per prompt: decoded with ``config`` (eos from the tokenizer), newlines flattened."""
    tok = tokenizer or ByteTokenizer()
    V = model.config.vocab_size
    if V != tok.vocab_size:
        raise ValueError(f"the model's vocabulary has {V} tokens but the tokenizer has {tok.vocab_size}; minipeft "
                         "evaluates byte-level models (ByteTokenizer): pass the matching tokenizer")
    cfg = config or DecodeConfig()
    if cfg.eos_token_id is None:
        import dataclasses

        cfg = dataclasses.replace(cfg, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    outs = decode(model, [tok.encode(p) for p in prompts], cfg, progress=progress)
    return [" ".join(tok.decode(o).split()) for o in outs]


def score(hyps: list[str], data: E2EData) -> dict:
    """BLEU, NIST, ROUGE_L, CIDEr (the challenge's scale) of one output per MR, and the number of MRs."""
    if len(hyps) != len(data):
        raise ValueError(f"{len(hyps)} outputs for {len(data)} MRs: need exactly one output per MR")
    return {**e2e_scores(list(hyps), [list(r) for r in data.refs]), "n_mrs": len(data)}


def evaluate(model, data: E2EData, config: DecodeConfig | None = None, tokenizer=None,
             progress: bool = False) -> tuple[list[str], dict]:
    """Decode every MR of ``data`` and score the outputs: ``(outputs, scores)``."""
    hyps = decode_texts(model, data.prompts(), config, tokenizer, progress)
    return hyps, score(hyps, data)


def format_scores(scores: dict) -> str:
    """The metric table: the challenge's scale, and as papers print it (BLEU and ROUGE-L x100)."""
    lines = [f"  {'metric':<8} {'score':>8}   {'papers print':>12}", "  " + "-" * 32]
    for k in METRICS:
        v = scores[k]
        paper = f"{100 * v:.2f}" if k in ("BLEU", "ROUGE_L") else f"{v:.4f}"
        lines.append(f"  {k:<8} {v:>8.4f}   {paper:>12}")
    lines.append(f"  ({scores['n_mrs']} MRs)")
    return "\n".join(lines)


# ------------------------------------------------------------------ command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minipeft.lessons.e2e_eval",
                                description="Decode every MR of an E2E-format CSV and print BLEU, NIST, ROUGE-L, "
                                            "CIDEr (tuetschek/e2e-metrics definitions).")
    p.add_argument("--adapter", default=None, metavar="DIR", help="adapter directory (save_adapter / peft); "
                   "omit to score the base model alone")
    p.add_argument("--base", default=None, help="Hugging Face GPT-2 directory or minipeft size (tiny, small...); "
                   "default: the adapter's base_model_name_or_path")
    p.add_argument("--data", default=None, metavar="FILE.csv", help="E2E-format CSV (columns mr, ref); default: "
                   "the synthetic set's held-out test MRs")
    p.add_argument("--beam", type=int, default=5, help="beam size (1 = greedy; default 5)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="alpha of lp(n) = n^alpha (default 1.0)")
    p.add_argument("--gnmt", action="store_true", help="GNMT's lp(n) = ((5 + n) / 6)^alpha instead")
    p.add_argument("--no-repeat-ngram", type=int, default=0, metavar="N",
                   help="ban repeating any N-gram of generated tokens (0 = off; bytes, so ~4 words is ~20)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: until eos or the end of block_size")
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together (default 16)")
    p.add_argument("--block-size", type=int, default=None, help="stretch a shorter base's positions to N by "
                   "copying (explicit; warns: prefer a base pretrained at N)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N MRs")
    p.add_argument("--out", default=None, metavar="OUT.txt", help="outputs, one line per MR (default: "
                   "<adapter or .>/e2e_outputs.txt)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="scores (default: OUT.txt with .json)")
    p.add_argument("--device", default=None, help="cpu | cuda | auto (default $MINIPEFT_DEVICE or cpu)")
    p.add_argument("--progress", action="store_true", help="show a progress bar while decoding")
    return p


def main(argv=None) -> dict:
    p = _parser()
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else Path(a.adapter or ".") / "e2e_outputs.txt"
    js = Path(a.json) if a.json else out.with_suffix(".json")
    for flag, f in (("--out", out), ("--json", js)):  # before any decoding: fail in seconds, not after it
        why = "it is a directory; give a file name" if f.is_dir() else check_writable_dir(f.parent)
        if why:
            p.exit(2, f"{p.prog}: error: {flag} {f} cannot be written ({why})\n")
    try:
        if a.beam < 1:
            raise ValueError(f"--beam must be >= 1, got {a.beam}")
        if a.limit is not None and a.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {a.limit}")
        if a.data is not None:
            data = load_e2e_csv(a.data)
        else:
            data = synthetic_splits()[2]
        if a.limit:
            data = data.subset(range(min(a.limit, len(data))))
        device = resolve_device(a.device)
        model = load_model(a.adapter, a.base, device, a.block_size)
        max_new = a.max_new_tokens if a.max_new_tokens is not None else model.config.block_size
        cfg = DecodeConfig(num_beams=a.beam, max_new_tokens=max_new, length_penalty=a.length_penalty,
                           length_penalty_style="gnmt" if a.gnmt else "hf", no_repeat_ngram_size=a.no_repeat_ngram,
                           ngram_include_prompt=False, batch_size=a.batch_size)
        t0 = time.perf_counter()
        hyps, scores = evaluate(model, data, cfg, progress=a.progress)
        seconds = time.perf_counter() - t0
    except (FileNotFoundError, ValueError) as e:
        hint = " (--block-size N extends the positions of a base given by name)" if "block_size" in str(e) else ""
        p.exit(2, f"{p.prog}: error: {e}{hint}\n")
    write_text_atomic(out, "".join(h + "\n" for h in hyps))
    result = {"scores": {k: float(scores[k]) for k in METRICS}, "n_mrs": int(scores["n_mrs"]),
              "data": data.source, "adapter": a.adapter, "base": a.base,
              "decoding": {"num_beams": cfg.num_beams, "length_penalty": cfg.length_penalty,
                           "length_penalty_style": cfg.length_penalty_style,
                           "no_repeat_ngram_size": cfg.no_repeat_ngram_size, "max_new_tokens": cfg.max_new_tokens},
              "seconds": seconds, "outputs": str(out)}
    write_text_atomic(js, json.dumps(result, indent=2))
    print(f"E2E evaluation of {a.adapter or 'the base model'} on {data.source}")
    print(format_scores(scores))
    print(f"outputs: {out}\nscores : {js}\n({seconds:.1f} s to decode and score)")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
