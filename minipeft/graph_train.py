"""A whole training step (forward, backward, AdamW) recorded once as a CUDA graph and replayed.

Why: minipeft's step is Python. At GPT-2 small's shape and 8 x 512 tokens the GPU needs
about 25 ms for a bfloat16 step, while the host spends more than that issuing the ~1100
launches one by one (``benchmarks/README.md``, "[fast16]"): the GPU waits on Python. A CUDA
graph (CUDA C++ Programming Guide, "CUDA Graphs") records the launches of one step and
replays them all with one call, so the step costs what the GPU needs. PyTorch offers the
same for its models (``torch.cuda.graphs``); this is the same recipe, written for
minipeft's engine:

1. **Warm-up.** The first ``warmup`` calls are ordinary eager steps (more while AdamW has no
   state yet: a float16 step skipped for an overflow makes none): they compile every kernel,
   make AdamW's moments and fill the caches (the 4-bit layers' dequantize launches) that a
   recording must find already made.
2. **Record.** The next call runs the step once on a side stream under stream capture,
   with :mod:`minipeft.capture` telling the code that it is being recorded: every array the
   step allocates is kept for the graph's lifetime (the graph writes to those addresses on
   every replay), AdamW's per-step scalars (bias corrections, learning rate) are read from a
   device buffer instead of being frozen into the kernels, and range checks that would read
   device values back are skipped. Nothing runs while recording: the recorded step is then
   replayed once, and that replay is this call's step.
3. **Replay.** Every call copies the batch into the graph's input arrays, checks it, writes
   the scalars of this step (one copy), and launches the graph.

The returned loss is the graph's own loss array, overwritten by the next replay (read it
with ``float(loss)`` before the next call if you keep it); the gradients in ``p.grad`` are
the graph's arrays too. The batch shape is fixed at the first call; another shape raises.
Memory: the recorded step keeps every array it allocates for as long as the graph lives
(nothing is freed and reused within the step, as the eager step's memory pool does), so it
holds more device memory than the eager step's peak; deleting the ``GraphTrainStep`` frees it.

What cannot be recorded is refused with the reason (:func:`graph_trainable`): a model on the
CPU, float32 products (CuPy's own cuBLAS calls refuse capture), dropout (a replay would draw
the same random numbers), optimizers other than :class:`minipeft.optim.AdamW`.

float16 runs with dynamic loss scaling (:class:`minipeft.amp.GradScaler`, made by default):
the scale and its inverse are per-replay scalars, the overflow verdict stays on the device
and the recorded AdamW kernels do nothing when it is set; after each replay the verdict is
read back (one wait for the step to finish), the skipped step's counts are taken back and
the scaler updated, exactly as the eager step decides.

An operation that still cannot be recorded makes the recording fail with CUDA's or CuPy's
own error, named with the remedy (run the step eagerly). ``tests/test_graph_train.py``
checks, on a GPU, that replayed steps give the eager steps' parameters.
"""
from __future__ import annotations

import numpy as np

from . import amp
from .backend import xp_of
from .capture import CAPACITY, Recording, capturing, recording
from .optim.core import AdamW


def _dropouts(model) -> list[str]:
    """Names of the modules that would draw random numbers in this step (training-mode dropout, p > 0)."""
    return [name or type(m).__name__ for name, m in model.named_modules()
            if type(m).__name__ == "Dropout" and getattr(m, "p", 0.0) > 0.0 and m.training]


def graph_trainable(model, optimizer, compute_dtype: str) -> str | None:
    """None when :class:`GraphTrainStep` can record ``model``'s step with ``optimizer``; else why not."""
    dtype = amp.check_compute_dtype(compute_dtype)
    params = [p for _, p in optimizer.named_params]
    if not params or xp_of(params[0].data) is np:
        return "the model is on the CPU (model.to('cuda') first): CUDA graphs record GPU work"
    if dtype == "float32":
        return ("compute_dtype float32 multiplies through CuPy's cuBLAS calls, which refuse to be recorded; "
                "use bfloat16 (or run the float32 step eagerly)")
    if type(optimizer) is not AdamW:
        return (f"the optimizer is {type(optimizer).__name__}; only minipeft.optim.AdamW reads its per-step "
                "scalars from the device when recorded")
    drop = _dropouts(model)
    if drop:
        return (f"dropout is on ({', '.join(drop[:3])}{', ...' if len(drop) > 3 else ''}): every replay would "
                "draw the same random numbers; set its p to 0 or call model.eval() on it")
    return None


class GraphTrainStep:
    """``step = GraphTrainStep(model, optimizer, "bfloat16")``; then ``loss = step(idx, targets)`` per batch.

    Each call is one training step of ``model`` on ``(idx, targets)`` (token ids and next
    tokens, (B, T) integers; ``targets`` may hold ``ignore_index``): ``optimizer.zero_grad()``,
    the forward under ``amp.autocast(compute_dtype)``, ``loss.backward()``, ``optimizer.step()``;
    the same arithmetic as that eager step (the module docstring says how it is recorded).
    With a ``scaler`` (float16's default: ``amp.GradScaler()``), the backward starts from the
    scaled loss and the step is skipped on an overflow, as ``minipeft.train`` does.
    """

    def __init__(self, model, optimizer, compute_dtype: str = "bfloat16", warmup: int = 1,
                 ignore_index: int = -100, scaler=None) -> None:
        reason = graph_trainable(model, optimizer, compute_dtype)
        if reason:
            raise ValueError(f"GraphTrainStep cannot record this step: {reason}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1 (eager steps before recording, to make AdamW's "
                             f"state and compile the kernels), got {warmup!r}")
        self.model, self.optimizer = model, optimizer
        self.xp = xp_of(optimizer.params[0].data)  # CuPy (graph_trainable refused a model on the CPU)
        self.compute_dtype = amp.check_compute_dtype(compute_dtype)
        self.warmup, self.ignore_index = warmup, ignore_index
        if scaler is None and self.compute_dtype == "float16":
            scaler = amp.GradScaler()
        self.scaler = scaler if scaler is not None and scaler.enabled else None
        self.steps = 0  # steps taken (eager warm-up and replays)
        self.shape = None  # (B, T), fixed by the first call
        self._graph = self._rec = self._stream = None

    @property
    def recorded(self) -> bool:
        """True once the step has been recorded (the calls since replay it)."""
        return self._graph is not None

    def _eager(self, idx, targets):
        """The step, run (or, inside a recording, recorded): what ``minipeft.train`` does without clipping."""
        opt, scaler = self.optimizer, self.scaler
        opt.zero_grad()
        with amp.autocast(self.compute_dtype):
            loss = self.model(idx, targets=targets).loss
        if scaler is None:
            loss.backward()
            opt.step()
            return loss
        scaler.scale_loss(loss).backward()
        found_inf = scaler.unscale_(opt.params)  # recording: a device flag, also the recording's skip flag
        if capturing() is not None:
            opt.step()  # its kernels do nothing on a replay whose flag is set
        else:
            if not found_inf:
                opt.step()
            scaler.update(found_inf)
        return loss

    def _check(self, idx, targets):
        """The batch as (B, T) integer arrays, checked: NumPy input on the host (no wait), CuPy input on the
        device with one read back (which waits for the step before)."""
        for name, a in (("idx", idx), ("targets", targets)):
            if not hasattr(a, "shape") or a.ndim != 2 or a.dtype.kind not in "iu":
                raise ValueError(f"{name} must be an integer array of token ids of shape (B, T), got "
                                 f"{getattr(a, 'dtype', type(a).__name__)} of shape {getattr(a, 'shape', None)}")
        if targets.shape != idx.shape:
            raise ValueError(f"targets must have the shape of idx {idx.shape}, got {targets.shape}")
        if self.shape is not None and tuple(idx.shape) != self.shape:
            raise ValueError(f"this GraphTrainStep was recorded for batches of shape {self.shape}, got "
                             f"{tuple(idx.shape)}; build another GraphTrainStep for another shape")
        V = self.model.config.vocab_size
        if not (xp_of(idx) is np and xp_of(targets) is np):  # on the device (either one): check both there
            idx, targets = self.xp.asarray(idx), self.xp.asarray(targets)
        t_bad = (targets != self.ignore_index) & ((targets < 0) | (targets >= V))
        if bool(((idx < 0) | (idx >= V)).any() | t_bad.any()):
            raise ValueError(f"token ids and targets must be in [0, {V}) (targets may also be ignore_index "
                             f"{self.ignore_index}); check the tokenizer's vocabulary size")
        self.shape = tuple(idx.shape)  # the first good batch fixes it
        return idx, targets

    def __call__(self, idx, targets):
        idx, targets = self._check(idx, targets)
        idx, targets = self.xp.asarray(idx), self.xp.asarray(targets)  # host batches: copied to the device here
        if self._graph is None and (self.steps < self.warmup or not self._state_ready()):
            self.steps += 1
            return self._eager(idx, targets)
        if self._graph is None:
            self._record()
        self._idx[...] = idx
        self._targets[...] = targets
        self._replay()
        self.steps += 1
        return self._loss

    def _state_ready(self) -> bool:
        """AdamW holds state for every parameter that got a gradient (a float16 step skipped for an
        overflow makes none): a recording cannot make it."""
        return all(name in self.optimizer.state for name, p in self.optimizer.named_params if p.grad is not None)

    # ---- recording and replaying
    def _record(self) -> None:
        cp = self.xp
        cp.cuda.Device().synchronize()
        cp.get_default_memory_pool().free_all_blocks()  # the eager steps' cached blocks: not the graph's
        B, T = self.shape
        self._idx = cp.zeros((B, T), cp.int64)  # allocated before recording: the replays' inputs
        self._targets = cp.zeros((B, T), cp.int64)
        rec = Recording(cp.zeros(CAPACITY, cp.float32))
        stream = cp.cuda.Stream(non_blocking=True)  # capture needs a stream other than the legacy one
        pool_malloc = cp.cuda.get_allocator()

        def keep(nbytes):  # every allocation of the recorded step stays the graph's
            mem = pool_malloc(nbytes)
            rec.held.append(mem)
            return mem

        cp.cuda.set_allocator(keep)
        try:
            with stream, recording(rec):
                stream.begin_capture()
                try:
                    loss = self._eager(self._idx, self._targets)
                except BaseException:
                    try:
                        stream.end_capture()
                    except Exception:  # the capture is invalid after the error: its graph is not wanted
                        pass
                    raise
                graph = stream.end_capture()
        except Exception as e:
            raise RuntimeError(f"recording the training step into a CUDA graph failed ({type(e).__name__}: {e}). "
                               "Some operation of this model cannot be recorded; train it with the eager step "
                               "(minipeft.train, or the same calls without GraphTrainStep)") from e
        finally:
            cp.cuda.set_allocator(pool_malloc)
        self._graph, self._rec, self._stream, self._loss = graph, rec, stream, loss

    def _replay(self) -> None:
        cp = self.xp
        rec, stream, current = self._rec, self._stream, cp.cuda.get_current_stream()
        rec.refresh()  # this step's scalars (AdamW's step counts advance here, as the eager step's would)
        cp.cuda.runtime.memcpyAsync(rec.buffer.data.ptr, rec.host.ctypes.data, 4 * rec.used,
                                    cp.cuda.runtime.memcpyHostToDevice, current.ptr)  # pageable: staged at once
        ready = cp.cuda.Event()
        ready.record(current)  # the inputs and scalars were queued on the current stream
        stream.wait_event(ready)
        self._graph.launch(stream)
        done = cp.cuda.Event()
        done.record(stream)
        current.wait_event(done)  # whatever reads the loss or the weights next runs after the replay
        if self.scaler is not None and rec.skip is not None:
            found_inf = bool(rec.skip)  # waits for the replay: the scale of the next one depends on it
            if found_inf:
                rec.skipped()  # the optimizer did nothing: its step counts go back
            self.scaler.update(found_inf)


__all__ = ["GraphTrainStep", "graph_trainable"]
