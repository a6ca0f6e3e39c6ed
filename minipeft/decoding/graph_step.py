"""The greedy decode step of :mod:`minipeft.decoding.graph`: its buffers, and the step itself with either
the CUDA kernels (``minipeft/kernels/decode.cu``) or their NumPy twins.

:class:`DecodeState` holds every array the step reads or writes, allocated once, so a CUDA graph
captured from one step can be replayed for the next token (the counters ``tok``, ``pos``,
``slot``, ``step`` live in device memory and the kernels advance them). :func:`decode_step` is
GPT-2's forward for one token per row (Radford et al. 2019) written as a few kinds of call on
``ops``: :class:`Reference` (NumPy, float32, the twin) or :mod:`minipeft.kernels.decode` (the
launchers, same arguments). ``tests/test_graph_decode.py`` checks that the two agree.

A Linear whose weights come with LoRA stacks (``<name>.lora_A`` (N, r, in), ``.lora_B``
(N, out, r), ``.lora_scales`` (N,): the multi-adapter server's layers, :mod:`minipeft.serve_graph`)
adds each row's own adapter, ``y_b = W x_b + b + s_j B_j A_j x_b`` with ``j = lora_slot[b]``
(Hu et al. 2021, eq. 3, one adapter per row as Punica's BGMV, Chen et al. 2023, Sec. 4), the term
added before GELU or the residual add, as ``serve_layers.MultiLoraLinear`` adds it to the base
Linear's output; ``tests/test_graph_serve.py`` checks those ops.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..backend import xp_of


# ------------------------------------------------------------------ the buffers


@dataclass
class DecodeState:
    """Every buffer the step reads or writes, allocated once; B rows, S = block_size cache slots."""

    n_head: int  # H
    eps: float  # LayerNorm epsilon
    tok: object  # (B,) int32: the token each row runs next
    pos: object  # (B,) int32: its position (kept positions before it)
    slot: object  # (1,) int32: the cache slot this step writes (the same for every row)
    step: object  # (1,) int32: the column of ``out`` that receives the next token
    kept: object  # (B, S) int32: 1 where a cached slot may be attended (0: left padding, or not yet written)
    out: object  # (B, S) int32: the generated tokens
    k: object  # (L, B, H, S, D) float32: the key cache
    v: object  # (L, B, H, S, D) float32: the value cache
    x: object  # (B, C): the residual stream
    h: object  # (B, C): a LayerNorm's output
    qkv: object  # (B, 3C): c_attn's output
    att: object  # (B, C): the heads' outputs, concatenated
    fc: object  # (B, 4C): mlp.c_fc's output after GELU
    logits: object  # (B, V)
    lora_slot: object = None  # (B,) int32: each row's adapter slot in the served layers' stacks (-1: none)
    lora_h: object = None  # (B, r) float32: a served layer's shrink A_j x, r its stacks' rank ((B, 0): none)

    @classmethod
    def allocate(cls, config, rows: int, xp, lora_rank: int = 0) -> "DecodeState":
        B, S, C, L, H = rows, config.block_size, config.n_embd, config.n_layer, config.n_head
        f, i = xp.float32, xp.int32
        return cls(n_head=H, eps=float(config.layer_norm_epsilon), tok=xp.zeros(B, i), pos=xp.zeros(B, i),
                   slot=xp.zeros(1, i), step=xp.zeros(1, i), kept=xp.zeros((B, S), i), out=xp.zeros((B, S), i),
                   k=xp.zeros((L, B, H, S, C // H), f), v=xp.zeros((L, B, H, S, C // H), f),
                   x=xp.zeros((B, C), f), h=xp.zeros((B, C), f), qkv=xp.zeros((B, 3 * C), f),
                   att=xp.zeros((B, C), f), fc=xp.zeros((B, config.d_ff), f),
                   logits=xp.zeros((B, config.vocab_size), f), lora_slot=xp.full(B, -1, i),
                   lora_h=xp.zeros((B, lora_rank), f))


# ------------------------------------------------------------------ the step and its twin


class Reference:
    """The NumPy twin of each kernel of ``decode.cu``: the launchers' arguments, the result written
    into the last array argument, float32 throughout (``xp``-generic: it runs on CuPy too)."""

    @staticmethod
    def embed(tok, pos, wte, wpe, x) -> None:
        x[...] = wte[tok] + wpe[pos]  # (B, C)

    @staticmethod
    def layernorm(x, weight, bias, eps, y) -> None:
        xp = xp_of(x)
        d = x - x.mean(axis=-1, keepdims=True)  # (B, C)
        var = (d * d).mean(axis=-1, keepdims=True)  # (B, 1)
        y[...] = d * (np.float32(1.0) / xp.sqrt(var + np.float32(eps))) * weight + bias

    @staticmethod
    def gemv(x, weight, bias, y, epilogue="none") -> None:
        Reference._gemv(x, weight, bias, y, epilogue, None)

    @staticmethod
    def _gemv(x, weight, bias, y, epilogue, lora) -> None:
        xp = xp_of(x)
        v = x @ weight.T  # (B, out)
        if bias is not None:
            v = v + bias
        if lora is not None:  # (B, out): each row's LoRA term, before the epilogue (gemv_lora)
            v = v + lora
        if epilogue == "gelu":  # GPT-2's tanh form
            v = np.float32(0.5) * v * (np.float32(1.0) + xp.tanh(np.float32(math.sqrt(2.0 / math.pi)) * (
                v + np.float32(0.044715) * v * v * v)))
        elif epilogue == "residual":
            v = y + v
        y[...] = v

    @staticmethod
    def lora_shrink(x, lora_A, slot, u) -> None:
        xp = xp_of(x)
        keep = slot >= 0  # (B,): rows with an adapter
        A = lora_A[xp.where(keep, slot, 0)]  # (B, r, in): each row's A_j
        v = xp.matmul(A, x[:, :, None])[:, :, 0]  # (B, r)
        u[...] = xp.where(keep[:, None], v, np.float32(0.0))

    @staticmethod
    def gemv_lora(x, weight, bias, u, lora_B, scales, slot, y, epilogue="none") -> None:
        xp = xp_of(x)
        keep = slot >= 0
        j = xp.where(keep, slot, 0)
        delta = xp.matmul(lora_B[j], u[:, :, None])[:, :, 0]  # (B, out): B_j u_b
        lora = xp.where(keep[:, None], scales[j][:, None] * delta, np.float32(0.0))  # s_j B_j A_j x_b, 0 for none
        Reference._gemv(x, weight, bias, y, epilogue, lora)

    @staticmethod
    def attend(qkv, k_cache, v_cache, kept, slot, out, n_head) -> None:
        xp = xp_of(qkv)
        B, H, S, D = k_cache.shape
        C, s = H * D, int(slot[0])
        q = qkv[:, :C].reshape(B, H, D)  # GPT-2's order: q, k, v; head h = columns h*D:(h+1)*D
        k_cache[:, :, s] = qkv[:, C:2 * C].reshape(B, H, D)
        v_cache[:, :, s] = qkv[:, 2 * C:].reshape(B, H, D)
        scores = xp.einsum("bhd,bhjd->bhj", q, k_cache[:, :, :s + 1]) * np.float32(1.0 / math.sqrt(D))  # (B, H, s+1)
        keep = kept[:, :s + 1] != 0  # (B, s+1)
        keep[:, s] = True  # this step's own slot
        scores = xp.where(keep[:, None, :], scores, np.float32(-np.inf))
        p = xp.exp(scores - scores.max(axis=-1, keepdims=True))
        y = xp.einsum("bhj,bhjd->bhd", p, v_cache[:, :, :s + 1]) / p.sum(axis=-1)[..., None]  # (B, H, D)
        out[...] = y.reshape(B, C)

    @staticmethod
    def argmax(logits, tok, out, step) -> None:
        t = logits.argmax(axis=-1)  # (B,), the first of equal maxima
        tok[...] = t
        out[:, int(step[0])] = t

    @staticmethod
    def advance(pos, slot, step, kept) -> None:
        kept[:, int(slot[0])] = 1
        pos += 1
        slot += 1
        step += 1


def decode_step(ops, weights: dict, state: DecodeState) -> None:
    """One greedy step of every row: run ``state.tok`` at ``state.pos``, choose the next token.

    ``ops``: :class:`Reference` (the twin) or :mod:`minipeft.kernels.decode` (the kernels,
    captured into the graph); ``weights`` by GPT-2 name (:func:`gather_weights`).
    """
    w, s = weights, state
    ops.embed(s.tok, s.pos, w["transformer.wte.weight"], w["transformer.wpe.weight"], s.x)  # (B, C)
    for i in range(s.k.shape[0]):
        p = f"transformer.h.{i}."
        ops.layernorm(s.x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], s.eps, s.h)
        linear(ops, w, s, p + "attn.c_attn", s.h, s.qkv)  # (B, 3C)
        ops.attend(s.qkv, s.k[i], s.v[i], s.kept, s.slot, s.att, s.n_head)  # (B, C)
        linear(ops, w, s, p + "attn.c_proj", s.att, s.x, "residual")  # x += ...
        ops.layernorm(s.x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], s.eps, s.h)
        linear(ops, w, s, p + "mlp.c_fc", s.h, s.fc, "gelu")  # (B, 4C)
        linear(ops, w, s, p + "mlp.c_proj", s.fc, s.x, "residual")  # x += ...
    ops.layernorm(s.x, w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], s.eps, s.h)
    linear(ops, w, s, "lm_head", s.h, s.logits)  # (B, V)
    ops.argmax(s.logits, s.tok, s.out, s.step)
    ops.advance(s.pos, s.slot, s.step, s.kept)  # last: after every reader of the counters


def linear(ops, w: dict, s: DecodeState, name: str, x, y, epilogue: str = "none") -> None:
    """The Linear ``name``: one GEMV, or, for a served Linear (``name.lora_A`` among the weights), each row's
    LoRA term too: the shrink ``lora_h = A_j x`` and the GEMV that adds ``s_j B_j lora_h`` before its epilogue."""
    if name + ".lora_A" not in w:
        ops.gemv(x, w[name + ".weight"], w[name + ".bias"], y, epilogue)
        return
    ops.lora_shrink(x, w[name + ".lora_A"], s.lora_slot, s.lora_h)  # (B, r)
    ops.gemv_lora(x, w[name + ".weight"], w[name + ".bias"], s.lora_h, w[name + ".lora_B"],
                  w[name + ".lora_scales"], s.lora_slot, y, epilogue)


def decode_step_reference(weights: dict, state: DecodeState) -> None:
    """:func:`decode_step` with the NumPy twins: exactly what the captured kernels do."""
    decode_step(Reference, weights, state)
