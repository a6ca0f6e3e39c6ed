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

``--rows server`` (or ``plain,server``) measures many adapters on one base instead: three LoRA
adapters (ranks 4, 8, 16 on ``c_attn``, ``c_proj``, ``c_fc``) mixed in one batch, each row
with its own adapter or none (Punica's mixed batch), greedy, ``--new`` tokens per row.
minipeft's ``LoraServer.generate`` runs it with the decode step in a CUDA graph
(``serve_graph.py``; ``server_graph_*`` keys) and with the Python loop (``graph_decode=False``,
``server_loop_*``); the peer is peft's mixed-adapter batch, ``PeftModel.generate(...,
adapter_names=[...])`` on ``transformers``' GPT-2, with the same adapters read from the same
files. ``*_ms_per_token`` is a call's time over ``--new`` (one step of every row), ``ratio`` peft's
time over the graph path's (``ratio_loop``: over the loop's); the agreements are fractions of
equal generated tokens (float32 on every side). The graph decodes 8 rows at a time, so its time
grows with the batch past 8 rows (``ServeConfig.graph_max_rows``: larger waves run the loop; the
benchmark lifts that cap to time the graph at every batch). Each side's warm-up call generates 8
tokens (it compiles, fills caches and captures the graph, once per row count); the timed calls
generate ``--new``. JSON rows carry ``kind``: ``plain`` or ``server``.

    python benchmarks/generate.py --device cuda
    python benchmarks/generate.py --device cuda --batch 8 --new 128 --json gen.json
    python benchmarks/generate.py --device cuda --rows server --json gen_server.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minipeft.backend import to_numpy  # noqa: E402
from minipeft.decoding.graph import MAX_ROWS, generate_graph, graph_decodable  # noqa: E402
from minipeft.gpt import GPT, GPTConfig  # noqa: E402
from minipeft.peft import LoraConfig, get_peft_model, save_adapter  # noqa: E402
from minipeft.serve import LoraServer, Request, ServeConfig  # noqa: E402

_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
ADAPTERS = {"a4": 4, "a8": 8, "a16": 16}  # the server rows' adapters: name -> rank (alpha = 2 r)
MIX = ["a4", "a8", None, "a16", "a4", "a8", "a16", None]  # row b of a server batch uses MIX[b % 8] (None: base)
WARM = 8  # tokens of the server rows' warm-up calls


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    ap.add_argument("--config", default="gpt2", help="GPTConfig preset (default gpt2)")
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    ap.add_argument("--new", type=int, default=128, help="generated tokens (default 128)")
    ap.add_argument("--reps", type=int, default=3, help="timed calls per side (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", default="plain", help="comma-separated: plain (one model), server (many adapters)")
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


def timed(f, sync, reps, warm=None):
    """Median seconds of ``reps`` calls of ``f`` and the last result, after a warm-up call (``warm``, else ``f``)."""
    (warm or f)()
    sync()
    ts, out = [], None
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        out = f()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def save_adapters(cfg: GPTConfig, root: str, seed: int) -> dict:
    """The server rows' adapters in peft's format (minipeft writes them; peft and the server read them)."""
    rng = np.random.default_rng(seed + 2)
    pm = None
    for name, r in ADAPTERS.items():
        lc = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["c_attn", "c_proj", "c_fc"])
        if pm is None:
            pm = get_peft_model(GPT(cfg, init_weights=False), lc, adapter_name=name)
        else:
            pm.add_adapter(name, lc)
    for n, p in pm.named_parameters():  # B = 0 at init: give every factor the scale of the base's weights
        if ".lora_A." in n or ".lora_B." in n:
            p.data = (0.02 * rng.standard_normal(p.shape)).astype(p.dtype)
    return {name: save_adapter(pm, root, name) for name in ADAPTERS}


def server_rows(args, torch, cfg, state, sync_m, sync_t, res) -> None:
    """Mixed-adapter batches: minipeft's LoraServer (CUDA graph, Python loop) against peft's adapter_names."""
    import peft

    with tempfile.TemporaryDirectory() as root:
        paths = save_adapters(cfg, root, args.seed)
        mini = GPT(cfg, init_weights=False)
        mini.load_state_dict(state)
        batches = [int(b) for b in args.batch.split(",")]
        server = LoraServer(mini.to(args.device).eval(), ServeConfig(max_rank=max(ADAPTERS.values()),
                                                                     graph_max_rows=max(batches)))  # graph at any B
        for name, path in paths.items():
            server.add_adapter(name, path, load=True)
        names = list(paths)
        pt = peft.PeftModel.from_pretrained(hf_model(torch, cfg, state, args.device), paths[names[0]],
                                            adapter_name=names[0])
        for name in names[1:]:
            pt.load_adapter(paths[name], adapter_name=name)
        pt.eval()
    no_graph = server.graph_decodable()
    if no_graph:
        print(f"server: CUDA-graph decoding skipped: {no_graph}")
    rng = np.random.default_rng(args.seed + 3)
    for B in batches:
        prompt = rng.integers(0, cfg.vocab_size, size=(B, args.prompt)).astype(np.int64)
        rows = [MIX[(b + 1) % len(MIX)] if B == 1 else MIX[b % len(MIX)] for b in range(B)]  # batch 1: a8
        idx_t = torch.from_numpy(prompt).to(args.device)
        mask_t = torch.ones_like(idx_t)

        def run_server(graph: bool, n: int = args.new):
            server.config.graph_decode = graph
            out = server.generate([Request(prompt[b], rows[b], n) for b in range(B)])
            assert all(r.ok for r in out), [r.error for r in out]
            return np.stack([r.tokens for r in out])  # (B, n), host

        def run_peft(n: int = args.new):
            with torch.no_grad():
                return pt.generate(input_ids=idx_t, attention_mask=mask_t, max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, num_beams=1, pad_token_id=0, use_cache=True,
                                   adapter_names=[a or "__base__" for a in rows])

        # the warm-up calls generate WARM tokens: enough to compile, cache and capture (the graph is captured
        # once per row count, whatever the number of tokens); the timed calls generate --new
        s_l, out_l = timed(lambda: run_server(False), sync_m, args.reps, lambda: run_server(False, WARM))
        s_p, out_p = timed(run_peft, sync_t, args.reps, lambda: run_peft(WARM))
        gp = out_p.cpu().numpy()[:, args.prompt:]
        row = {"kind": "server", "batch": B, "adapters": [n or "base" for n in rows],
               "server_loop_s": s_l, "server_loop_ms_per_token": 1e3 * s_l / args.new,
               "server_loop_tokens_per_s": B * args.new / s_l, "peft_s": s_p, "peft_ms_per_token": 1e3 * s_p / args.new,
               "peft_tokens_per_s": B * args.new / s_p, "ratio_loop": s_p / s_l,
               "loop_token_agreement": float((out_l == gp).mean()) if out_l.shape == gp.shape else float("nan"),
               "server_graph_s": None, "server_graph_ms_per_token": None, "server_graph_tokens_per_s": None,
               "ratio": None,
               "token_agreement": None, "graph_loop_agreement": None, "graph_speedup_over_loop": None}
        if not no_graph:
            s_g, out_g = timed(lambda: run_server(True), sync_m, args.reps, lambda: run_server(True, WARM))
            row.update(server_graph_s=s_g, server_graph_ms_per_token=1e3 * s_g / args.new,
                       server_graph_tokens_per_s=B * args.new / s_g, ratio=s_p / s_g,
                       token_agreement=float((out_g == gp).mean()) if out_g.shape == gp.shape else float("nan"),
                       graph_loop_agreement=float((out_g == out_l).mean()), graph_speedup_over_loop=s_l / s_g)
        server.config.graph_decode = True
        res["rows"].append(row)
        print(f"server batch {B} {row['adapters']}: loop {row['server_loop_ms_per_token']:.2f} ms/token, "
              f"peft {row['peft_ms_per_token']:.2f} ms/token, ratio_loop {row['ratio_loop']:.3f}, "
              f"tokens agree {row['loop_token_agreement']:.3f}")
        if not no_graph:
            print(f"server batch {B}: CUDA graph {row['server_graph_ms_per_token']:.2f} ms/token, ratio "
                  f"{row['ratio']:.3f} (peft / graph), tokens agree with peft {row['token_agreement']:.3f}, "
                  f"with the loop {row['graph_loop_agreement']:.3f}, {row['graph_speedup_over_loop']:.2f}x the loop")


def main(argv=None):
    args = parse_args(argv)
    kinds = [k.strip() for k in args.rows.split(",") if k.strip()]
    if not kinds or set(kinds) - {"plain", "server"}:
        raise SystemExit(f"--rows takes plain and/or server, got {args.rows!r}")
    import torch
    import transformers

    cfg = GPTConfig.preset(args.config, dropout=0.0)
    mini = GPT(cfg, seed=args.seed)
    state = {k: to_numpy(v) for k, v in mini.state_dict().items()}
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
    if "server" in kinds:
        import peft

        res["peft"] = peft.__version__
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}))
    if "plain" in kinds:
        plain_rows(args, torch, cfg, mini, state, xp, sync_m, sync_t, res)
    if "server" in kinds:
        del mini
        server_rows(args, torch, cfg, state, sync_m, sync_t, res)
    if args.json_out:
        from minipeft.atomic import write_text_atomic        # a killed run leaves the old file whole
        write_text_atomic(args.json_out, json.dumps(res, indent=1))
    return res


def plain_rows(args, torch, cfg, mini, state, xp, sync_m, sync_t, res) -> None:
    """One model: minipeft's GPT.generate (and its CUDA-graph decoder) against transformers' generate."""
    mini.to(args.device).eval()
    tm = hf_model(torch, cfg, state, args.device)
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
        row = {"kind": "plain", "batch": B, "minipeft_s": s_m, "transformers_s": s_t,
               "minipeft_tokens_per_s": B * args.new / s_m, "transformers_tokens_per_s": B * args.new / s_t,
               "ratio": s_t / s_m, "token_agreement": agree,
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


if __name__ == "__main__":
    main()
