"""The serving lesson's continuous-batching part: throughput against arrival rate, and exactness.

Requests arrive as a Poisson process (rate lambda requests per second) and ask for
different numbers of tokens. Two ways of batching them on one ``LoraServer``:

* **continuous** (Orca's iteration-level scheduling, S-LoRA, LoRAX;
  :func:`minipeft.serve_scheduler.serve`): a request joins at the next decode step and
  leaves when it is done;
* **static** (request-level scheduling, Orca's baseline): when the server is free it takes
  every request that has arrived (up to the batch size) and runs that batch until its
  longest request is done; newcomers wait for the whole batch.

Time is simulated from measured compute (``serve_scheduler``'s clock): the server never
sleeps, the clock jumps to the next arrival when it is idle. Then the tokens of requests
served in a shuffled arrival order, with sampling, are compared with each request decoded
alone by ``generate``, and the server's logits with peft's mixed batch in the model itself
(``PeftModel(idx, adapter_names=[...])``).
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from ..backend import synchronize, to_numpy
from ..peft import from_pretrained
from ..serve import Request
from ..serve_scheduler import poisson_arrivals, serve


def workload(prompts, names, n_new: int, rng, sample: bool = False) -> list:
    """Requests over ``names`` (None: the base), 1..2 n_new tokens each; every other one sampled if ``sample``."""
    out = []
    for j, p in enumerate(prompts):
        kw = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.95, seed=j) if sample and j % 2 else {}
        out.append(Request(p, names[j % len(names)], int(rng.integers(1, 2 * n_new + 1)), **kw))
    return out


def static_batching(server, requests, max_batch_size: int) -> dict:
    """Request-level scheduling: take the arrived requests (FIFO, up to the batch size), run them all to the end."""
    arrival = np.array([q.arrival for q in requests])
    pending = sorted(range(len(requests)), key=lambda i: (arrival[i], i))
    finish, now, tokens, device = np.zeros(len(requests)), 0.0, 0, _device(server)
    while pending:
        now = max(now, arrival[pending[0]])
        batch = [i for i in pending if arrival[i] <= now][:max_batch_size]
        pending = [i for i in pending if i not in batch]
        t0 = time.perf_counter()
        res = server.generate([requests[i] for i in batch])
        synchronize(device)
        now += time.perf_counter() - t0
        finish[batch] = now
        tokens += sum(len(r.tokens) for r in res)
    makespan = finish.max() - arrival.min()
    return dict(tps=tokens / makespan, latency_s=float(np.mean(finish - arrival)), makespan_s=float(makespan))


def _device(server) -> str:
    return "cpu" if isinstance(server.model.transformer.wte.weight.data, np.ndarray) else "cuda"


def rate_sweep(server, requests, fractions, max_batch_size: int, rng) -> dict:
    """Throughput and mean latency of continuous and static batching against the arrival rate.

    The rates are ``fractions`` of the server's capacity, measured first: the requests per
    second of continuous batching when every request is there at once.
    """
    at_once = [dataclasses.replace(q, arrival=0.0) for q in requests]
    serve(server, at_once[:max_batch_size], max_batch_size)  # warm-up
    cap = serve(server, at_once, max_batch_size)
    capacity = len(requests) / cap.makespan  # requests per second
    rows = []
    for f in fractions:
        t = poisson_arrivals(f * capacity, len(requests), rng)
        timed = [dataclasses.replace(q, arrival=float(a)) for q, a in zip(requests, t)]
        cont = serve(server, timed, max_batch_size)
        static = static_batching(server, timed, max_batch_size)
        rows.append(dict(fraction=f, rate=f * capacity, continuous_tps=cont.throughput,
                         continuous_latency_s=float(cont.latency.mean()), static_tps=static["tps"],
                         static_latency_s=static["latency_s"], mean_batch=float(np.mean(cont.batch_sizes))))
    return dict(capacity_rps=capacity, capacity_tps=cap.throughput, rows=rows)


def check_exact(server, make_model, paths, requests, rng, schedules: int = 2) -> dict:
    """Serve ``requests`` under shuffled arrival schedules; count tokens equal to ``generate`` alone."""
    want = []
    for q in requests:
        m = make_model() if q.adapter is None else from_pretrained(make_model(), paths[q.adapter])
        p = np.asarray(q.prompt)
        want.append(to_numpy(m.generate(p[None], q.max_new_tokens, greedy=not q.do_sample, temperature=q.temperature,
                                        top_k=q.top_k, top_p=q.top_p, seed=q.seed))[0, len(p):])
    same = 0
    for _ in range(schedules):
        times = rng.permutation(len(requests)).astype(float)  # one arrival per step, in a shuffled order
        rep = serve(server, [dataclasses.replace(q, arrival=t) for q, t in zip(requests, times)], 4, step_time=1.0)
        same += sum(bool(r.ok and np.array_equal(r.tokens, w)) for r, w in zip(rep.results, want))
    return dict(identical=same, total=schedules * len(requests), sampled=sum(q.do_sample for q in requests))


def check_mixed_logits(server, make_model, paths, prompts, device: str) -> dict:
    """``PeftModel(idx, adapter_names=...)`` (peft's mixed batch) against the server's logits, same batch."""
    from ..peft import load_adapter

    names = list(paths)[:3]
    pm = from_pretrained(make_model(), paths[names[0]], adapter_name=names[0])
    for n in names[1:]:
        load_adapter(pm, paths[n], n)
    T = min(len(p) for p in prompts)
    idx = np.stack([np.asarray(p)[:T] for p in prompts])  # (B, T)
    rows = [(names + ["__base__"])[k % (len(names) + 1)] for k in range(len(prompts))]
    want = to_numpy(pm.eval()(idx, adapter_names=rows).logits.data)
    got = to_numpy(server.forward(idx, rows).data)
    return dict(rel_diff=float(np.abs(got - want).max() / np.abs(want).max()), adapters=names, rows=len(rows))


def figure(sweep: dict, title: str = ""):
    """Generated tokens/s (left) and mean request latency (right) against the arrival rate."""
    import matplotlib.pyplot as plt

    rate = [r["rate"] for r in sweep["rows"]]
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.0))
    for ax, key, ylabel in ((axes[0], "tps", "generated tokens / s"), (axes[1], "latency_s", "mean latency (s)")):
        ax.grid(True, alpha=0.3)
        for k, how in enumerate(("continuous", "static")):
            ax.plot(rate, [r[f"{how}_{key}"] for r in sweep["rows"]], "o-", color=f"C{k}", lw=1.6,
                    label=f"{how} batching")
        ax.axvline(sweep["capacity_rps"], ls="--", color="gray", lw=1.0, label="capacity (all at once)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arrival rate (requests / s, Poisson)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


__all__ = ["workload", "static_batching", "rate_sweep", "check_exact", "check_mixed_logits", "figure"]
