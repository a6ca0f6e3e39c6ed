"""Greedy generation tokens/s: minipeft's ``GPT.generate`` against ``transformers``' ``generate``.

Both get the same GPT-2-shaped model (minipeft's initialisation, copied into
``GPT2LMHeadModel``), the same random prompt of ``--prompt`` tokens for each of the
``--batch`` rows, and generate exactly ``--new`` tokens greedily with the key/value
cache. Reported: seconds per call (median of ``--reps`` after a warm-up call, the device
synchronized), generated tokens per second (batch x new / time), the ratio
minipeft/transformers, and the fraction of generated tokens on which the two agree
(float32 on both sides; a near-tie in the logits can flip an argmax and then the rest of
that row).

On the GPU a second minipeft column times ``minipeft.decoding.graph.generate_graph``, the
greedy decoder whose step is one CUDA graph (``graph_*`` keys; ``ratio_graph`` is
transformers' time over the graph decoder's). It is called as a user calls it, once per
batch: the first (warm-up) call builds its buffers and captures the graph, the timed calls
replay it. Where the graph decoder cannot run (on the CPU) those keys are None and the
reason is printed (and for batches of more than ``MAX_ROWS`` rows, which it does not take).

    python benchmarks/generate.py --device cuda
    python benchmarks/generate.py --device cuda --batch 8 --new 128 --json gen.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minipeft.backend import to_numpy  # noqa: E402
from minipeft.decoding.graph import MAX_ROWS, generate_graph, graph_decodable  # noqa: E402
from minipeft.gpt import GPT, GPTConfig  # noqa: E402

_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    ap.add_argument("--config", default="gpt2", help="GPTConfig preset (default gpt2)")
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    ap.add_argument("--new", type=int, default=128, help="generated tokens (default 128)")
    ap.add_argument("--reps", type=int, default=3, help="timed calls per side (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_out", default=None)
    return ap.parse_args(argv)


def hf_model(torch, cfg: GPTConfig, state: dict, device: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.n_inner, activation_function="gelu_new",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=cfg.layer_norm_epsilon,
                        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=0,
                        use_cache=True)
    model = GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="sdpa")
    sd = {k: torch.from_numpy(np.ascontiguousarray(v.T if k.endswith(_CONV1D) else v)) for k, v in state.items()}
    model.load_state_dict(sd, strict=False)
    return model.to(device).eval()


def timed(f, sync, reps):
    f()
    sync()
    ts, out = [], None
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        out = f()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def main(argv=None):
    args = parse_args(argv)
    import torch
    import transformers

    cfg = GPTConfig.preset(args.config, dropout=0.0)
    mini = GPT(cfg, seed=args.seed)
    state = {k: to_numpy(v) for k, v in mini.state_dict().items()}
    mini.to(args.device).eval()
    tm = hf_model(torch, cfg, state, args.device)
    if args.device == "cuda":
        import cupy as cp

        xp, sync_m, sync_t = cp, cp.cuda.Device().synchronize, torch.cuda.synchronize
        name = torch.cuda.get_device_name(0)
    else:
        xp, sync_m, sync_t, name = np, (lambda: None), (lambda: None), "cpu"
    res = {"command": " ".join(["python", "benchmarks/generate.py"] + (sys.argv[1:] if argv is None else argv)),
           "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "device_name": name,
           "torch": torch.__version__, "transformers": transformers.__version__, "config": args.config,
           "prompt": args.prompt, "new": args.new, "rows": []}
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}))
    no_graph = graph_decodable(mini)  # None: the CUDA-graph decoder runs this model
    if no_graph:
        print(f"CUDA-graph decoder skipped: {no_graph}")
    rng = np.random.default_rng(args.seed + 1)
    for B in (int(b) for b in args.batch.split(",")):
        prompt = rng.integers(0, cfg.vocab_size, size=(B, args.prompt)).astype(np.int64)
        idx_m, idx_t = xp.asarray(prompt), torch.from_numpy(prompt).to(args.device)
        mask_t = torch.ones_like(idx_t)

        def run_m():
            return mini.generate(idx_m, args.new, greedy=True)

        def run_t():
            with torch.no_grad():
                return tm.generate(input_ids=idx_t, attention_mask=mask_t, max_new_tokens=args.new,
                                   min_new_tokens=args.new, do_sample=False, num_beams=1, pad_token_id=0,
                                   use_cache=True)

        def run_g():  # as a user calls it: the first call builds the decoder and captures its graph
            return generate_graph(mini, idx_m, args.new)

        s_m, out_m = timed(run_m, sync_m, args.reps)
        s_t, out_t = timed(run_t, sync_t, args.reps)
        gm, gt = to_numpy(out_m)[:, args.prompt:], out_t.cpu().numpy()[:, args.prompt:]
        agree = float((gm == gt).mean()) if gm.shape == gt.shape else float("nan")
        row = {"batch": B, "minipeft_s": s_m, "transformers_s": s_t, "minipeft_tokens_per_s": B * args.new / s_m,
               "transformers_tokens_per_s": B * args.new / s_t, "ratio": s_t / s_m, "token_agreement": agree,
               "minipeft_graph_s": None, "graph_tokens_per_s": None, "ratio_graph": None,
               "graph_token_agreement": None}
        graph = not no_graph and B <= MAX_ROWS  # the decoder's GEMV takes at most MAX_ROWS rows
        if graph:
            s_g, out_g = timed(run_g, sync_m, args.reps)
            gg = to_numpy(out_g)[:, args.prompt:]
            row.update(minipeft_graph_s=s_g, graph_tokens_per_s=B * args.new / s_g, ratio_graph=s_t / s_g,
                       graph_token_agreement=float((gg == gt).mean()) if gg.shape == gt.shape else float("nan"))
        res["rows"].append(row)
        print(f"batch {B}: minipeft {row['minipeft_tokens_per_s']:.0f} tok/s ({1e3 * s_m / args.new:.2f} ms/step), "
              f"transformers {row['transformers_tokens_per_s']:.0f} tok/s ({1e3 * s_t / args.new:.2f} ms/step), "
              f"ratio {row['ratio']:.3f}, tokens agree {agree:.3f}")
        if graph:
            print(f"batch {B}: minipeft CUDA graph {row['graph_tokens_per_s']:.0f} tok/s "
                  f"({1e3 * row['minipeft_graph_s'] / args.new:.2f} ms/step), ratio {row['ratio_graph']:.3f}, "
                  f"tokens agree {row['graph_token_agreement']:.3f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
