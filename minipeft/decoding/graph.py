"""Greedy decoding whose whole step is one CUDA graph, captured once and replayed per token.

The one decoding loop (:mod:`minipeft.decoding.loop`) runs each token through the model's
forward from Python: some hundred small kernels per token, each launched by the host, so a
GPT-2 small token at batch 1 costs ~17 ms of host work for well under 1 ms of GPU work. A
CUDA graph (CUDA C++ Programming Guide, "CUDA Graphs": stream capture, then
``cudaGraphLaunch``) records the launches of one step once and replays them with one call.
A replay cannot change any launch's arguments, so the step (``minipeft/kernels/decode.cu``)
allocates nothing (every kernel writes into a buffer of :class:`DecodeState`, allocated
before the capture), keeps what changes per token in device memory that the kernels advance
themselves (the token ``tok`` and position ``pos`` of each row, the cache ``slot``, the output
column ``step``), and does every product with a RawKernel (CuPy cannot capture cuBLAS):
decode's products are GEMVs of B <= 8 rows, which one warp per output feature does at
memory speed.

A call (:class:`GraphDecoder`, :func:`generate_graph`) runs (1) the **prefill**, the ordinary
forward of the prompt through the one loop's :class:`~minipeft.decoding.loop.Session` (left
padding, per-row positions as ``kv_cache.positions`` counts them), whose keys, values and mask
are copied into the static cache (B, H, S, D) and ``kept`` (B, S), the first token being the
argmax of its last logits as in ``GPT.generate(greedy=True)``; then (2) **the step**
(:func:`decode_step`), captured once per decoder (again only when a weight array is another
one) and replayed ``max_new_tokens - 1`` times; the tokens are read out once at the end.

The model is GPT-2 (Radford et al. 2019) with GPT-2's names. A LoRA ``PeftModel`` decodes
through merged weights ``W + s·B·A`` (Hu et al. 2021, §4.1: merging is why LoRA adds no
inference latency), computed into the decoder's own buffers at each call: the model is not
changed. Methods that are not a weight change (prompt and prefix tuning, bottleneck
adapters, side tuning), other weight methods, quantized layers and non-float32 models are
refused with the reason (:func:`graph_decodable`); ``model.generate`` decodes all of them. The
multi-adapter server's layers (one adapter per row, unmerged) run through a subclass,
:class:`minipeft.serve_graph.ServedGraphDecoder`.

The twin: :class:`~minipeft.decoding.graph_step.Reference` holds one NumPy function per kernel (same arguments, same
buffers, float32) and :func:`decode_step` runs either set, so the CPU runs the orchestration
the GPU runs (``backend="reference"``); ``tests/test_graph_decode.py`` checks both.
"""
from __future__ import annotations

import weakref

import numpy as np

from ..backend import xp_of
from ..nn import Dropout, Embedding, LayerNorm, Linear, ModuleList
from .graph_step import DecodeState, Reference, decode_step, decode_step_reference
from .loop import Session, array_of, inference, resolve_model

MAX_ROWS = 8  # rows a decoder takes: the GEMV kernel keeps one accumulator per row in registers
BACKENDS = ("cuda", "reference")  # the kernels in a CUDA graph, or their NumPy twins (any device)
SMEM_LIMIT = 48 * 1024  # bytes of shared memory the attention kernel may use (scores of S slots)
_GPT_MODULES = ("GPT", "Transformer", "Block", "CausalSelfAttention", "MLP")  # containers of minipeft.gpt
_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


# ------------------------------------------------------------------ which models


def _is_tuner(m) -> bool:  # a peft BaseTunerLayer (duck-typed: decoding imports no peft)
    return hasattr(m, "base_layer") and hasattr(m, "merged_adapters")


def _effective(m):
    """The module that runs in ``m``'s place: the active copy of a ``modules_to_save`` wrapper, else ``m``."""
    if hasattr(m, "modules_to_save") and hasattr(m, "original_module"):
        if m.disable_adapters or m.active_adapter not in m.modules_to_save:
            return m.original_module
        return m.modules_to_save[m.active_adapter]
    return m


def _walk(module, prefix: str = ""):
    """(name, effective module), not descending into tuner layers."""
    module = _effective(module)
    yield prefix, module
    if not _is_tuner(module):
        for name, child in module._modules.items():
            yield from _walk(child, f"{prefix}.{name}" if prefix else name)


def _module_reason(name: str, m) -> str | None:
    if _is_tuner(m):
        base = m.get_base_layer()
        if "lora_A" not in getattr(m, "adapter_layer_names", ()):
            return (f"{name} is a {type(m).__name__}: only LoRA layers are merged into plain weights here "
                    "(merge_and_unload() gives a plain GPT that decodes here)")
        if type(base) is not Linear:
            return f"{name} is LoRA on a {type(base).__name__} (a quantized layer?), not on a float Linear"
        if m.merged and m.disable_adapters:
            return f"{name} has merged adapters while adapters are disabled (unmerge_adapter() first)"
        if getattr(m, "batch_adapters", None) is not None:
            return f"{name} is set for a mixed-adapter batch (adapter_names), which the graph does not run"
        return None
    if type(m) in (Linear, LayerNorm, Embedding, Dropout, ModuleList):
        return None
    if type(m).__module__ == "minipeft.gpt" and type(m).__name__ in _GPT_MODULES:
        return None
    return f"{name or 'the model'} is a {type(m).__name__}, a module the graph's step does not run"


def _check_model(model, module_reason=None):
    """``(gpt, None)`` when the graph's step computes what ``model``'s forward computes, else ``(None, reason)``.

    ``module_reason(name, module)``: the reason a module is not run by the step, or None (default:
    the plain and LoRA modules of a GPT; a subclass of :class:`GraphDecoder` may take more)."""
    try:
        target = resolve_model(model)
    except TypeError as e:
        return None, str(e)
    if target.extra:
        return None, (f"its adapter adds {sorted(target.extra)} to the first forward (prompt or prefix tuning), "
                      "which the graph's step does not run")
    gpt = target.forward
    if not target.use_cache or type(gpt).__name__ != "GPT" or type(gpt).__module__ != "minipeft.gpt":
        return None, f"its forward is not minipeft's GPT.forward with a key/value cache ({type(gpt).__name__})"
    cfg = gpt.config
    if cfg.dtype != "float32":
        return None, f"its parameters are {cfg.dtype}; the kernels are float32 (build the GPT with dtype='float32')"
    if 4 * (cfg.block_size + cfg.head_dim) > SMEM_LIMIT:
        return None, f"block_size {cfg.block_size} is more than the attention kernel keeps in shared memory"
    for name, m in _walk(gpt):
        reason = (module_reason or _module_reason)(name, m)
        if reason:
            return None, reason
    return gpt, None


def _xp_of_gpt(gpt):
    return xp_of(_effective(gpt.transformer.wte).weight.data)


def _decodable(model, backend: str, module_reason=None):
    """``(gpt, None)``, or ``(None or gpt, reason)`` when ``backend`` cannot decode ``model``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    gpt, reason = _check_model(model, module_reason)
    if reason is None and backend == "cuda" and _xp_of_gpt(gpt) is np:
        reason = "the model is on the CPU (model.to('cuda') first; backend='reference' runs the NumPy twin)"
    return gpt, reason


def graph_decodable(model, backend: str = "cuda") -> str | None:
    """None when :class:`GraphDecoder` can decode ``model`` with ``backend``; else the reason, in words."""
    return _decodable(model, backend)[1]


def _refuse(reason: str) -> ValueError:
    return ValueError(f"the CUDA-graph decoder cannot decode this model: {reason}. "
                      "Use model.generate(idx, max_new_tokens, greedy=True) instead")


# ------------------------------------------------------------------ the weights


def _linear_weights(m):
    """``(weight, bias, merged)`` a Linear-like module computes with: LoRA's ``W + s·B·A`` merged
    (``merged`` True: a new array, not the model's own), as its forward would use them."""
    m = _effective(m)
    if not _is_tuner(m):
        return m.weight.data, (None if m.bias is None else m.bias.data), False
    base = m.get_base_layer()
    W, merged = base.weight.data, False
    if not m.merged and not m.disable_adapters:  # merged already: W holds the adapters; disabled: W alone
        saved = dict(m._caches)  # DoRA's merged_weight notes a norm there: leave the layer as it was
        try:
            for a in m.active_adapters:
                if a in m.adapter_names:
                    W, merged = m.merged_weight(W, a), True
        finally:
            m._caches.clear()
            m._caches.update(saved)
    return W, (None if base.bias is None else base.bias.data), merged


def gather_weights(gpt, linear_weights=None) -> tuple[dict, set]:
    """``(weights, merged)``: every array of the step by its GPT-2 name, and the names of merged ones.

    ``linear_weights(module)``: ``(weight, bias, merged)`` of a Linear-like module, or None for the
    default (a Linear's own, or a LoRA layer's merged ``W + s·B·A``)."""
    t = gpt.transformer
    weights, merged = {}, set()

    def norm(name, m):
        m = _effective(m)
        weights[name + ".weight"], weights[name + ".bias"] = m.weight.data, m.bias.data

    def linear(name, m):
        got = linear_weights(m) if linear_weights else None
        weights[name + ".weight"], weights[name + ".bias"], is_merged = got or _linear_weights(m)
        if is_merged:
            merged.add(name + ".weight")

    weights["transformer.wte.weight"] = _effective(t.wte).weight.data  # (V, C)
    weights["transformer.wpe.weight"] = _effective(t.wpe).weight.data  # (block_size, C)
    for i, block in enumerate(t.h):
        p = f"transformer.h.{i}."
        norm(p + "ln_1", block.ln_1)
        norm(p + "ln_2", block.ln_2)
        for lin in _LINEARS:
            linear(p + lin, block.get_submodule(lin))
    norm("transformer.ln_f", t.ln_f)
    linear("lm_head", gpt.lm_head)  # tied: wte's array itself
    return weights, merged


# ------------------------------------------------------------------ the decoder


def _address(a) -> int:
    return a.ctypes.data if isinstance(a, np.ndarray) else a.data.ptr


class GraphDecoder:
    """Greedy decoding of ``batch_size`` rows of ``model`` with the step in a CUDA graph.

    ``decoder(idx, max_new_tokens, attention_mask=None)`` returns (B, T + n) ids, the tokens
    ``model.generate(idx, n, greedy=True, attention_mask=...)`` returns (up to float32
    rounding in a near-tie). Build it once and call it for every batch of the same size: the
    buffers and the captured graph are reused. ``backend="reference"`` runs the NumPy twin of
    the step instead (on the CPU or the GPU), with the same orchestration.

    It holds its model weakly (it never keeps a model alive) and reads the model's weights at
    every call: a model trained or given another adapter since decodes as it is now.

    A subclass may run more modules (:class:`minipeft.serve_graph.ServedGraphDecoder`: the
    multi-adapter server's layers) by overriding :meth:`module_reason`, :meth:`_gather` and
    :meth:`_lora_rank`.
    """

    module_reason = staticmethod(_module_reason)  # (name, module) -> why the step cannot run it, or None

    @classmethod
    def decodable(cls, model, backend: str = "cuda"):
        """``(gpt, None)``, or ``(gpt or None, reason)`` when this class cannot decode ``model`` with ``backend``."""
        return _decodable(model, backend, cls.module_reason)

    def __init__(self, model, batch_size: int, backend: str = "cuda") -> None:
        gpt, reason = self.decodable(model, backend)
        if reason:
            raise _refuse(reason)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or not 1 <= batch_size <= MAX_ROWS:
            raise ValueError(f"batch_size must be an int in [1, {MAX_ROWS}] (the GEMV kernel's rows), got "
                             f"{batch_size!r}; decode larger batches in chunks, or use model.generate")
        self._model = weakref.ref(model)
        self.backend, self.batch_size, self.config = backend, int(batch_size), gpt.config
        self.xp = _xp_of_gpt(gpt)
        self.state = DecodeState.allocate(gpt.config, self.batch_size, self.xp, self._lora_rank(gpt))
        self.weights: dict = {}  # by GPT-2 name: the model's arrays, or the decoder's copies of merged ones
        self._owned: dict = {}  # name -> the decoder's own buffer (merged, converted): its address never changes
        self._graph = self._graph_key = self._stream = None

    @property
    def model(self):
        m = self._model()
        if m is None:
            raise ReferenceError("the model of this GraphDecoder was deleted; build a new decoder for another model")
        return m

    def __call__(self, idx, max_new_tokens: int, attention_mask=None):
        model, xp = self.model, self.xp
        gpt, reason = self.decodable(model, self.backend)  # adapters may have changed since the decoder was built
        if reason:
            raise _refuse(reason)
        if _xp_of_gpt(gpt) is not xp:
            raise ValueError("the model moved to another device since this GraphDecoder was built; build a new one")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        idx = xp.asarray(array_of(idx))
        if idx.ndim != 2 or idx.shape[0] != self.batch_size:
            raise ValueError(f"this GraphDecoder decodes batches of {self.batch_size} rows (B, T); got idx of shape "
                             f"{idx.shape}: build a GraphDecoder(model, {idx.shape[0] if idx.ndim == 2 else 'B'})")
        T, n = int(idx.shape[1]), int(max_new_tokens)
        if T + n - 1 > self.config.block_size:
            raise ValueError(f"a prompt of {T} tokens and {n} new tokens needs {T + n - 1} cache slots, more than "
                             f"block_size {self.config.block_size}; model.generate crops the window past it")
        with inference(model):
            session = Session(resolve_model(model), idx, attention_mask)
            if n == 0:
                return xp.concatenate([session.tokens, session.tokens[:, :0]], axis=1)
            self._bind(*self._gather(gpt))
            logits = session.start()  # (B, V): the prompt through the ordinary forward
            self._load_prefill(session.cache, logits)
        self._run(n - 1)
        new = self.state.out[:, :n].astype(session.tokens.dtype)  # (B, n)
        return xp.concatenate([session.tokens, new], axis=1)  # (B, T + n)

    # ---- the call's parts
    def _lora_rank(self, gpt) -> int:
        """Columns of ``state.lora_h``: the rank of the LoRA stacks the step reads (none here)."""
        return 0

    def _gather(self, gpt) -> tuple[dict, set]:
        """``(weights, merged)`` of the step (:func:`gather_weights`)."""
        return gather_weights(gpt)

    def _bind(self, weights: dict, merged: set) -> None:
        """Point the step at the model's arrays; merged (or not kernel-ready) ones go into the decoder's own
        buffers, so their addresses, which the captured graph holds, stay the same from call to call."""
        xp, bound = self.xp, {}
        for name, a in weights.items():
            ready = a is None or (a.dtype == np.float32 and a.flags.c_contiguous and _address(a) % 16 == 0)
            if ready and name not in merged:
                bound[name] = a
                continue
            buf = self._owned.get(name)
            if buf is None or buf.shape != a.shape:
                buf = self._owned[name] = xp.empty(a.shape, xp.float32)
            buf[...] = a
            bound[name] = buf
        self.weights = bound

    def _load_prefill(self, cache, logits) -> None:
        """The prompt's keys, values and mask into the static buffers; the first token from its logits."""
        xp, s, T = self.xp, self.state, cache.length
        for i, (k, v) in enumerate(cache):  # (B, H, T, D) each
            s.k[i, :, :, :T] = k
            s.v[i, :, :, :T] = v
        s.kept[...] = 0
        s.kept[:, :T] = 1 if cache.mask is None else cache.mask
        s.pos[...] = cache.next_positions()  # each row's kept positions: left padding takes none
        s.slot[...] = T
        s.step[...] = 1
        first = xp.argmax(logits, axis=-1)  # (B,), as GPT.generate's first choice
        s.tok[...] = first
        s.out[:, 0] = first

    def _run(self, steps: int) -> None:
        if self.backend == "reference":
            for _ in range(steps):
                decode_step_reference(self.weights, self.state)
            return
        if steps == 0:
            return
        cp = self.xp
        if self._stream is None:
            self._stream = cp.cuda.Stream(non_blocking=True)  # capture needs a stream other than the legacy one
        stream, current = self._stream, cp.cuda.get_current_stream()
        ready = cp.cuda.Event()
        ready.record(current)  # the prefill and the weight copies were queued on the current stream
        stream.wait_event(ready)
        graph = self._capture(stream)
        for _ in range(steps):
            graph.launch(stream)
        done = cp.cuda.Event()
        done.record(stream)
        current.wait_event(done)  # whatever reads the tokens next runs after the replays (no host sync)

    def _capture(self, stream):
        """The step's graph: captured at the first call, and again only when a weight array changed."""
        key = tuple(_address(a) for a in self.weights.values() if a is not None)
        if self._graph is not None and key == self._graph_key:
            return self._graph
        from ..kernels import decode as kernels

        kernels.load()  # compile and load before the capture
        self._graph = None
        with stream:
            stream.begin_capture()
            try:
                decode_step(kernels, self.weights, self.state)  # recorded, not run
            finally:
                graph = stream.end_capture()
        self._graph, self._graph_key = graph, key
        return graph


_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its last GraphDecoder


def generate_graph(model, idx, max_new_tokens: int, attention_mask=None, greedy: bool = True,
                   backend: str = "cuda", **options):
    """``GPT.generate(idx, max_new_tokens, greedy=True, attention_mask=...)`` with the step in a CUDA graph.

    Returns (B, T + n) ids on the model's device. The decoder of ``model`` (buffers and graph)
    is kept for the next call with the same batch size. Sampling and ``generate``'s other
    options are refused: they need ``model.generate``.
    """
    if not greedy or options:
        what = sorted(options) + ([] if greedy else ["greedy=False (sampling)"])
        raise ValueError(f"generate_graph decodes greedily and takes no {what}; use model.generate(...) for them")
    gpt, reason = _decodable(model, backend)
    if reason:
        raise _refuse(reason)
    shape = np.shape(array_of(idx))
    if len(shape) != 2:
        raise ValueError(f"idx must be token ids of shape (B, T), got shape {shape} (one sequence: pass idx[None])")
    dec = _DECODERS.get(model)
    if dec is None or dec.batch_size != shape[0] or dec.backend != backend or dec.xp is not _xp_of_gpt(gpt):
        dec = GraphDecoder(model, shape[0], backend)
        _DECODERS[model] = dec
    return dec(idx, max_new_tokens, attention_mask)


__all__ = ["GraphDecoder", "generate_graph", "graph_decodable", "decode_step", "decode_step_reference",
           "gather_weights", "DecodeState", "Reference", "MAX_ROWS"]
