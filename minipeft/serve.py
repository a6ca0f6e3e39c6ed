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
by default, full precision or 4-bit) in a :class:`MultiLoraLinear` holding the stacks of
the resident adapters, ranks padded with zeros to ``r_max`` (zero rows of A and zero
columns of B change nothing)::

    lora_A (n_slots, r_max, in)    lora_B (n_slots, out, r_max)    scales (n_slots,)

A device budget sets ``n_slots``; resident adapters are kept least-recently-used first
and evicted when a batch needs a slot, the host pool holds the rest (optionally within a
budget too, re-reading evicted ones from disk). ``generate`` runs greedy decoding for a
batch in which every request names its own adapter or none; a request naming an unknown
adapter, or one that cannot serve this base, gets its own error and the others run.
"""
from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from . import decoding, fast
from .backend import to_device, to_numpy, xp_of
from .engine import Tensor
from .gpt import GPT
from .kernels import bgmv as bgmv_kernels
from .nn import Module
from .peft.layer import is_linear_like, param_dtype_xp
from .peft.model import PeftModel
from .serve_adapters import AdapterError, HostAdapter, read_lora_adapter

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


# ------------------------------------------------------------------ the batched LoRA path (NumPy twins)


def bgmv_reference(y, x, lora_A, lora_B, indices, scales):
    """BGMV: ``y[m] += scales[i] * (x[m] A[i]^T) B[i]^T`` with ``i = indices[m]``, in place; i < 0 skips row m.

    ``y`` (M, H2), ``x`` (M, H1), ``lora_A`` (N, R, H1), ``lora_B`` (N, H2, R), ``indices``
    (M,), ``scales`` (N,). Gathers each row's A and B, then two batched matrix products.
    """
    xp = xp_of(y)
    indices = xp.asarray(indices)
    rows = xp.flatnonzero(indices >= 0)  # base-model rows stay exactly the base output
    if rows.size < len(indices):
        return y if rows.size == 0 else _scatter_add(y, rows, bgmv_reference(
            xp.zeros((rows.size, y.shape[1]), y.dtype), x[rows], lora_A, lora_B, indices[rows], scales))
    v = xp.matmul(lora_A[indices], x[:, :, None])  # (M, R, 1): shrink, x A_i^T (A_i gathered per row)
    delta = xp.matmul(lora_B[indices], v)[:, :, 0]  # (M, H2): expand, v B_i^T
    y += scales[indices][:, None] * delta
    return y


def _scatter_add(y, rows, delta):
    y[rows] += delta
    return y


def sgmv_reference(y, x, lora_A, lora_B, indptr, seg_slot, scales):
    """SGMV: for each segment k, ``y[s:e] += scales[i] * (x[s:e] A[i]^T) B[i]^T``, in place.

    Rows ``indptr[k]:indptr[k+1]`` share slot ``i = seg_slot[k]`` (< 0: skipped). One GEMM
    pair per segment: the adapter's weights serve all its rows.
    """
    for k, slot in enumerate(np.asarray(seg_slot).tolist()):
        s, e = int(indptr[k]), int(indptr[k + 1])
        if slot >= 0 and e > s:
            y[s:e] += scales[slot] * ((x[s:e] @ lora_A[slot].T) @ lora_B[slot].T)  # (e - s, H2)
    return y


# On float32 CuPy arrays the CUDA kernels (minipeft/kernels/bgmv.cu) run instead of the twins above.
fast.register(bgmv_reference, bgmv_kernels.bgmv_cuda, when=bgmv_kernels.bgmv_applies)
fast.register(sgmv_reference, bgmv_kernels.sgmv_cuda, when=bgmv_kernels.sgmv_applies)


# ------------------------------------------------------------------ configuration, requests, results


@dataclass
class ServeConfig:
    """How a :class:`LoraServer` holds adapters."""

    target_modules: tuple = ("c_attn", "c_proj", "c_fc")  # served Linears (names or suffixes; c_proj: attn and mlp)
    max_rank: int = 16  # r_max: every rank is padded to it; adapters of higher rank are refused
    device_budget_bytes: int = 64 * 2**20  # bytes of adapter slots on the model's device (sets n_slots)
    host_budget_bytes: int | None = None  # bytes of adapters kept in host memory; None = no limit
    base_model_name: str | None = None  # if set, adapters whose base_model_name_or_path differs are refused
    use_kernels: bool = True  # CUDA RawKernels for float32 on a GPU (False, or MINIPEFT_KERNELS=0: the twins)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise TypeError(f"target_modules must be a non-empty list of names, e.g. ('c_attn',), "
                            f"got {self.target_modules!r}")
        self.target_modules = tuple(self.target_modules)
        if isinstance(self.max_rank, bool) or not isinstance(self.max_rank, int) or self.max_rank < 1:
            raise ValueError(f"max_rank must be a positive int, got {self.max_rank!r}")
        if not isinstance(self.device_budget_bytes, (int, np.integer)) or self.device_budget_bytes <= 0:
            raise ValueError(f"device_budget_bytes must be a positive int, got {self.device_budget_bytes!r}")
        if self.host_budget_bytes is not None and self.host_budget_bytes <= 0:
            raise ValueError(f"host_budget_bytes must be None or positive, got {self.host_budget_bytes!r}")


@dataclass
class Request:
    """One generation request: prompt token ids, the adapter's name (None or '__base__': the base model)."""

    prompt: object  # 1-D token ids (list or array)
    adapter: str | None = None  # a name given to LoraServer.add_adapter; None: the base model alone
    max_new_tokens: int = 16  # tokens to generate (greedy)

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, (int, np.integer)) \
                or self.max_new_tokens < 1:
            raise ValueError(f"Request.max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
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


# ------------------------------------------------------------------ the wrapped layer


class _BatchContext:
    """The adapter slot of every request of the batch being run (set by the server, read by the layers)."""

    def __init__(self) -> None:
        self.version = 0
        self.clear()

    def clear(self) -> None:
        self.slots = self.slots_dev = self.req_ptr = self.seg_slot = self.used = None

    def set(self, slots: np.ndarray, xp) -> None:
        """``slots`` (B,): each request's slot (-1: base), sorted, so each adapter's requests are contiguous."""
        self.version += 1
        self.slots = slots
        self.slots_dev = xp.asarray(slots.astype(np.int32))
        starts = np.r_[0, np.flatnonzero(np.diff(slots)) + 1]
        self.req_ptr, self.seg_slot = np.r_[starts, len(slots)], slots[starts]  # (S + 1,), (S,)
        self.used = np.unique(slots[slots >= 0])


class MultiLoraLinear(Module):
    """A Linear-like base layer plus the stacked LoRA weights of every resident adapter.

    ``forward(x)``: ``y = base(x)``, then, when the running batch uses adapters with weights
    here, the LoRA part per row: BGMV when each request has one token (decode), SGMV over
    each adapter's rows otherwise (prefill). The stacks are plain arrays, not Parameters.
    """

    def __init__(self, base_layer: Module, n_slots: int, max_rank: int, ctx: _BatchContext,
                 use_kernels: bool = True) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        dtype, xp = param_dtype_xp(base_layer)
        self.lora_A = xp.zeros((n_slots, max_rank, self.in_features), dtype)  # (N, R, in)
        self.lora_B = xp.zeros((n_slots, self.out_features, max_rank), dtype)  # (N, out, R)
        self.scales = xp.zeros(n_slots, dtype)  # (N,)
        self.present = np.zeros(n_slots, bool)  # slot holds weights for this layer
        self.ctx, self.use_kernels = ctx, use_kernels
        self._active = (-1, False)

    def set_slot(self, slot: int, A=None, B=None, scale: float = 0.0) -> None:
        """Write one adapter's A (r, in), B (out, r) into ``slot`` (zero-padded); None clears the slot."""
        xp = xp_of(self.lora_A)
        self.lora_A[slot] = 0
        self.lora_B[slot] = 0
        if A is not None:
            r = A.shape[0]
            self.lora_A[slot, :r] = xp.asarray(A, dtype=self.lora_A.dtype)
            self.lora_B[slot, :, :r] = xp.asarray(B, dtype=self.lora_B.dtype)
        self.scales[slot] = scale if A is not None else 0.0
        self.present[slot] = A is not None

    def _is_active(self, ctx) -> bool:
        if self._active[0] != ctx.version:
            self._active = (ctx.version, bool(ctx.used.size and self.present[ctx.used].any()))
        return self._active[1]

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)  # (..., out): the base GEMM, once for the whole batch
        ctx = self.ctx
        if ctx.slots is None or not self._is_active(ctx):
            return y
        xd, yd = x.data, y.data
        A, B, s = self.lora_A, self.lora_B, self.scales
        M = xd.size // self.in_features
        x2, y2 = xd.reshape(M, self.in_features), yd.reshape(M, self.out_features)  # (B*T, in), (B*T, out)
        T = M // len(ctx.slots)
        # the twins, or their CUDA kernels where fast.choose finds they apply (use_kernels=False: the twins)
        if T == 1:  # decode: one row per request
            fast.call(bgmv_reference, y2, x2, A, B, ctx.slots_dev, s, allow_fast=self.use_kernels)
        else:  # prefill: request k's T rows follow request k-1's, same-adapter requests are adjacent
            indptr = ctx.req_ptr * T
            fast.call(sgmv_reference, y2, x2, A, B, indptr, ctx.seg_slot, s, allow_fast=self.use_kernels)
        return Tensor(y2.reshape(yd.shape))

    def _moved_to(self, device: str) -> None:
        self.lora_A, self.lora_B, self.scales = (to_device(a, device) for a in (self.lora_A, self.lora_B, self.scales))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, slots={len(self.present)}, "
                f"r_max={self.lora_A.shape[1]}")


def served_modules(model: Module, target_modules) -> list:
    """(name, module) of the Linear-like modules of ``model`` whose names match ``target_modules``."""
    out = [(n, m) for n, m in model.named_modules() if n and is_linear_like(m) and not n.startswith("lm_head")
           and any(n == t or n.endswith("." + t) for t in target_modules)]
    if not out:
        raise ValueError(f"target_modules {list(target_modules)} match no Linear of the model; GPT-2 names are "
                         "'c_attn', 'c_proj' (attn and mlp), 'c_fc', or dotted suffixes such as 'mlp.c_proj'")
    return out


def slot_nbytes(model: Module, config: ServeConfig | None = None) -> int:
    """Bytes one adapter slot takes on the device: r_max (in + out) + 1 values per served layer."""
    config = config or ServeConfig()
    total = 0
    for _, m in served_modules(model, config.target_modules):
        dtype, _ = param_dtype_xp(m)
        total += (config.max_rank * (m.in_features + m.out_features) + 1) * np.dtype(dtype).itemsize
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
        self.slot_bytes = slot_nbytes(model, self.config)
        self.n_slots = int(self.config.device_budget_bytes // self.slot_bytes)
        if self.n_slots < 1:
            raise ValueError(f"device_budget_bytes={self.config.device_budget_bytes} holds no adapter: one slot of "
                             f"rank {self.config.max_rank} takes {self.slot_bytes} bytes; raise the budget or "
                             "lower max_rank")
        self._ctx = _BatchContext()
        self.layers: dict[str, MultiLoraLinear] = {}
        for name, module in targets:
            layer = MultiLoraLinear(module, self.n_slots, self.config.max_rank, self._ctx, self.config.use_kernels)
            layer.train(module.training)
            model.set_submodule(name, layer)
            self.layers[name] = layer
        self._paths: dict[str, str] = {}
        self._host: OrderedDict[str, HostAdapter] = OrderedDict()  # least recently used first
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._free = list(range(self.n_slots))[::-1]
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
        slot = self._resident.pop(name, None)
        if slot is not None:
            for layer in self.layers.values():
                layer.set_slot(slot)
            self._free.append(slot)

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
                          waves=0, swap_s=0.0, prefill_s=0.0, decode_s=0.0, decode_tokens=0, prefill_tokens=0)

    def memory(self) -> dict:
        """Bytes held: the base model, the device slots (padded), the host pool (unpadded)."""
        dev = sum(a.nbytes for layer in self.layers.values() for a in (layer.lora_A, layer.lora_B, layer.scales))
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
        self._host[name] = adapter
        budget = self.config.host_budget_bytes
        while budget is not None and len(self._host) > 1 and sum(h.nbytes for h in self._host.values()) > budget:
            self._host.popitem(last=False)  # the least recently used; read from disk again when needed
            self.stats["host_evictions"] += 1
        return adapter

    def _make_resident(self, names: list[str]) -> dict[str, int]:
        """Slots for ``names`` (at most n_slots), evicting the least recently used others."""
        keep, t0 = set(names), time.perf_counter()
        for name in names:
            if name in self._resident:
                self._resident.move_to_end(name)
                self.stats["device_hits"] += 1
                continue
            adapter = self._host_adapter(name)
            if self._free:
                slot = self._free.pop()
            else:
                victim = next(n for n in self._resident if n not in keep)
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
        """Greedy decoding of a mixed batch; one :class:`Result` per request, in order.

        Requests whose adapter is unknown or cannot serve this base, or whose prompt is
        invalid, get an error; the others run together. A batch naming more adapters than
        there are slots runs in waves of at most ``n_slots`` adapters.
        """
        if not all(isinstance(r, Request) for r in requests):
            raise TypeError("generate takes a list of Request(prompt, adapter, max_new_tokens)")
        results: list = [None] * len(requests)
        prompts, groups = {}, OrderedDict()  # adapter (None first) -> request indices
        groups[None] = []
        for i, req in enumerate(requests):
            try:
                prompts[i] = self._check_request(req)
            except ValueError as e:  # AdapterError included
                results[i] = Result(error=str(e))
                continue
            groups.setdefault(req.adapter, []).append(i)
        base = groups.pop(None)
        names = list(groups)
        chunks = [names[k:k + self.n_slots] for k in range(0, len(names), self.n_slots)] or [[]]
        for j, chunk in enumerate(chunks):
            wave = (base if j == 0 else []) + [i for n in chunk for i in groups[n]]
            if wave:
                self._run_wave(wave, chunk, requests, prompts, results, eos_token_id)
        return results

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
        self._ctx.set(slots[order], xp_of(self.model.transformer.wte.weight.data))
        try:
            out = greedy_batch(self.model, [prompts[i] for i in rows], n_new, eos_token_id, self.stats)
        finally:
            self._ctx.clear()
        self.stats["waves"] += 1
        for k, i in enumerate(rows):
            toks = out[k, :requests[i].max_new_tokens]
            if eos_token_id is not None and (toks == eos_token_id).any():
                toks = toks[: int(np.argmax(toks == eos_token_id)) + 1]
            results[i] = Result(tokens=toks)


__all__ = ["LoraServer", "ServeConfig", "Request", "Result", "AdapterError", "HostAdapter", "MultiLoraLinear",
           "bgmv_reference", "sgmv_reference", "greedy_batch", "served_modules", "slot_nbytes", "BASE"]
