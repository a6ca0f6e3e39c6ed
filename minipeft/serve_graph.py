"""The multi-adapter server's greedy decoding with the whole step in a CUDA graph.

LoRA served unmerged, one adapter per row (Hu et al. 2021, arXiv 2106.09685, eq. 3)::

    h_b = W0 x_b + b0 + s_j B_j A_j x_b        j = the adapter slot of row b (none: the base alone)

Punica (Chen et al. 2023, arXiv 2310.18547, Sec. 4) runs the base product once for the batch
and gathers only the LoRA part per row (BGMV); S-LoRA (Sheng et al. 2023, arXiv 2311.03285,
Sec. 4) keeps every adapter in host memory and only the active ones on the GPU (here: the slots
of the served layers' stacks). :class:`ServedGraphDecoder` is
:class:`~minipeft.decoding.graph.GraphDecoder` over a :class:`~minipeft.serve.LoraServer`'s
model: each served Linear (:class:`~minipeft.serve_layers.MultiLoraLinear`) runs in the captured
step as its base weight's GEMV plus BGMV in two kernels of ``minipeft/kernels/decode.cu``:
``lora_shrink`` (``u_b = A_j x_b``) and ``gemv_lora_rows`` (the GEMV that adds ``s_j B_j u_b``
before GELU or the residual add, where ``MultiLoraLinear`` adds it to the base output). They
read the server's own stacks ``lora_A[0]`` (N, r, in), ``lora_B[0]`` (N, out, r), ``scales[0]``
(N,) and each row's slot from device memory (``DecodeState.lora_slot``, written before the
replays). ``MultiLoraLinear.set_slot`` writes an adapter into the stacks in place, so the
captured graph, which holds their addresses, serves every later wave whatever adapters its
rows use; it is captured again only when an address changes (``model.to(...)``).

:class:`GraphWaves` is the server's side: whether its waves can run so (:meth:`GraphWaves.reason`:
``ServeConfig.graph_decode``, one rank class, float32 ``Linear`` bases, the GPU kernels allowed,
the model checks of :func:`~minipeft.decoding.graph.graph_decodable`), and one wave decoded in
groups of at most ``MAX_ROWS`` rows, each by the decoder of its row count, kept for later waves
(its buffers, the key/value cache (L, B, H, block_size, D) included, and its graph). Each group
pays its own prefill and reads every weight once per step, so the server sends waves of more
than ``ServeConfig.graph_max_rows`` rows to the loop, which steps all of them in one batch. The
prompts run through the ordinary forward (SGMV in the served layers, as in the loop); a group whose rows
have all emitted ``eos_token_id`` stops within ``EOS_CHECK`` tokens; after a row's first eos its
tokens are eos, as :func:`minipeft.serve.greedy_batch` returns them. The same tokens as the loop
(up to float32 rounding in a near-tie): ``tests/test_graph_serve.py``.
"""
from __future__ import annotations

import time

import numpy as np

from . import fast
from .backend import synchronize, to_numpy, xp_of
from .decoding.batch import left_pad
from .decoding.graph import MAX_ROWS, GraphDecoder, gather_weights
from .nn import Linear
from .serve_layers import MultiLoraLinear

EOS_CHECK = 16  # replays between two looks (one host sync) at whether every row of a group has emitted eos


def served_layers(gpt) -> list:
    """``(name, MultiLoraLinear)`` of every served Linear of ``gpt``, by its GPT-2 name."""
    return [(n, m) for n, m in gpt.named_modules() if isinstance(m, MultiLoraLinear)]


def _base_weights(m):
    """A served Linear's base ``(weight, bias, merged=False)``; None for another module (the default)."""
    if not isinstance(m, MultiLoraLinear):
        return None
    base = m.base_layer
    return base.weight.data, (None if base.bias is None else base.bias.data), False


class ServedGraphDecoder(GraphDecoder):
    """:class:`GraphDecoder` of a LoraServer's model: every row gets its own adapter in each served Linear.

    ``decoder.decode(prompts, slots, n, eos_token_id=None, timing=None)`` returns (B, n) host ids:
    the rows' prompts (1-D, any lengths, left-padded here) each continued greedily with the
    adapter in ``slots[b]`` (-1: the base alone). The caller sets the server's ``BatchContext``
    to the same slots for the prefill. One rank class only (the step reads one stack per layer).
    """

    _eos = None  # the call's eos_token_id (decode sets it)
    _timing = None  # the call's timing dict, or None
    _t0 = 0.0
    _ran = 0  # replays of the last call

    @staticmethod
    def module_reason(name, m):
        if isinstance(m, MultiLoraLinear):
            ranks = m.classes.ranks
            if len(ranks) != 1:
                return (f"{name} holds adapters in {len(ranks)} rank classes {ranks}; the graph's step reads one "
                        "stack per layer (ServeConfig.rank_classes=None pads every rank to max_rank)")
            if type(m.base_layer) is not Linear:
                return (f"{name} serves LoRA on a {type(m.base_layer).__name__} (a quantized base?), "
                        "not on a float32 Linear")
            return None
        return GraphDecoder.module_reason(name, m)

    def _lora_rank(self, gpt) -> int:
        layers = served_layers(gpt)
        return layers[0][1].classes.ranks[0] if layers else 0

    def _gather(self, gpt) -> tuple[dict, set]:
        weights, merged = gather_weights(gpt, _base_weights)
        for name, m in served_layers(gpt):  # the server's stacks themselves: set_slot writes them in place
            weights[name + ".lora_A"], weights[name + ".lora_B"], weights[name + ".lora_scales"] = \
                m.lora_A[0], m.lora_B[0], m.scales[0]
        return weights, merged

    def decode(self, prompts: list, slots, max_new_tokens: int, eos_token_id: int | None = None,
               timing: dict | None = None) -> np.ndarray:
        """(B, n) host ids: greedy continuations of ``prompts``, row b with the adapter in slot ``slots[b]``.

        ``timing`` (a dict) accumulates prefill_s, decode_s, prefill_tokens, decode_tokens as
        the loop's :func:`minipeft.decoding.run` counts them (decode tokens: rows x replays).
        """
        slots = np.asarray(slots, np.int64)
        layers = served_layers(self.model)
        n_slots = layers[0][1].classes.counts[0] if layers else 0
        if len(prompts) != self.batch_size or slots.shape != (self.batch_size,) \
                or not ((slots >= -1) & (slots < n_slots)).all():
            raise ValueError(f"this decoder takes {self.batch_size} prompts and as many slots in [-1, {n_slots}); "
                             f"got {len(prompts)} prompts and slots {slots.tolist()}")
        idx, mask = left_pad(prompts)
        self.state.lora_slot[...] = self.xp.asarray(slots.astype(np.int32))
        self._eos, self._timing, self._ran = eos_token_id, timing, 0
        if timing is not None:
            synchronize("cpu" if self.xp is np else "cuda")
            self._t0 = time.perf_counter()
        try:
            new = to_numpy(self(idx, max_new_tokens, mask)[:, idx.shape[1]:]).astype(np.int64)  # (B, n)
        finally:
            self._timing = None
        if timing is not None:
            timing["prefill_tokens"] = timing.get("prefill_tokens", 0) + int(mask.sum())
            timing["decode_tokens"] = timing.get("decode_tokens", 0) + self._ran * self.batch_size
        if eos_token_id is not None:  # after its first eos a row keeps emitting it (serve.greedy_batch)
            after = np.zeros(new.shape, bool)
            after[:, 1:] = np.cumsum(new == eos_token_id, axis=1)[:, :-1] > 0  # past the row's first eos
            new[after] = eos_token_id
        return new

    def _run(self, steps: int) -> None:
        """The replays, in bursts of ``EOS_CHECK`` when an eos may end every row first; timed when asked."""
        timing, device = self._timing, "cpu" if self.xp is np else "cuda"
        if timing is not None:
            synchronize(device)  # the prefill's work is done
            now = time.perf_counter()
            timing["prefill_s"] = timing.get("prefill_s", 0) + now - self._t0
            self._t0 = now
        eos, s, done = self._eos, self.state, 0
        if eos is None:
            super()._run(steps)
            done = steps
        else:
            while done < steps and not bool((s.out[:, :done + 1] == eos).any(axis=1).all()):
                k = min(EOS_CHECK, steps - done)
                super()._run(k)
                done += k
            s.out[:, done + 1:steps + 1] = eos  # every row ended: the columns not run are eos
        self._ran = done
        if timing is not None:
            synchronize(device)
            timing["decode_s"] = timing.get("decode_s", 0) + time.perf_counter() - self._t0


class GraphWaves:
    """A LoraServer's greedy waves through :class:`ServedGraphDecoder`s, one per row count, kept between waves."""

    def __init__(self, model, ctx, config) -> None:
        self.model, self.ctx, self.config = model, ctx, config
        self.decoders: dict[int, ServedGraphDecoder] = {}  # rows -> its decoder (buffers, cache, graph)

    def reason(self) -> str | None:
        """None when the server's waves decode through the graph; else why they run the Python loop."""
        cfg = self.config
        if not cfg.graph_decode:
            return "ServeConfig.graph_decode is False"
        if cfg.graph_backend == "cuda" and not (cfg.use_kernels and fast.enabled()):
            return ("the GPU kernels are turned off (ServeConfig.use_kernels=False or MINIPEFT_KERNELS=0), and the "
                    "graph's step is made of them")
        gpt, reason = ServedGraphDecoder.decodable(self.model, cfg.graph_backend)
        if reason and gpt is not None and cfg.graph_backend == "cuda":  # the checks passed but for the device
            reason = ("the model is on the CPU (server.model.to('cuda') moves it with its adapter slots; "
                      "ServeConfig(graph_backend='reference') runs the graph's NumPy twin)")
        return reason

    def generate(self, prompts: list, slots, max_new_tokens: list, eos_token_id: int | None = None,
                 timing: dict | None = None) -> list:
        """Each row's new ids (host, ``max(max_new_tokens)`` of its group of ``MAX_ROWS`` rows), in order.

        ``slots`` (R,): each row's global slot (-1: the base); ``max_new_tokens`` (R,): each row's
        budget (a group runs its largest).
        """
        xp = xp_of(self.model.transformer.wte.weight.data)
        slots, out = np.asarray(slots, np.int64), []
        for g in range(0, len(prompts), MAX_ROWS):
            part = slice(g, g + MAX_ROWS)
            dec = self._decoder(len(prompts[part]), xp)
            self.ctx.set(slots[part], xp)  # the prefill's SGMV in the served layers
            try:  # one rank class: a slot's local index in its stack is the slot itself
                out.extend(dec.decode(prompts[part], slots[part], int(max(max_new_tokens[part])), eos_token_id,
                                      timing))
            finally:
                self.ctx.clear()
        return out

    def _decoder(self, rows: int, xp) -> ServedGraphDecoder:
        dec = self.decoders.get(rows)
        if dec is None or dec.backend != self.config.graph_backend or dec.xp is not xp:
            dec = self.decoders[rows] = ServedGraphDecoder(self.model, rows, self.config.graph_backend)
        return dec


__all__ = ["ServedGraphDecoder", "GraphWaves", "served_layers", "EOS_CHECK"]
