"""Gradient checkpointing: keep each block's input, recompute the block in backward.

Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost": a network of L blocks
normally keeps every block's activations for backward, O(L) blocks' worth. Checkpointing
keeps only each block's *input* (one (B, T, C) array), runs the block's forward without a
graph, and, when backward reaches the block, runs its forward again with a graph and
backpropagates through that. The saved bytes become

    L inputs + one block's activations (the one being recomputed)

instead of L blocks' activations, for the price of a second forward of every block
(about a third more compute). ``transformers`` calls it ``gradient_checkpointing_enable()``
(torch.utils.checkpoint underneath); so does minipeft's ``GPT``.

The recomputed forward must be the same computation as the first one, dropout included:
``checkpoint`` snapshots the engine's random generator (``minipeft.random``) before the
block's forward, sets it back to that snapshot for the recompute, then restores the state
the generator had reached, so the masks are redrawn identically and the rest of training
sees the random stream it would have seen without checkpointing. Gradients are therefore
the very same numbers as the plain backward's. A snapshot is kept only by a block that drew
random numbers: on the CPU it is PCG64's few words, on CUDA a copy of CuPy's cuRAND states
(XORWOW: 32,768 states of 48 bytes in CuPy's default generator, about 1.5 MB), held per block
until its backward and not in the ledger of saved bytes; PyTorch's Philox generator needs only
a seed and an offset, which is why torch.utils.checkpoint's snapshot is free. So is the precision: a block that ran
under ``amp.autocast`` is recomputed under it.

Every tensor the block reads that may need a gradient must be passed to ``checkpoint``:
its input, extra tensors (prefix tuning's keys and values) and its parameters. The
recompute makes them fresh leaves and asks ``engine.grad`` for their gradients, which
the outer graph then routes as it would any op's.
"""
from __future__ import annotations

import contextlib

from . import amp
from . import random as mp_random
from .backend import device_of
from .engine import Function, Tensor, enable_grad, grad, no_grad


# ------------------------------------------------------------------ the random stream


def rng_state(device: str):
    """A copy of the engine's generator state for ``device`` (NumPy: its bit generator's
    state dict; CuPy: a copy of the cuRAND states array its bit generator keeps)."""
    bits = mp_random.generator(device).bit_generator
    if device == "cpu":
        return bits.state
    return bits._state.copy()  # cupy.random.XORWOW keeps its cuRAND states in this device array


def rng_unchanged(device: str, state) -> bool:
    """Whether the engine's generator still has the state :func:`rng_state` took (nothing drawn since)."""
    bits = mp_random.generator(device).bit_generator
    if device == "cpu":
        return bits.state == state
    return bool((bits._state == state).all())


def set_rng_state(device: str, state) -> None:
    """Put a state taken by :func:`rng_state` back into the engine's generator."""
    bits = mp_random.generator(device).bit_generator
    if device == "cpu":
        bits.state = state
    else:
        bits._state[...] = state  # in place: the generator keeps a pointer to this array


# ---------------------------------------------------------------------- the Function


class Checkpoint(Function):
    """y = run(x, *extras) whose backward recomputes ``run`` (inputs: x, extras, params).

    forward keeps x (and the extras) only; the graph of ``run`` exists only inside
    backward, one block at a time.
    """

    @staticmethod
    def forward(ctx, x, *arrays, run, n_extra: int, params: tuple):
        device = device_of(x)
        ctx.run, ctx.n_extra, ctx.params, ctx.device = run, n_extra, params, device
        ctx.rng = rng_state(device)  # dropout's masks are redrawn from here
        ctx.autocast = amp._autocast[-1] if amp._autocast else None  # 16-bit products are redone in 16 bits
        ctx.save_for_backward(x, *arrays[:n_extra])  # the block's input: all this block keeps
        with no_grad():
            y = run(Tensor(x), *(Tensor(a) for a in arrays[:n_extra]))
        if rng_unchanged(device, ctx.rng):  # the block drew nothing (no dropout): nothing to replay
            ctx.rng = None
        return y.data  # (B, T, C)

    @staticmethod
    def backward(ctx, g):
        x, *extras = ctx.saved_tensors
        needs = ctx.needs_input_grad
        leaves = [Tensor(x, requires_grad=needs[0])]  # fresh leaves: the recompute's graph ends here
        leaves += [Tensor(a, requires_grad=n) for a, n in zip(extras, needs[1:1 + ctx.n_extra])]
        params = [p for p in ctx.params if p.requires_grad]
        now = None if ctx.rng is None else rng_state(ctx.device)
        if ctx.rng is not None:
            set_rng_state(ctx.device, ctx.rng)  # replay the forward's random draws (dropout)
        try:
            with enable_grad(), (amp.autocast(ctx.autocast) if ctx.autocast else contextlib.nullcontext()):
                y = ctx.run(*leaves)  # the block again, this time with a graph
        finally:
            if now is not None:
                set_rng_state(ctx.device, now)  # the stream continues where training left it
            ctx.rng = None
        wanted = [t for t in leaves if t.requires_grad] + params
        grads = iter(grad(y, wanted, g))
        out = [next(grads) if t.requires_grad else None for t in leaves]
        by_param = {id(p): next(grads) for p in params}
        out += [by_param.get(id(p)) for p in ctx.params]
        return tuple(out)


def checkpoint(run, x: Tensor, *extras, params=()) -> Tensor:
    """``run(x, *extras)`` keeping only its inputs for backward, recomputed there.

    ``run``: a function of Tensors returning one Tensor (a transformer block's hidden
    state). ``extras``: further Tensors it reads (or None). ``params``: every parameter
    it uses (``block.parameters()``); frozen ones are skipped. Outside a graph (no
    gradient needed, or under ``no_grad``) this is just ``run(x, *extras)``.
    """
    present = [e for e in extras if e is not None]
    slots = [e is not None for e in extras]

    def run_arrays(x_t, *given):  # put the None extras back where run expects them
        it = iter(given)
        return run(x_t, *(next(it) if s else None for s in slots))

    trainable = tuple(p for p in params if p.requires_grad)
    return Checkpoint.apply(x, *present, *trainable, run=run_arrays, n_extra=len(present), params=trainable)


__all__ = ["checkpoint", "Checkpoint", "rng_state", "rng_unchanged", "set_rng_state"]
