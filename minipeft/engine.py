"""A tiny reverse-mode autograd engine: ``Tensor`` + ``Function`` with a context.

The design follows micrograd and minitorch, with PyTorch's names:

* A ``Function`` has ``forward(ctx, *arrays, **kw) -> array`` and
  ``backward(ctx, grad) -> tuple`` (one gradient per positional input, ``None`` where
  there is none). The forward and backward of each op sit side by side in
  ``minipeft/ops/``; ``minipeft/functional.py`` re-exports them and attaches them to
  ``Tensor`` as its operators (``+``, ``@``, ``x[i]``, ``.sum()`` ...). This file imports
  no ops.
* ``Function.apply`` is the one place where a *fast path* may take an op's place: it asks
  :func:`minipeft.fast.choose` which Function runs these arrays (the op itself, or, say,
  a fused CUDA kernel registered for float32 CuPy arrays), and records that one in the
  graph, so its own backward runs.
* ``ctx.save_for_backward(*arrays)`` is the only way to keep an array for backward. The
  engine counts those bytes, so a lesson can print how much memory training holds for
  backward, now and at peak (``saved_bytes()``, ``peak_saved_bytes()``). Arrays that
  belong to leaf tensors (parameters, frozen weights, inputs) are not activations and
  are not counted; each buffer is counted once however many ops keep it.
* ``ctx.needs_input_grad[i]`` says whether input ``i`` needs a gradient. A frozen
  weight (``requires_grad=False``) gets no gradient, and a ``Function`` can skip both
  the gradient compute and the saving of what only that gradient needs. This is
  where LoRA's savings come from.
* Under ``no_grad()`` no graph is recorded and nothing is saved.
* ``leaf.register_post_accumulate_grad_hook(fn)`` (PyTorch's name) calls ``fn(leaf)`` right
  after ``backward()`` has written the leaf's ``.grad``: its gradient for this backward is
  final then. Data parallelism starts reducing a bucket of gradients from there while backward
  goes on through earlier layers (``minipeft/distributed/data_parallel.py``).

Backends: ``Tensor.data`` is a NumPy or CuPy array; ops ask ``xp_of(array)``.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any

import numpy as np

from . import fast
from .backend import device_of, to_device, to_numpy, xp_of

# --------------------------------------------------------------------------- state

_state = threading.local()


def _grad_enabled() -> bool:
    return getattr(_state, "grad_enabled", True)


@contextlib.contextmanager
def no_grad():
    """Run a block without recording a graph (inference, frozen backbones)."""
    prev = _grad_enabled()
    _state.grad_enabled = False
    try:
        yield
    finally:
        _state.grad_enabled = prev


@contextlib.contextmanager
def enable_grad():
    """Re-enable graph recording inside a ``no_grad`` block."""
    prev = _grad_enabled()
    _state.grad_enabled = True
    try:
        yield
    finally:
        _state.grad_enabled = prev


def is_grad_enabled() -> bool:
    return _grad_enabled()


# ------------------------------------------------------ saved-for-backward accounting


def _buffer_key(a) -> tuple[int, int]:
    """(identity of the memory that backs ``a``, its size in bytes)."""
    base = a
    while getattr(base, "base", None) is not None:
        base = base.base
    if hasattr(base, "nbytes"):
        return id(base), int(base.nbytes)
    return id(base), int(np.asarray(base).nbytes)


class _SavedLedger:
    """Counts the bytes held for backward; each buffer once, released with its graph."""

    def __init__(self) -> None:
        self.refs: dict[int, list] = {}  # buffer id -> [nbytes, refcount]
        self.current = 0
        self.peak = 0

    def add(self, key: int, nbytes: int) -> None:
        entry = self.refs.get(key)
        if entry is None:
            self.refs[key] = [nbytes, 1]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        else:
            entry[1] += 1

    def remove(self, key: int) -> None:
        entry = self.refs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.refs[key]


_ledger = _SavedLedger()


def saved_bytes() -> int:
    """Bytes currently held for backward by live graphs."""
    return _ledger.current


def peak_saved_bytes() -> int:
    """Largest ``saved_bytes()`` since the last ``reset_peak_saved_bytes()``."""
    return _ledger.peak


def reset_peak_saved_bytes() -> None:
    _ledger.peak = _ledger.current


# ------------------------------------------------------------------------ Context


class Context:
    """What a ``Function`` keeps between its forward and backward."""

    def __init__(self, needs_input_grad: tuple[bool, ...], leaf_ids: frozenset, record: bool):
        self.needs_input_grad = needs_input_grad
        self._leaf_ids = leaf_ids
        self._record = record
        self._keys: list[int] = []
        self.saved_tensors: tuple = ()

    def save_for_backward(self, *arrays) -> None:
        """Keep arrays for backward; activations among them are counted by the engine."""
        if not self._record:
            return
        self.saved_tensors = arrays
        for a in arrays:
            if a is None or not hasattr(a, "shape") or id(a) in self._leaf_ids:
                continue
            key, nbytes = _buffer_key(a)
            if key in self._leaf_ids:
                continue
            _ledger.add(key, nbytes)
            self._keys.append(key)

    def release(self) -> None:
        """Drop saved arrays (after backward, or when the graph dies)."""
        for key in self._keys:
            _ledger.remove(key)
        self._keys = []
        self.saved_tensors = ()

    def __del__(self):  # the graph was dropped without calling backward
        try:
            self.release()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


class Function:
    """Base class of every differentiable op. Subclasses write two static methods."""

    @staticmethod
    def forward(ctx: Context, *args: Any, **kwargs: Any):  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def backward(ctx: Context, grad):  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def apply(cls, *args: Any, **kwargs: Any) -> "Tensor":
        arrays = [a.data if isinstance(a, Tensor) else a for a in args]
        needs = tuple(isinstance(a, Tensor) and a.requires_grad for a in args)
        record = _grad_enabled() and any(needs)
        leaf_ids = frozenset(
            key
            for a in args
            if isinstance(a, Tensor) and a._ctx is None
            for key in (id(a.data), _buffer_key(a.data)[0])
        ) if record else frozenset()
        ctx = Context(needs if record else tuple(False for _ in args), leaf_ids, record)
        fn = fast.choose(cls, *arrays, **kwargs)  # cls itself, or a fast path registered for these arrays
        out = fn.forward(ctx, *arrays, **kwargs)
        result = Tensor(out, requires_grad=record)
        if record:
            # parents: a leaf that requires grad is kept (it receives .grad); a non-leaf is
            # represented by its _Node only, so its output array can be freed unless saved
            parents = tuple(
                (a if a._ctx is None else a._ctx) if isinstance(a, Tensor) and a.requires_grad else None
                for a in args
            )
            result._ctx = _Node(fn, ctx, parents, result.shape)
        return result


class _HookHandle:
    """What ``register_post_accumulate_grad_hook`` returns: ``remove()`` takes the hook away."""

    _next_id = 0

    def __init__(self, hooks: dict):
        self.hooks, self.id = hooks, _HookHandle._next_id
        _HookHandle._next_id += 1

    def remove(self) -> None:
        self.hooks.pop(self.id, None)


class _Node:
    """The graph's record of how a non-leaf tensor was made: its Function, context and
    parents (leaf Tensors or other _Nodes), but not its data. Holding the graph therefore
    holds only what ``save_for_backward`` kept (and the leaves), as the ledger says."""

    __slots__ = ("fn", "ctx", "parents", "shape", "freed")
    requires_grad = True

    def __init__(self, fn, ctx: Context, parents: tuple, shape: tuple):
        self.fn, self.ctx, self.parents, self.shape, self.freed = fn, ctx, parents, shape, False

    def free(self) -> None:
        self.ctx.release()
        self.parents = ()
        self.freed = True


# -------------------------------------------------------------------------- Tensor


class Tensor:
    """An n-dimensional array that remembers how it was made.

    ``data``: the NumPy/CuPy array. ``grad``: an array of the same shape after
    ``backward()`` (leaf tensors that require grad only). ``requires_grad``: whether
    gradients flow to it. Its operators (``+ - * / ** @``, ``x[i]``, ``.sum()``,
    ``.mean()``, ``.max()``, ``.reshape()``, ``.transpose()``, ``.T``, ``.exp()``,
    ``.log()``, ``.tanh()``, ``.astype()``) are the ops of ``minipeft/ops``, attached to
    this class by :mod:`minipeft.functional`.
    """

    __array_priority__ = 1000  # so ndarray + Tensor calls Tensor.__radd__

    def __init__(self, data, requires_grad: bool = False, dtype=None):
        if isinstance(data, Tensor):
            data = data.data
        if not hasattr(data, "shape") or not hasattr(data, "dtype"):
            data = np.asarray(data, dtype=dtype if dtype is not None else None)
            if dtype is None and data.dtype == np.float64:
                data = data.astype(np.float32)  # Python floats become float32
        elif dtype is not None and data.dtype != dtype:
            data = data.astype(dtype)
        if isinstance(data, np.generic):  # NumPy reductions return scalars: keep an array
            data = np.asarray(data)
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._ctx = None  # _Node (Function, Context, parents) for non-leaves
        self._grad_hooks: dict[int, Any] | None = None  # post-accumulate-grad hooks by handle id (made on first use)
        # ml_dtypes' bfloat16 (a 16-bit autocast's logits on the GPU) is no np.floating subtype: named here
        floating = np.issubdtype(data.dtype, np.floating) or data.dtype.name == "bfloat16"
        if self.requires_grad and not floating:
            raise TypeError(f"only floating tensors can require grad, got dtype {data.dtype}")

    # ---- basic properties
    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return int(self.data.size)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def device(self) -> str:
        return device_of(self.data)

    @property
    def is_leaf(self) -> bool:
        return self._ctx is None

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        g = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, device={self.device}{g})"

    def numpy(self) -> np.ndarray:
        return to_numpy(self.data)

    def item(self) -> float:
        return float(to_numpy(self.data).reshape(-1)[0]) if self.size == 1 else _not_scalar(self)

    def detach(self) -> "Tensor":
        """Same data, cut from the graph."""
        return Tensor(self.data, requires_grad=False)

    def to(self, device: str) -> "Tensor":
        t = Tensor(to_device(self.data, device), requires_grad=self.requires_grad)
        return t

    def zero_grad(self) -> None:
        self.grad = None

    # ---- autograd
    def register_post_accumulate_grad_hook(self, fn) -> "_HookHandle":
        """Call ``fn(self)`` each time ``backward()`` has written this leaf's ``.grad``.

        ``backward()`` visits a leaf after every op that used it, so ``.grad`` then holds this
        backward's whole contribution (a weight used twice, like GPT-2's tied ``wte``, once).
        Not called when a backward does not reach the leaf, nor by ``engine.grad``. Returns a
        handle whose ``remove()`` unregisters ``fn``.
        """
        if self._ctx is not None or not self.requires_grad:
            raise RuntimeError("register_post_accumulate_grad_hook: only a leaf tensor that requires grad "
                               f"receives .grad; this one is {'not a leaf' if self._ctx is not None else 'frozen'}")
        if self._grad_hooks is None:
            self._grad_hooks = {}  # in registration order
        handle = _HookHandle(self._grad_hooks)
        self._grad_hooks[handle.id] = fn
        return handle

    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad`` that requires grad."""
        if not self.requires_grad:
            raise RuntimeError(
                "backward() on a tensor that does not require grad: no parameter in its graph "
                "has requires_grad=True (is everything frozen, or did it run under no_grad()?)"
            )
        xp = xp_of(self.data)
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a scalar, got shape {self.shape}")
            grad = xp.ones_like(self.data)
        else:
            grad = xp.asarray(grad.data if isinstance(grad, Tensor) else grad, dtype=self.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"backward(grad): grad has shape {grad.shape} but the tensor has {self.shape}")
        _backpropagate(self, grad, retain_graph, _accumulate_into_grad)


def _accumulate_into_grad(leaf: Tensor, g) -> None:
    """backward()'s sink: add a leaf's gradient into its ``.grad``."""
    if isinstance(g, np.generic):
        g = np.asarray(g)
    # copy: g may be shared with another leaf or the caller (in-place safe)
    leaf.grad = g.copy() if leaf.grad is None else leaf.grad + g
    if leaf._grad_hooks:
        for hook in list(leaf._grad_hooks.values()):  # .grad is final for this backward
            hook(leaf)


def _backpropagate(output: Tensor, grad, retain_graph: bool, sink) -> None:
    """Walk the graph of ``output`` in reverse topological order; ``sink(leaf, g)`` receives
    each leaf's gradient (``backward`` adds it into ``.grad``, ``grad`` collects it)."""
    root = output if output._ctx is None else output._ctx
    order = _topological_order(root)
    grads: dict[int, Any] = {id(root): grad}
    for node in order:
        g = grads.pop(id(node), None)
        if g is None:
            continue
        if isinstance(node, Tensor):  # a leaf
            if node.requires_grad:
                sink(node, g)
            continue
        if node.freed:
            raise RuntimeError(
                f"backward through a graph that was already freed (at {node.fn.__name__}): "
                "its saved arrays were released by an earlier backward(); pass "
                "retain_graph=True to the first backward to go through it twice"
            )
        fn, ctx, parents = node.fn, node.ctx, node.parents
        in_grads = fn.backward(ctx, g)
        if not isinstance(in_grads, tuple):
            in_grads = (in_grads,)
        if not retain_graph:
            node.free()
        for p, pg in zip(parents, in_grads):
            if p is None or pg is None or not p.requires_grad:
                continue
            if pg.shape != p.shape:
                raise RuntimeError(
                    f"{fn.__name__}.backward returned shape {pg.shape} for input of shape {p.shape}"
                )
            prev = grads.get(id(p))
            grads[id(p)] = pg if prev is None else prev + pg


def grad(output: Tensor, inputs, grad_output) -> tuple:
    """Gradients of ``output`` with respect to the leaf tensors ``inputs``, returned rather
    than added into their ``.grad`` (PyTorch's ``torch.autograd.grad``). ``grad_output`` is
    dL/d(output), an array of its shape. An input the output does not depend on gets
    ``None``. Every leaf of the graph that requires grad must be among ``inputs``, so no
    gradient is lost (gradient checkpointing passes a block's input and its parameters).
    The graph is freed as ``backward`` frees it.
    """
    inputs = tuple(inputs)
    wanted = {id(t): i for i, t in enumerate(inputs)}
    out: list = [None] * len(inputs)

    def collect(leaf: Tensor, g) -> None:
        i = wanted.get(id(leaf))
        if i is None:
            raise RuntimeError(
                f"grad(): the graph reaches a leaf tensor of shape {leaf.shape} that requires grad but is "
                "not among the inputs, so its gradient would be lost; pass it in inputs")
        out[i] = g if out[i] is None else out[i] + g

    if not output.requires_grad:
        return tuple(out)
    _backpropagate(output, grad_output, False, collect)
    return tuple(out)


def _not_scalar(t: Tensor):
    raise ValueError(f"item() needs a tensor with one element, got shape {t.shape}")


def _topological_order(root) -> list:
    """Graph nodes (_Nodes and leaf Tensors) from ``root`` back to the leaves, each
    after every node that uses it.

    A leaf comes right after the last op (in backward's order) that uses it, not at the end:
    the depth-first search explores an op's leaf inputs after its other inputs, so they finish
    later and come earlier in the reversed order. The last layer's weights therefore receive
    their ``.grad`` (and fire their hooks) while backward still has the first layers to go. The
    order among ops is the same either way (leaves start no search), so every sum is unchanged."""
    order: list = []
    seen: set[int] = set()
    stack = [(root, False)]
    while stack:  # iterative DFS: deep graphs must not hit the recursion limit
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        if isinstance(node, _Node):
            todo = [p for p in node.parents if p is not None and p.requires_grad and id(p) not in seen]
            stack.extend((p, False) for p in todo if isinstance(p, Tensor))  # leaves: popped last
            stack.extend((p, False) for p in todo if not isinstance(p, Tensor))
    order.reverse()
    return order


def tensor(data, requires_grad: bool = False, dtype=None) -> Tensor:
    """Make a Tensor (Python floats become float32)."""
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)
