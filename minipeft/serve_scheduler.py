"""Continuous batching for a ``LoraServer``: requests join and leave the batch at every decode step.

Orca (Yu et al. 2022, OSDI, "iteration-level scheduling") schedules a batch one decode
step at a time instead of one request set at a time: a request that arrives joins at the
next step (its prompt is prefilled and its key/value cache appended to the batch's), and a
request that is done (``max_new_tokens``, or ``eos``) leaves at once, so no row idles
waiting for the longest request of its batch. S-LoRA (Sheng et al. 2023, arXiv 2311.03285)
and LoRAX do this with many adapters: each row names its own adapter (BGMV/SGMV on the
resident stacks), adapters are loaded into device slots as requests need them, and a
request waits while its adapter finds no free slot (first come, first served).

Each request samples on its own: greedy, or temperature, top-k and top-p with its own
random stream (``Request.seed``), one uniform number per token. A row's logits do not
depend on the other rows (padding is masked, positions count a row's own tokens), so a
request gets exactly the tokens ``generate`` gives it alone, whatever arrives with it
(``tests/test_serve_scheduler.py`` shuffles the arrival schedule to check this).

The clock: ``Request.arrival`` is in the units of the clock; ``step_time=None`` advances
it by each step's measured wall time (a simulation of a server under that arrival
schedule, without sleeping when idle: the clock jumps to the next arrival), a number makes
every step take that long (deterministic, for tests). :func:`poisson_arrivals` draws a
Poisson arrival schedule.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from . import decoding
from .backend import synchronize, to_numpy, xp_of
from .serve import LoraServer, Request, Result


def poisson_arrivals(rate: float, n: int, rng: np.random.Generator, start: float = 0.0) -> np.ndarray:
    """``n`` arrival times of a Poisson process of ``rate`` requests per unit time (exponential gaps)."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests per unit time, got {rate!r}")
    return start + np.cumsum(rng.exponential(1.0 / rate, n))


@dataclass
class ServeReport:
    """What :func:`serve` did: one result per request, and when each arrived, started and finished."""

    results: list  # Result per request, in the order given
    arrival: np.ndarray  # (N,) clock times
    first_token: np.ndarray  # (N,) when its first token was chosen (nan: not served)
    finish: np.ndarray  # (N,) when its last token was chosen (nan: not served)
    steps: int = 0  # decode iterations run
    batch_sizes: list = field(default_factory=list)  # rows in the batch at each iteration

    @property
    def tokens(self) -> int:
        return int(sum(len(r.tokens) for r in self.results if r.ok))

    @property
    def makespan(self) -> float:
        """From the first arrival to the last finish."""
        served = np.isfinite(self.finish)
        return float(self.finish[served].max() - self.arrival.min()) if served.any() else 0.0

    @property
    def throughput(self) -> float:
        """Generated tokens per unit of clock time over the makespan."""
        return self.tokens / self.makespan if self.makespan > 0 else 0.0

    @property
    def latency(self) -> np.ndarray:
        """(N,) finish - arrival of each served request."""
        return (self.finish - self.arrival)[np.isfinite(self.finish)]


class _Rows:
    """The running rows: request index, adapter slot, tokens so far, random stream, sampling settings."""

    def __init__(self) -> None:
        self.req, self.slot, self.out, self.rng = [], [], [], []

    def __len__(self) -> int:
        return len(self.req)

    def add(self, i: int, slot: int, seed) -> None:
        self.req.append(i)
        self.slot.append(slot)
        self.out.append([])
        self.rng.append(np.random.default_rng(seed))

    def keep(self, rows) -> None:
        for name in ("req", "slot", "out", "rng"):
            setattr(self, name, [getattr(self, name)[k] for k in rows])


def choose_tokens(logits, requests: list, rngs: list) -> np.ndarray:
    """Each row's next token (R,) from ``logits`` (R, V): argmax, or a sample with the row's own settings and rng."""
    z = to_numpy(logits).astype(np.float64)  # (R, V)
    nxt = z.argmax(axis=-1)
    sample = [k for k, q in enumerate(requests) if q.do_sample]
    if sample:
        qs = [requests[k] for k in sample]
        u = np.array([rngs[k].random() for k in sample])  # one uniform per sampled row and token
        top_k = np.array([q.top_k or 0 for q in qs])
        top_p = np.array([q.top_p or 1.0 for q in qs])
        nxt[sample] = decoding.sample_rows(z[sample], np.array([q.temperature for q in qs]), top_k,
                                           top_p if (top_p < 1).any() else None, u)
    return nxt


def serve(server: LoraServer, requests: list, max_batch_size: int = 32, eos_token_id: int | None = None,
          step_time: float | None = None) -> ServeReport:
    """Run ``requests`` (each with its ``arrival`` time) through ``server`` with continuous batching.

    At every step: requests that have arrived join (up to ``max_batch_size`` rows, while
    their adapters find device slots), every row chooses its next token, finished rows
    leave, and the rest run one decode step together. Bad requests (unknown adapter,
    prompt too long ...) get their error and never join.
    """
    if not all(isinstance(r, Request) for r in requests):
        raise TypeError("serve takes a list of Request(prompt, adapter, max_new_tokens, ..., arrival=...)")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, (int, np.integer)) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
    if step_time is not None and not step_time > 0:
        raise ValueError(f"step_time must be None (measured) or > 0, got {step_time!r}")
    n = len(requests)
    results: list = [None] * n
    arrival = np.array([float(q.arrival) for q in requests])
    first, finish = np.full(n, np.nan), np.full(n, np.nan)
    prompts = {}
    for i, q in enumerate(requests):
        try:
            prompts[i] = server._check_request(q)
        except ValueError as e:  # AdapterError included
            results[i] = Result(error=str(e))
    pending = deque(sorted(prompts, key=lambda i: (arrival[i], i)))
    model, xp = server.model, xp_of(server.model.transformer.wte.weight.data)
    target, device = decoding.resolve_model(model), "cpu" if xp is np else "cuda"
    report = ServeReport(results, arrival, first, finish)
    rows, session, logits, now = _Rows(), None, None, 0.0
    with decoding.inference(model):
        try:
            while pending or len(rows):
                if not len(rows) and arrival[pending[0]] > now:
                    now = float(arrival[pending[0]])  # idle: the clock jumps to the next arrival
                t0 = time.perf_counter()
                admit = _admit(server, requests, pending, rows, arrival, now, max_batch_size)
                if admit:  # the newcomers' prompts run, then their rows join the batch
                    new, new_logits = _prefill(server, target, requests, prompts, admit, rows)
                    if session is None:
                        session, logits = new, new_logits
                    else:
                        session.join(new)
                        logits = xp.concatenate([logits, new_logits])  # (R + R', V)
                nxt = choose_tokens(logits, [requests[i] for i in rows.req], rows.rng)  # (R,)
                report.steps += 1
                report.batch_sizes.append(len(rows))
                if step_time is None:
                    synchronize(device)
                now += step_time if step_time is not None else time.perf_counter() - t0
                stay = []
                for k, (i, tok) in enumerate(zip(rows.req, nxt.tolist())):
                    rows.out[k].append(tok)
                    if len(rows.out[k]) == 1:
                        first[i] = now
                    if len(rows.out[k]) == requests[i].max_new_tokens or tok == eos_token_id:
                        finish[i], results[i] = now, Result(tokens=np.array(rows.out[k], np.int64))
                    else:
                        stay.append(k)
                if len(stay) < len(rows):  # finished rows leave the batch, and their cache with them
                    rows.keep(stay)
                    if not stay:
                        session = logits = None
                        continue
                    session.select(stay)
                    session.compact()
                    nxt = nxt[stay]
                t0 = time.perf_counter()
                server._ctx.set(np.array(rows.slot), xp)
                logits = session.step(xp.asarray(nxt))  # (R, V): one decode step for every running row
                if step_time is None:
                    synchronize(device)
                    now += time.perf_counter() - t0
        finally:
            server._ctx.clear()
    return report


def _prefill(server, target, requests, prompts, admit: list, rows: _Rows):
    """Run the prompts of ``admit`` (grouped by adapter slot: SGMV segments); their Session and logits (R', V)."""
    slot_of = server._make_resident([requests[i].adapter for i in admit if requests[i].adapter],
                                    keep=_in_use(requests, rows))
    admit.sort(key=lambda i: slot_of.get(requests[i].adapter, -1))
    slots = [slot_of.get(requests[i].adapter, -1) for i in admit]
    server._ctx.set(np.array(slots), target.xp)
    new = decoding.Session(target, *decoding.left_pad([prompts[i] for i in admit]))
    logits = new.start()
    for i, slot in zip(admit, slots):
        rows.add(i, slot, requests[i].seed)
    return new, logits


def _in_use(requests, rows) -> set:
    """The adapters of the running rows (they keep their slots)."""
    return {requests[i].adapter for i in rows.req if requests[i].adapter is not None}


def _admit(server, requests, pending, rows, arrival, now, max_batch_size) -> list:
    """Arrived requests that join now, first come first served: batch rows and adapter slots permitting."""
    admit = []
    in_use = _in_use(requests, rows)
    while pending and arrival[pending[0]] <= now and len(rows) + len(admit) < max_batch_size:
        name = requests[pending[0]].adapter
        if name is not None and name not in in_use:
            if not server.can_hold(in_use | {name}):
                break  # its adapter waits for a slot of its class to free up (head of the line waits too)
            in_use.add(name)
        admit.append(pending.popleft())
    return admit


__all__ = ["serve", "ServeReport", "poisson_arrivals", "choose_tokens"]
