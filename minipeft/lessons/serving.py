"""Lesson: one base model, many adapters -- serving LoRA adapters in mixed batches.

``python -m minipeft.lessons.serving [--quick] [--device cuda] [--figures DIR] [--base tiny|T1|gpt2]
[--ns 1,4,16,64,256] [--batch 256] [--new-tokens 16] [--baselines-max-n 256] [--repeats 3]``

The course: fine-tune many low-rank adapters on one base model and, at inference, swap in
the A, B of each task -- "much cheaper than serving n different full-parameter fine-tuned
models" (LoRAX serves many adapters on one GPU this way). This lesson measures the claim
with :mod:`minipeft.serve`: a batch of requests, each naming its own adapter, runs the base
GEMM once and adds each row's ``s_i (x A_i^T) B_i^T`` (BGMV for decode, SGMV for prefill;
RawKernels on a GPU). It compares, as the number N of adapters grows:

* (a) the base model alone (the ceiling: no adapter work at all);
* the mixed batch (one server, every request its own adapter);
* (b) one merged model per adapter, served one at a time (swap the weights, run its requests);
* (c) looping over the adapters in sub-batches of one adapter each (peft's mixed-batch path).

Then memory: the base plus N adapters against N merged copies, for a float32 and an NF4
base. Last, requests that arrive over time (a Poisson schedule): continuous batching
(requests join and leave the batch at every decode step, adapters held in rank classes,
greedy or sampled with each request's own seed) against static batching, as throughput and
latency against the arrival rate (``serving_continuous.py``), each request's tokens under
shuffled arrival orders against ``generate`` alone, and peft's mixed batch in the model
(``PeftModel(idx, adapter_names=[...])``) against the server's logits. First, it checks that every request of a mixed batch gets exactly the tokens of its
adapter merged into the base and decoded alone, and that bad requests fail on their own.
``--base tiny`` is minipeft's pretrained model; a preset name (``T1``, ``gpt2`` ...) is a
randomly initialised model of that shape (serving cost does not depend on the weights).
Adapters are random LoRA weights written in peft's format (ranks 4/8/16, three targets).
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import numpy as np

from ..backend import DeviceMemoryTracker, to_numpy
from ..gpt import GPT, GPTConfig
from ..peft import LoraConfig, from_pretrained
from ..quant.modules import model_nbytes, quantize_model
from ..serve import LoraServer, Request, ServeConfig, greedy_batch, served_modules, slot_nbytes
from . import serving_continuous
from ._common import Report, finish, parse_args, save_figure

RANKS = (4, 8, 16)  # ranks of the random adapters, in turn
TARGETS = (["c_attn"], ["c_attn", "c_proj", "c_fc"])  # their target modules, in turn
MEMORY_NS = (1, 10, 100, 1000)  # adapters in the memory table
GPU_BYTES, LORAX_FRACTION = 80e9, 0.1  # an 80 GB GPU; LoRAX's default --adapter-memory-fraction
QUICK = dict(ns=(1, 4, 16), batch=16, new_tokens=4, repeats=1, fractions=(0.5, 2.0), max_batch=8)
FULL = dict(ns=(1, 4, 16, 64, 256), batch=256, new_tokens=16, repeats=3, fractions=(0.25, 0.5, 1.0, 2.0, 4.0),
            max_batch=32)


def write_random_adapter(directory: str, model: GPT, r: int, targets, rng, scale: float = 2.0) -> str:
    """A LoRA adapter with random A, B for ``model`` in peft's format (adapter_config.json + safetensors)."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for name, m in served_modules(model, targets):
        bound = 1 / np.sqrt(m.in_features)  # peft's Kaiming-uniform A
        tensors[f"base_model.model.{name}.lora_A.weight"] = rng.uniform(-bound, bound, (r, m.in_features))
        tensors[f"base_model.model.{name}.lora_B.weight"] = rng.normal(0, 0.05, (m.out_features, r))
    save_file({k: v.astype(np.float32) for k, v in tensors.items()},
              os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = LoraConfig(r=r, lora_alpha=scale * r, target_modules=list(targets), inference_mode=True).to_dict()
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    return directory


def _base(args) -> GPT:
    name = args.extra.base
    if name == "tiny":
        from .. import pretrained

        return pretrained.load("tiny", "english", device="cpu", quick=args.quick, progress=False)
    return GPT(GPTConfig.preset(name), seed=args.seed)


def _copy(state: dict, config, device: str) -> GPT:
    m = GPT(config, init_weights=False)
    m.load_state_dict(state)
    return m.to(device).eval()


def _prompts(n: int, vocab: int, rng) -> list:
    if vocab == 259:  # the byte tokenizer: short English prompts
        words = "the function returns a value if the argument is none and raises an error otherwise".split()
        return [np.frombuffer(" ".join(rng.choice(words, int(rng.integers(2, 6)))).encode(), np.uint8).astype(np.int64)
                for _ in range(n)]
    return [rng.integers(0, vocab, int(rng.integers(8, 33))) for _ in range(n)]


def _timed_mixed(server, reqs) -> dict:
    server.reset_stats()
    t0 = time.perf_counter()
    res = server.generate(reqs)
    wall = time.perf_counter() - t0
    s = server.stats
    assert all(r.ok for r in res), [r.error for r in res if not r.ok][:3]
    return dict(decode_tps=s["decode_tokens"] / s["decode_s"], latency_ms=1e3 * wall,
                e2e_tps=sum(len(r.tokens) for r in res) / wall, step_ms=1e3 * s["decode_s"] / _steps(reqs))


def _steps(reqs) -> int:
    return max(q.max_new_tokens for q in reqs) - 1


def _timed_base(model, reqs) -> dict:
    timing = {}
    t0 = time.perf_counter()
    out = greedy_batch(model, [q.prompt for q in reqs], reqs[0].max_new_tokens, timing=timing)
    wall = time.perf_counter() - t0
    return dict(decode_tps=timing["decode_tokens"] / timing["decode_s"], latency_ms=1e3 * wall,
                e2e_tps=out.size / wall, step_ms=1e3 * timing["decode_s"] / _steps(reqs))


def _groups(reqs) -> dict:
    g = {}
    for q in reqs:
        g.setdefault(q.adapter, []).append(q)
    return g


def _timed_subbatches(server, reqs) -> dict:
    """(c): one generate call per adapter; a request's latency is the end of its group's call."""
    server.reset_stats()
    t0, ends, n_tok = time.perf_counter(), [], 0
    for group in _groups(reqs).values():
        res = server.generate(group)
        n_tok += sum(len(r.tokens) for r in res)
        ends += [time.perf_counter() - t0] * len(group)
    wall = time.perf_counter() - t0
    s = server.stats
    return dict(decode_tps=s["decode_tokens"] / s["decode_s"], latency_ms=1e3 * float(np.mean(ends)),
                e2e_tps=n_tok / wall, step_ms=1e3 * s["decode_s"] / _steps(reqs))


def _timed_merged(model, state, paths, reqs) -> dict:
    """(b): for each adapter, swap in base weights + merged adapter, then run its requests."""
    t0, ends, n_tok, timing, swap = time.perf_counter(), [], 0, {}, 0.0
    for name, group in _groups(reqs).items():
        ts = time.perf_counter()
        model.load_state_dict(state)  # a full model's weights copied in: what swapping models costs
        merged = from_pretrained(model, paths[name]).merge_and_unload()
        swap += time.perf_counter() - ts
        out = greedy_batch(merged, [q.prompt for q in group], group[0].max_new_tokens, timing=timing)
        n_tok += out.size
        ends += [time.perf_counter() - t0] * len(group)
    wall = time.perf_counter() - t0
    return dict(decode_tps=timing["decode_tokens"] / timing["decode_s"], latency_ms=1e3 * float(np.mean(ends)),
                e2e_tps=n_tok / wall, step_ms=1e3 * timing["decode_s"] / _steps(reqs), swap_s=swap)


def check_mixed_batch(server, state, config, paths, prompts, device, n_new: int, bad_paths: dict) -> dict:
    """Each request of a mixed batch against its adapter merged into the base, decoded alone."""
    names = list(paths)[: max(1, len(prompts) - 3)]
    reqs = [Request(p, names[i % len(names)] if i % 4 != 1 else None, n_new) for i, p in enumerate(prompts)]
    for k, (name, path) in enumerate(bad_paths.items()):
        server.add_adapter(name, path)
        reqs.insert(2 * k + 1, Request(prompts[k], name, n_new))
    reqs.insert(3, Request(prompts[0], "no-such-adapter", n_new))
    res = server.generate(reqs)
    rows, same = [], 0
    for q, r in zip(reqs, res):
        if not r.ok:
            rows.append((q.adapter, "error", r.error[:90]))
            continue
        m = _copy(state, config, device)
        if q.adapter is not None:
            m = from_pretrained(m, paths[q.adapter]).merge_and_unload()
        want = to_numpy(m.generate(np.asarray(q.prompt)[None], n_new, greedy=True))[0, len(q.prompt):]
        same += bool(np.array_equal(r.tokens, want))
        rows.append((q.adapter or "(base)", "ok", "identical to merged + alone" if np.array_equal(r.tokens, want)
                     else f"DIFFERENT: {r.tokens.tolist()} vs {want.tolist()}"))
    for name in bad_paths:
        server.remove_adapter(name)
    n_ok = sum(r.ok for r in res)
    return dict(rows=rows, identical=same, served=n_ok, errors=len(res) - n_ok)


def memory_table(base: GPT, server: LoraServer, adapter_bytes: float) -> dict:
    """Bytes of base + N adapters against N merged copies, float32 and NF4 bases."""
    fp32 = model_nbytes(base)
    q = GPT(base.config, init_weights=False)
    q.load_state_dict({k: to_numpy(v) for k, v in base.state_dict().items()})
    quantize_model(q)
    nf4 = model_nbytes(q)
    rows = {}
    for n in MEMORY_NS:
        rows[n] = {"fp32 base + N adapters": fp32 + n * adapter_bytes,
                   "fp32 base + N padded slots": fp32 + n * server.slot_bytes,
                   "NF4 base + N adapters": nf4 + n * adapter_bytes,
                   "N merged fp32 copies": n * fp32}
    fit = int(LORAX_FRACTION * GPU_BYTES // server.slot_bytes)
    return dict(base_fp32=fp32, base_nf4=nf4, adapter_bytes=adapter_bytes, slot_bytes=server.slot_bytes,
                rows=rows, adapters_in_lorax_fraction=fit, merged_copies_in_gpu=int(GPU_BYTES // fp32))


def lru_demo(server, paths, prompts, n_new, batches: int, seed: int) -> dict:
    """A stream of batches whose adapters follow a Zipf law over N, through a pool of fewer slots."""
    rng = np.random.default_rng(seed)
    names = list(paths)
    p = 1.0 / np.arange(1, len(names) + 1)
    server.reset_stats()
    t0 = time.perf_counter()
    for _ in range(batches):
        picks = rng.choice(len(names), len(prompts), p=p / p.sum())
        server.generate([Request(pr, names[k], n_new) for pr, k in zip(prompts, picks)])
    s = dict(server.stats, wall_s=time.perf_counter() - t0)
    s["hit_rate"] = s["device_hits"] / max(1, s["device_hits"] + s["device_loads"])
    return s


def main(argv=None) -> dict:
    args = parse_args(argv, __doc__.split("\n")[0], _add_arguments)
    ex, dflt = args.extra, QUICK if args.quick else FULL
    ns = tuple(int(v) for v in ex.ns.split(",")) if ex.ns else dflt["ns"]
    B, n_new = ex.batch or dflt["batch"], ex.new_tokens or dflt["new_tokens"]
    repeats = ex.repeats or dflt["repeats"]
    base_max = ex.baselines_max_n if ex.baselines_max_n is not None else max(ns)
    rep = Report("One base model, many adapters: serving LoRA adapters in mixed batches"
                 + (" (quick mode)" if args.quick else ""))
    rng = np.random.default_rng(args.seed)
    base = _base(args)
    state = {k: to_numpy(v).copy() for k, v in base.state_dict().items()}
    cfg = base.config
    tmp = tempfile.TemporaryDirectory(prefix="minipeft_serving_")
    n_adapters = max(ns)
    paths = {f"a{i:03d}": write_random_adapter(os.path.join(tmp.name, f"a{i:03d}"), base, RANKS[i % 3],
                                               TARGETS[i % 2], rng) for i in range(n_adapters)}
    wide = GPT(GPTConfig.from_dict({**cfg.to_dict(), "n_embd": cfg.n_embd + 2 * cfg.n_head}), init_weights=False)
    bad = {"other-base": write_random_adapter(os.path.join(tmp.name, "other"), wide, 4, ["c_attn"], rng)}
    # graph_decode off: section 2 sets mixed batches against the base model decoded by the same Python loop
    sc = ServeConfig(max_rank=max(RANKS), device_budget_bytes=n_adapters * slot_nbytes(base, ServeConfig()),
                     graph_decode=False)
    with DeviceMemoryTracker(args.device) as mem:
        server = LoraServer(_copy(state, cfg, args.device), sc)
        for name, path in paths.items():
            server.add_adapter(name, path)
    rep.section("Setup")
    rep.table([("base model", f"{ex.base} ({cfg.n_layer} layers, d {cfg.n_embd}, vocab {cfg.vocab_size})"),
               ("device", args.device), ("adapters (ranks 4/8/16; c_attn or c_attn+c_proj+c_fc)", n_adapters),
               ("batch (requests) x new tokens", f"{B} x {n_new}"),
               ("device slots (r_max 16) / bytes per slot", f"{server.n_slots} / {server.slot_bytes:,}")],
              headers=("", "value"))

    rep.section("1. A mixed batch = each adapter merged into the base, decoded alone")
    chk = check_mixed_batch(server, state, cfg, paths, _prompts(8 if args.quick else 12, cfg.vocab_size, rng),
                            args.device, n_new, bad)
    rep.table(chk["rows"], headers=("adapter", "status", "tokens / error"))
    rep.text(f"\n{chk['identical']}/{chk['served']} served requests identical to their merged model decoded alone; "
             f"{chk['errors']} bad requests failed on their own.")

    rep.section("2. Throughput and latency as the number of adapters N grows")
    prompts = _prompts(B, cfg.vocab_size, rng)
    plain = _copy(state, cfg, args.device)
    base_reqs = [Request(p, None, n_new) for p in prompts]
    _timed_base(plain, base_reqs)  # warm-up (kernel compilation, allocator)
    methods = ("(a) base alone", "mixed", "(c) sub-batches", "(b) merged, one at a time")
    sweep = {m: [] for m in methods}
    for n in ns:
        reqs = [Request(p, f"a{j % n:03d}", n_new) for j, p in enumerate(prompts)]
        server.generate(reqs)  # warm-up: loads the adapters into their slots
        runs = {m: [] for m in methods}
        for _ in range(repeats):  # the methods take turns, so a busy machine slows them alike
            runs[methods[0]].append(_timed_base(plain, base_reqs))
            runs[methods[1]].append(_timed_mixed(server, reqs))
            if n <= base_max:
                runs[methods[2]].append(_timed_subbatches(server, reqs))
                runs[methods[3]].append(_timed_merged(plain, state, paths, reqs))
        for m, r in runs.items():
            if r:
                sweep[m].append({k: statistics.median(x[k] for x in r) for k in r[0]})
    plain.load_state_dict(state)
    rows = []
    for k, n in enumerate(ns):
        a = sweep[methods[0]][k]
        row = [n, f"{a['decode_tps']:,.0f}", f"{a['latency_ms']:,.0f}"]
        for m in methods[1:]:
            v = sweep[m][k] if k < len(sweep[m]) else None
            row += [f"{v['decode_tps']:,.0f} ({v['decode_tps'] / a['decode_tps']:.2f}x)" if v else "-",
                    f"{v['latency_ms']:,.0f}" if v else "-"]
        rows.append(row)
    rep.table(rows, headers=("N", "(a) tok/s", "ms", "mixed tok/s", "ms", "(c) tok/s", "ms", "(b) tok/s", "ms"))
    rep.text("tok/s: decode tokens per second (ratio to the base alone); ms: mean latency of a request, "
             "prefill and weight swaps included; median of %d interleaved runs." % repeats)
    ratio = [v["decode_tps"] / a["decode_tps"] for v, a in zip(sweep["mixed"], sweep[methods[0]])]
    extra_ms = 1e3 * B * (1 / sweep["mixed"][-1]["decode_tps"] - 1 / sweep[methods[0]][-1]["decode_tps"])
    rep.compare([("mixed batch vs base alone, decode throughput at N = %d" % ns[-1], ">= 0.8x (GPU target)",
                  f"{ratio[-1]:.2f}x"),
                 ("extra time per decode step for adapters (Punica: ~2 ms/token)", "~2 ms", f"{extra_ms:.2f} ms")])

    rep.section("3. Memory: the base + N adapters against N merged copies")
    mt = memory_table(base, server, server.memory()["host_bytes"] / max(1, server.memory()["host_adapters"]))
    heads = list(next(iter(mt["rows"].values())))
    rep.table([[n] + [f"{v / 2**20:,.1f}" for v in r.values()] for n, r in mt["rows"].items()],
              headers=["N"] + [h + " (MiB)" for h in heads])
    r100 = mt["rows"][100]
    saving = r100["N merged fp32 copies"] / r100["fp32 base + N adapters"]
    rep.compare([("N = 100: merged copies / (base + adapters)", "'much cheaper'", f"{saving:.1f}x"),
                 ("adapters of this shape in 10% of an 80 GB GPU (LoRAX default fraction)",
                  "S-LoRA: thousands", f"{mt['adapters_in_lorax_fraction']:,}"),
                 ("merged copies of this model in 80 GB", "-", f"{mt['merged_copies_in_gpu']:,}")])
    pool = server.memory()
    measured = {"device_pool_bytes": pool["device_pool_bytes"], "host_bytes": pool["host_bytes"],
                "tracked_device_bytes": mem.peak}
    rep.text(f"measured: {pool['n_slots']} slots hold {pool['device_pool_bytes'] / 2**20:,.1f} MiB on the "
             f"device{f' (CuPy pool peak {mem.peak / 2**20:,.1f} MiB with the base)' if mem.peak else ''}; the "
             f"host pool holds {pool['host_adapters']} adapters in {pool['host_bytes'] / 2**20:,.1f} MiB.")

    rep.section("4. More adapters than device slots: least-recently-used eviction")
    k_slots = max(2, n_adapters // 4)
    small = LoraServer(_copy(state, cfg, args.device),
                       ServeConfig(device_budget_bytes=k_slots * server.slot_bytes, graph_decode=False))
    for name, path in paths.items():
        small.add_adapter(name, path)
    lru = lru_demo(small, paths, prompts[: max(4, B // 4)], n_new, ex.lru_batches or (3 if args.quick else 8),
                   args.seed)
    rep.table([("adapters / device slots", f"{n_adapters} / {small.n_slots}"),
               ("device hit rate (Zipf traffic)", f"{lru['hit_rate']:.2f}"),
               ("loads into slots / evictions", f"{lru['device_loads']} / {lru['device_evictions']}"),
               ("waves (batches split by the slot limit)", lru["waves"]),
               ("time swapping adapters / total", f"{lru['swap_s']:.3f} s / {lru['wall_s']:.3f} s")],
              headers=("", "minipeft"))

    rep.section("5. Requests arriving over time: continuous against static batching")
    cont = _continuous(args, state, cfg, paths, prompts, n_new, dflt, rep)

    from .figures.serving import serving_memory, serving_throughput

    tput = {m: [v["decode_tps"] for v in vals] for m, vals in sweep.items() if m != methods[0]}
    lat = {m: [v["latency_ms"] for v in vals] for m, vals in sweep.items() if m != methods[0]}
    a = {k: statistics.median(v[k] for v in sweep[methods[0]]) for k in ("decode_tps", "latency_ms")}
    for fig, name in ((serving_throughput(list(ns), tput, a["decode_tps"], lat, a["latency_ms"],
                                          title=f"{ex.base} on {args.device}, batch {B}"), "serving_throughput"),
                      (serving_memory(list(MEMORY_NS), {h: [mt["rows"][n][h] for n in MEMORY_NS] for h in heads},
                                      title=f"{ex.base}: memory of N adapters"), "serving_memory")):
        path = save_figure(fig, args, name)
        if path:
            rep.text(f"figure: {path}")
    path = save_figure(serving_continuous.figure(cont["sweep"], f"{ex.base} on {args.device}: continuous vs static "
                                                 f"batching, max batch {dflt['max_batch']}"), args, "serving_arrivals")
    if path:
        rep.text(f"figure: {path}")
    tmp.cleanup()
    return finish({"device": args.device, "base": ex.base, "ns": list(ns), "batch": B, "new_tokens": n_new,
                   "check": {k: v for k, v in chk.items() if k != "rows"}, "sweep": sweep,
                   "ratio_mixed_vs_base": ratio, "extra_step_ms": extra_ms, "memory": mt, "measured_memory": measured,
                   "lru": lru, "continuous": cont}, args, report=rep, lesson="serving")


def _continuous(args, state, cfg, paths, prompts, n_new: int, dflt: dict, rep) -> dict:
    """Section 5: rank classes, exact tokens under shuffled arrivals, throughput against the arrival rate."""
    rng = np.random.default_rng(args.seed + 5)
    per16 = slot_nbytes(_copy(state, cfg, "cpu"), ServeConfig(max_rank=max(RANKS)))
    sc = ServeConfig(rank_classes=RANKS, device_budget_bytes=(len(paths) + len(RANKS)) * per16)
    server = LoraServer(_copy(state, cfg, args.device), sc)
    for name, path in paths.items():
        server.add_adapter(name, path)
    names = [None] + list(paths)[:16]
    padded = sum(per16 for _ in paths)
    held = sum(slot_nbytes(server.model, sc, server.classes.ranks[server.class_of(n)]) for n in paths)
    chk = serving_continuous.check_exact(server, lambda: _copy(state, cfg, args.device), paths,
                                         serving_continuous.workload(prompts[:6 if args.quick else 12], names, n_new,
                                                                     rng, sample=True), rng)
    mixed = serving_continuous.check_mixed_logits(server, lambda: _copy(state, cfg, args.device), paths,
                                                  prompts[:8], args.device)
    reqs = serving_continuous.workload(prompts[:dflt["batch"] if args.quick else 96], names, n_new, rng)
    sweep = serving_continuous.rate_sweep(server, reqs, dflt["fractions"], dflt["max_batch"], rng)
    rep.table([("adapter slots: ranks padded to r_max / rank classes " + "/".join(map(str, RANKS)),
                f"{padded / 2**20:,.2f} MiB / {held / 2**20:,.2f} MiB"),
               ("tokens equal to generate alone, shuffled arrivals (%d of them sampled)" % chk["sampled"],
                f"{chk['identical']} / {chk['total']}"),
               ("PeftModel(idx, adapter_names=...) vs the server, %d rows: max |diff| / max |logit|" % mixed["rows"],
                f"{mixed['rel_diff']:.1e}"),
               ("capacity (all requests at once)", f"{sweep['capacity_rps']:,.1f} req/s, "
                                                   f"{sweep['capacity_tps']:,.0f} tok/s")], headers=("", "minipeft"))
    rep.table([(f"{r['fraction']:g}x = {r['rate']:,.1f}", f"{r['continuous_tps']:,.0f}",
                f"{1e3 * r['continuous_latency_s']:,.0f}", f"{r['mean_batch']:.1f}", f"{r['static_tps']:,.0f}",
                f"{1e3 * r['static_latency_s']:,.0f}") for r in sweep["rows"]],
              headers=("arrival rate (req/s)", "continuous tok/s", "ms", "mean batch", "static tok/s", "ms"))
    last = sweep["rows"][-1]
    rep.compare([("continuous / static batching throughput at the highest rate", "Orca, S-LoRA: higher",
                  f"{last['continuous_tps'] / last['static_tps']:.2f}x"),
                 ("tokens of each request = generate alone, any arrival order", "identical",
                  f"{chk['identical']}/{chk['total']}")])
    return dict(check=chk, mixed_logits=mixed, sweep=sweep, slot_bytes_padded=padded, slot_bytes_classes=held)


def _add_arguments(p):
    p.add_argument("--base", default="tiny", help="'tiny' (pretrained) or a GPT preset (T1, gpt2 ...: random init)")
    p.add_argument("--ns", default=None, help="comma-separated numbers of adapters (default 1,4,16,64,256)")
    p.add_argument("--batch", type=int, default=None, help="requests per batch (default 256; quick 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per request (default 16)")
    p.add_argument("--baselines-max-n", type=int, default=None, help="run (b) and (c) only up to this N")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per point, median (default 3)")
    p.add_argument("--lru-batches", type=int, default=None, help="batches of the LRU demo (default 8; quick 3)")


if __name__ == "__main__":
    main()
