"""One base model, many LoRA adapters: batched multi-adapter inference.

LoRA (Hu et al. 2021, arXiv 2106.09685, eq. 3) served unmerged, one adapter per request::

    h_m = W0 x_m + b + s_i B_i A_i x_m        request m names adapter i, s_i = alpha_i / r_i

Punica (Chen et al. 2023, arXiv 2310.18547, Sec. 4) batches requests of different
adapters: the base GEMM ``x W0^T`` runs once for the whole batch, and only the LoRA part is
gathered per row: BGMV for decode (one token per request), SGMV for the prefill (each
adapter's rows contiguous). S-LoRA (Sheng et al. 2023, arXiv 2311.03285, Sec. 4) keeps
every adapter in host memory and only the active ones on the GPU. The semantics are
``shared/reference/peft-format.md`` section 8.

:class:`LoraServer` wraps each served Linear of a GPT (``c_attn``, ``c_proj``, ``c_fc``
by default, full precision or 4-bit) in a :class:`~minipeft.serve_layers.MultiLoraLinear`
holding the stacks of the resident adapters, one stack per rank class (``rank_classes``;
by default one class, every rank padded with zeros to ``r_max``: zero rows of A and zero
columns of B change nothing)::

    lora_A[c] (n_c, r_c, in)    lora_B[c] (n_c, out, r_c)    scales[c] (n_c,)

A device budget sets the slots (split evenly between the classes); resident adapters are
kept least-recently-used first and evicted when a batch needs a slot of their class, the
host pool holds the rest (optionally within a budget too, re-reading evicted ones from
disk). ``generate`` runs greedy decoding for a static batch in which every request names
its own adapter or none; a request naming an unknown adapter, or one that cannot serve
this base, gets its own error and the others run. On a GPU, with one rank class and a float32
base, a wave's decode step runs in a CUDA graph, BGMV included (``serve_graph.py``; groups of
at most 8 rows, waves of up to ``ServeConfig.graph_max_rows``; ``graph_decodable()`` says why a
server cannot, ``graph_decode=False`` turns it off), with the tokens of the Python loop.
``serve_scheduler.serve`` runs requests that arrive over time with continuous batching and
sampling; ``forward`` gives a mixed batch's logits (equal to ``PeftModel(idx, adapter_names=...)``'s).
"""
from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from . import decoding
from .backend import to_numpy, xp_of
from .gpt import GPT
from .nn import Module
from .peft.layer import param_dtype_xp
from .peft.mixed_batch import BASE  # peft's name for "no adapter" in a mixed batch
from .peft.model import PeftModel
from .serve_adapters import AdapterError, HostAdapter, read_lora_adapter
from .serve_graph import GraphWaves
from .serve_layers import (BatchContext, MultiLoraLinear, RankClasses, bgmv_reference, served_modules,
                           sgmv_reference)


# ------------------------------------------------------------------ configuration, requests, results


@dataclass
class ServeConfig:
    """How a :class:`LoraServer` holds adapters."""

    target_modules: tuple = ("c_attn", "c_proj", "c_fc")  # served Linears (names or suffixes; c_proj: attn and mlp)
    max_rank: int = 16  # r_max: adapters of higher rank are refused (with rank_classes: their largest)
    rank_classes: tuple | None = None  # slot ranks, e.g. (4, 8, 16): each adapter in the smallest that holds it;
    #                                    None: one class of max_rank (every rank padded to r_max)
    device_budget_bytes: int = 64 * 2**20  # bytes of adapter slots on the model's device (sets n_slots)
    host_budget_bytes: int | None = None  # bytes of adapters kept in host memory; None = no limit
    base_model_name: str | None = None  # if set, adapters whose base_model_name_or_path differs are refused
    use_kernels: bool = True  # CUDA RawKernels for float32 on a GPU (False, or MINIPEFT_KERNELS=0: the twins)
    graph_decode: bool = True  # generate's greedy waves run their step in a CUDA graph where they can (serve_graph)
    graph_backend: str = "cuda"  # "cuda": the graph (a float32 model on a GPU); "reference": its NumPy twin (tests)
    graph_max_rows: int = 32  # larger waves run the loop: the graph decodes 8 rows at a time, the loop all at once

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise TypeError(f"target_modules must be a non-empty list of names, e.g. ('c_attn',), "
                            f"got {self.target_modules!r}")
        self.target_modules = tuple(self.target_modules)
        if isinstance(self.max_rank, bool) or not isinstance(self.max_rank, int) or self.max_rank < 1:
            raise ValueError(f"max_rank must be a positive int, got {self.max_rank!r}")
        if self.rank_classes is not None:
            ranks = self.rank_classes
            if isinstance(ranks, (str, int)) or not ranks or not all(
                    isinstance(r, (int, np.integer)) and not isinstance(r, bool) and r >= 1 for r in ranks):
                raise ValueError(f"rank_classes must be None or a non-empty list of positive ranks, e.g. (4, 8, 16); "
                                 f"got {ranks!r}")
            self.rank_classes = tuple(sorted({int(r) for r in ranks}))
            self.max_rank = self.rank_classes[-1]
        if not isinstance(self.device_budget_bytes, (int, np.integer)) or self.device_budget_bytes <= 0:
            raise ValueError(f"device_budget_bytes must be a positive int, got {self.device_budget_bytes!r}")
        if self.host_budget_bytes is not None and self.host_budget_bytes <= 0:
            raise ValueError(f"host_budget_bytes must be None or positive, got {self.host_budget_bytes!r}")
        if isinstance(self.graph_max_rows, bool) or not isinstance(self.graph_max_rows, (int, np.integer)) \
                or self.graph_max_rows < 1:
            raise ValueError(f"graph_max_rows must be a positive int, got {self.graph_max_rows!r}")
        if self.graph_backend not in ("cuda", "reference"):
            raise ValueError(f"graph_backend must be 'cuda' or 'reference' (the NumPy twin), "
                             f"got {self.graph_backend!r}")


@dataclass
class Request:
    """One generation request: prompt token ids, the adapter's name (None or '__base__': the base model)."""

    prompt: object  # 1-D token ids (list or array)
    adapter: str | None = None  # a name given to LoraServer.add_adapter; None: the base model alone
    max_new_tokens: int = 16  # tokens to generate
    do_sample: bool = False  # False: greedy (argmax); True: sample (serve_scheduler.serve only)
    temperature: float = 1.0  # sampling temperature (> 0)
    top_k: int | None = None  # sample among the k most likely tokens; None: all
    top_p: float | None = None  # nucleus sampling: the smallest set of tokens with probability >= top_p; None: all
    seed: int | None = None  # the request's own random stream: the same seed gives the same tokens
    arrival: float = 0.0  # when it arrives, on serve_scheduler.serve's clock (>= 0); generate runs all at once

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, (int, np.integer)) \
                or self.max_new_tokens < 1:
            raise ValueError(f"Request.max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        decoding.check_sampling(self.temperature, self.top_k, self.top_p)
        if not (np.isfinite(self.arrival) and self.arrival >= 0):
            raise ValueError(f"Request.arrival must be a finite time >= 0, got {self.arrival!r}")
        if self.adapter == BASE:
            self.adapter = None
        if self.adapter is not None and not isinstance(self.adapter, str):
            raise TypeError(f"Request.adapter must be a name (str) or None, got {type(self.adapter).__name__}")


@dataclass
class Result:
    """What one request got: its new tokens, or the error that stopped it (never both)."""

    tokens: np.ndarray | None = None  # (n,) generated ids (up to max_new_tokens; ends at eos if one is given)
    error: str | None = None  # why this request was not run

    @property
    def ok(self) -> bool:
        return self.error is None


def slot_nbytes(model: Module, config: ServeConfig | None = None, rank: int | None = None) -> int:
    """Bytes one adapter slot of ``rank`` (default r_max) takes on the device: r (in + out) + 1 per served layer."""
    config = config or ServeConfig()
    rank = config.max_rank if rank is None else rank
    total = 0
    for _, m in served_modules(model, config.target_modules):
        dtype, _ = param_dtype_xp(m)
        total += (rank * (m.in_features + m.out_features) + 1) * np.dtype(dtype).itemsize
    return total


# ------------------------------------------------------------------ greedy decoding of a padded batch


def greedy_batch(model: GPT, prompts: list, max_new_tokens: int, eos_token_id: int | None = None,
                 timing: dict | None = None) -> np.ndarray:
    """Greedy continuation of prompts of different lengths, left-padded, on the key/value cache.

    The one decoding loop of ``minipeft.decoding`` (``GPT.generate(greedy=True,
    attention_mask=...)``'s): padding is masked and positions count only kept tokens, so
    each row continues exactly as its prompt alone would. Returns (B, max_new_tokens) host
    ids; a row that emitted ``eos_token_id`` keeps emitting it. ``timing`` (a dict)
    accumulates prefill_s, decode_s, prefill_tokens, decode_tokens.
    """
    idx, mask = decoding.left_pad(prompts)
    target = decoding.resolve_model(model)
    with decoding.inference(model):
        session = decoding.Session(target, idx, mask)
        if session.steps(max_new_tokens) < max_new_tokens:
            raise ValueError(f"prompts of up to {idx.shape[1]} tokens + {max_new_tokens} new tokens do not fit "
                             f"block_size {model.config.block_size}; decode them in smaller batches")
        pick = decoding.PickTokens(target.xp, session.rows, eos_token_id=eos_token_id)
        decoding.run(session, pick, max_new_tokens, timing)
        out = to_numpy(pick.tokens(np.int64))  # (B, n)
    if out.shape[1] < max_new_tokens:  # every row ended: pad with eos
        out = np.concatenate([out, np.full((len(prompts), max_new_tokens - out.shape[1]), eos_token_id)], axis=1)
    return out


def _model_bytes(model: Module) -> int:
    """Bytes of a model's parameters and held arrays (quantized weights), each buffer once, either backend."""
    seen = {}
    for m in model.modules():
        held = m._held_arrays() if hasattr(m, "_held_arrays") else []
        for a in [p.data for p in m._parameters.values() if p is not None] + list(held):
            while getattr(a, "base", None) is not None:
                a = a.base
            seen[id(a)] = int(a.nbytes)
    return sum(seen.values())


# ------------------------------------------------------------------ the server


class LoraServer:
    """One base model (GPT, full precision or 4-bit) and a pool of LoRA adapters, served in mixed batches.

    ``server = LoraServer(gpt, ServeConfig(...))`` wraps the served Linears of ``gpt`` in
    place; ``server.add_adapter(name, directory)`` registers a peft-format adapter (read on
    first use, or now with ``load=True``); ``server.generate([Request(ids, 'name'), ...])``
    returns one :class:`Result` per request, in order.
    """

    def __init__(self, model: GPT, config: ServeConfig | None = None) -> None:
        if isinstance(model, PeftModel):
            raise TypeError("LoraServer takes the plain base model; call merge_and_unload() or unload() on the "
                            "PeftModel first, and give the adapters as directories to add_adapter")
        if not isinstance(model, GPT):
            raise TypeError(f"LoraServer serves a minipeft GPT, got {type(model).__name__}")
        if any(isinstance(m, MultiLoraLinear) for m in model.modules()):
            raise ValueError("this model is already wrapped by a LoraServer; build one server per base model")
        self.model, self.config = model, config or ServeConfig()
        targets = served_modules(model, self.config.target_modules)
        self.slot_bytes = slot_nbytes(model, self.config)  # a slot of rank r_max
        ranks = self.config.rank_classes or (self.config.max_rank,)
        share = self.config.device_budget_bytes // len(ranks)  # each class gets an equal share of the budget
        counts = [int(share // slot_nbytes(model, self.config, r)) for r in ranks]
        if min(counts) < 1:
            r = ranks[counts.index(0)]
            raise ValueError(f"device_budget_bytes={self.config.device_budget_bytes} holds no adapter of rank {r}: "
                             f"one slot takes {slot_nbytes(model, self.config, r)} bytes of the class's share "
                             f"{share}; raise the budget or lower max_rank / rank_classes")
        self.classes = RankClasses(ranks, counts)
        self.n_slots = self.classes.n_slots
        self._ctx = BatchContext(self.classes)
        self.layers: dict[str, MultiLoraLinear] = {}
        for name, module in targets:
            layer = MultiLoraLinear(module, self.classes, self._ctx, self.config.use_kernels)
            layer.train(module.training)
            model.set_submodule(name, layer)
            self.layers[name] = layer
        self._paths: dict[str, str] = {}
        self._rank: dict[str, int] = {}  # each adapter's largest rank, once read (its slot class)
        self._host: OrderedDict[str, HostAdapter] = OrderedDict()  # least recently used first
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._free = [self.classes.slots_of(c)[::-1] for c in range(len(ranks))]  # per class, lowest id last
        self._graph = GraphWaves(model, self._ctx, self.config)  # greedy waves with the step in a CUDA graph
        self.reset_stats()

    # ---- the adapter pool
    def add_adapter(self, name: str, directory, load: bool = False) -> None:
        """Register the adapter saved (by minipeft or peft) in ``directory`` under ``name``."""
        if not isinstance(name, str) or not name or name == BASE:
            raise ValueError(f"adapter name must be a non-empty string other than {BASE!r}, got {name!r}")
        if name in self._paths:
            raise ValueError(f"adapter {name!r} is already added; remove_adapter({name!r}) first or pick another name")
        self._paths[name] = os.fspath(directory)
        if load:
            try:
                self._host_adapter(name)
            except AdapterError:
                del self._paths[name]
                raise

    def remove_adapter(self, name: str) -> None:
        if name not in self._paths:
            raise ValueError(f"unknown adapter {name!r}")
        del self._paths[name]
        self._host.pop(name, None)
        self._rank.pop(name, None)
        slot = self._resident.pop(name, None)
        if slot is not None:
            for layer in self.layers.values():
                layer.set_slot(slot)
            self._free[self.classes.class_of(slot)].append(slot)

    @property
    def adapters(self) -> list[str]:
        return list(self._paths)

    def resident_adapters(self) -> list[str]:
        """Adapters in device slots, least recently used first."""
        return list(self._resident)

    def host_adapters(self) -> list[str]:
        """Adapters held in host memory, least recently used first."""
        return list(self._host)

    def reset_stats(self) -> None:
        self.stats = dict(disk_loads=0, host_evictions=0, device_loads=0, device_hits=0, device_evictions=0,
                          waves=0, graph_waves=0, swap_s=0.0, prefill_s=0.0, decode_s=0.0, decode_tokens=0,
                          prefill_tokens=0)

    def graph_decodable(self) -> str | None:
        """None when ``generate`` runs its waves' decode step in a CUDA graph (``serve_graph.py``); else why not."""
        return self._graph.reason()

    def memory(self) -> dict:
        """Bytes held: the base model, the device slots (padded), the host pool (unpadded)."""
        dev = sum(layer.nbytes() for layer in self.layers.values())
        return dict(base_bytes=_model_bytes(self.model), slot_bytes=self.slot_bytes, n_slots=self.n_slots,
                    device_pool_bytes=int(dev), resident=len(self._resident),
                    host_bytes=sum(h.nbytes for h in self._host.values()), host_adapters=len(self._host))

    def _host_adapter(self, name: str) -> HostAdapter:
        if name in self._host:
            self._host.move_to_end(name)
            return self._host[name]
        if name not in self._paths:
            known = sorted(self._paths)
            raise AdapterError(f"unknown adapter {name!r}: it was never added to this server (added: "
                               f"{known[:8]}{' ...' if len(known) > 8 else ''}); add it with "
                               "server.add_adapter(name, directory)")
        adapter = read_lora_adapter(name, self._paths[name], self.model, self.layers, self.config)
        self.stats["disk_loads"] += 1
        self._rank[name] = adapter.r
        self._host[name] = adapter
        budget = self.config.host_budget_bytes
        while budget is not None and len(self._host) > 1 and sum(h.nbytes for h in self._host.values()) > budget:
            self._host.popitem(last=False)  # the least recently used; read from disk again when needed
            self.stats["host_evictions"] += 1
        return adapter

    def class_of(self, name: str) -> int:
        """The rank class of adapter ``name`` (read from disk if it never was)."""
        if name not in self._rank:
            self._host_adapter(name)
        return self.classes.class_for_rank(self._rank[name])

    def can_hold(self, names, keep=()) -> bool:
        """Whether ``names`` fit in the device slots at once, ``keep`` (resident, in use) staying."""
        need = [0] * len(self.classes.ranks)
        for n in set(names) | set(keep):
            need[self.class_of(n)] += 1
        return all(k <= n for k, n in zip(need, self.classes.counts))

    def _make_resident(self, names: list[str], keep=()) -> dict[str, int]:
        """Slots for ``names`` (they fit: ``can_hold``), evicting the least recently used others but ``keep``."""
        keep, t0 = set(names) | set(keep), time.perf_counter()
        for name in names:
            if name in self._resident:
                self._resident.move_to_end(name)
                self.stats["device_hits"] += 1
                continue
            adapter, c = self._host_adapter(name), self.class_of(name)
            if self._free[c]:
                slot = self._free[c].pop()
            else:  # the least recently used adapter of this class that the batch does not use
                victim = next(n for n in self._resident if n not in keep and self.class_of(n) == c)
                slot = self._resident.pop(victim)
                self.stats["device_evictions"] += 1
            for mod, layer in self.layers.items():
                layer.set_slot(slot, *adapter.weights.get(mod, (None, None, 0.0)))  # host -> device copy
            self._resident[name] = slot
            self.stats["device_loads"] += 1
        self.stats["swap_s"] += time.perf_counter() - t0
        return {n: self._resident[n] for n in names}

    # ---- generation
    def _check_request(self, req: Request) -> np.ndarray:
        cfg = self.model.config
        p = np.asarray(req.prompt)
        if p.ndim != 1 or p.size == 0 or p.dtype.kind not in "iu":
            raise ValueError(f"prompt must be a non-empty 1-D sequence of token ids, got {p.dtype} of shape {p.shape}")
        if p.min() < 0 or p.max() >= cfg.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size}), got [{p.min()}, {p.max()}]")
        if p.size + req.max_new_tokens > cfg.block_size:
            raise ValueError(f"prompt ({p.size}) + max_new_tokens ({req.max_new_tokens}) exceeds block_size "
                             f"{cfg.block_size}; shorten the prompt or ask for fewer tokens")
        if req.adapter is not None and req.adapter not in self._resident:
            self._host_adapter(req.adapter)  # read and checked once; resident adapters need no host copy
        return p.astype(np.int64)

    def generate(self, requests: list, eos_token_id: int | None = None) -> list[Result]:
        """Greedy decoding of a mixed batch, all at once; one :class:`Result` per request, in order.

        Requests whose adapter is unknown or cannot serve this base, or whose prompt is
        invalid, get an error; the others run together. A batch naming more adapters than
        there are slots (of their rank class) runs in waves that fit.
        """
        if not all(isinstance(r, Request) for r in requests):
            raise TypeError("generate takes a list of Request(prompt, adapter, max_new_tokens)")
        results: list = [None] * len(requests)
        prompts, groups = {}, OrderedDict()  # adapter (None first) -> request indices
        groups[None] = []
        for i, req in enumerate(requests):
            try:
                if req.do_sample:
                    raise ValueError("LoraServer.generate decodes greedily (a static batch); serve sampled requests "
                                     "with minipeft.serve_scheduler.serve(server, requests)")
                prompts[i] = self._check_request(req)
            except ValueError as e:  # AdapterError included
                results[i] = Result(error=str(e))
                continue
            groups.setdefault(req.adapter, []).append(i)
        base = groups.pop(None)
        chunks = [[]]  # waves of adapters that fit in the slots together
        for name in groups:
            if not self.can_hold(chunks[-1] + [name]):
                chunks.append([])
            chunks[-1].append(name)
        for j, chunk in enumerate(chunks):
            wave = (base if j == 0 else []) + [i for n in chunk for i in groups[n]]
            if wave:
                self._run_wave(wave, chunk, requests, prompts, results, eos_token_id)
        return results

    def forward(self, idx, adapter_names, attention_mask=None):
        """Logits (B, T, V) of one mixed batch, row m with adapter ``adapter_names[m]`` (None or '__base__': base).

        The same numbers as ``PeftModel(idx, adapter_names=...)`` with these adapters loaded
        (``tests/peft/test_mixed_batch.py``); the adapters must fit the slots together.
        """
        names = [None if n in (None, BASE) else n for n in adapter_names]
        if len(names) != len(idx):
            raise ValueError(f"adapter_names has {len(names)} names for {len(idx)} rows of idx; give one per row")
        used = list(dict.fromkeys(n for n in names if n is not None))
        if not self.can_hold(used):
            raise ValueError(f"adapters {used} do not fit the device slots together ({self.n_slots}); split the batch")
        slot_of = self._make_resident(used)
        xp = xp_of(self.model.transformer.wte.weight.data)
        self._ctx.set(np.array([slot_of.get(n, -1) for n in names]), xp)
        try:
            with decoding.inference(self.model):
                kw = {} if attention_mask is None else dict(attention_mask=xp.asarray(attention_mask))
                return self.model(xp.asarray(idx), **kw).logits
        finally:
            self._ctx.clear()

    def _run_wave(self, wave, names, requests, prompts, results, eos_token_id) -> None:
        n_new = max(requests[i].max_new_tokens for i in wave)
        late = [i for i in wave if len(prompts[i]) + n_new - 1 > self.model.config.block_size]
        if late:  # left-padded to the longest prompt, the batch would run out of positions: two waves
            for part in (late, [i for i in wave if i not in late]):  # each request alone always fits
                self._run_wave(part, [n for n in names if any(requests[i].adapter == n for i in part)], requests,
                               prompts, results, eos_token_id)
            return
        slot_of = self._make_resident(names)
        slots = np.array([slot_of.get(requests[i].adapter, -1) for i in wave])
        order = np.argsort(slots, kind="stable")  # each adapter's requests contiguous (SGMV segments)
        rows = [wave[k] for k in order]
        batch = [prompts[i] for i in rows]
        if len(rows) <= self.config.graph_max_rows and self._graph.reason() is None:  # groups of <= 8 rows
            out = self._graph.generate(batch, slots[order], [requests[i].max_new_tokens for i in rows],
                                       eos_token_id, self.stats)
            self.stats["graph_waves"] += 1
        else:  # the Python loop: graph_decodable() says why, or the wave has more than graph_max_rows rows
            self._ctx.set(slots[order], xp_of(self.model.transformer.wte.weight.data))
            try:
                out = greedy_batch(self.model, batch, n_new, eos_token_id, self.stats)
            finally:
                self._ctx.clear()
        self.stats["waves"] += 1
        for k, i in enumerate(rows):
            toks = out[k][:requests[i].max_new_tokens]
            if eos_token_id is not None and (toks == eos_token_id).any():
                toks = toks[: int(np.argmax(toks == eos_token_id)) + 1]
            results[i] = Result(tokens=toks)


__all__ = ["LoraServer", "ServeConfig", "Request", "Result", "AdapterError", "HostAdapter", "MultiLoraLinear",
           "RankClasses", "BatchContext",
           "bgmv_reference", "sgmv_reference", "greedy_batch", "served_modules", "slot_nbytes", "BASE"]
