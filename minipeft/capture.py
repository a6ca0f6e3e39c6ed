"""Recording a step of GPU work once, to replay it as a CUDA graph: what the recorded code must know.

A CUDA graph (CUDA C++ Programming Guide, "CUDA Graphs", stream capture) replays the kernel
launches, copies and memsets that one run of the code queued, with the same arguments:
the same addresses, the same scalars. Three things in a training step change from step to
step or would read the device from the host, and the code that does them asks
:func:`capturing` whether it is being recorded:

- **Host reads of device values** (a range check's ``int(idx.max())``, a ``bool(bad.any())``)
  cannot be recorded: the check is skipped while recording, and whoever records the step
  checks the inputs of every replay instead (:class:`minipeft.graph_train.GraphTrainStep`).
- **Scalars that change per step** (AdamW's bias corrections ``1 - b1^t``, ``1 - b2^t``, the
  learning rate of a schedule) would be frozen at their recorded values. A recorded kernel
  reads them from device memory instead: :meth:`Recording.per_replay` hands out a slot of
  one float32 buffer and keeps the host function that computes the slot's values; before
  every replay the recorder calls every such function and copies all values with one copy.
- **Memory**: every array the step allocates while recording is kept for the graph's
  lifetime (:attr:`Recording.held`), so no later allocation can take an address a replay
  writes to.
- **Decisions**: float16's loss scaling skips the optimizer step when a gradient overflowed.
  While recording, :meth:`minipeft.amp.GradScaler.unscale_` leaves its verdict on the device
  (:attr:`Recording.skip`), the recorded optimizer kernels do nothing when it is set, and
  after each replay the recorder reads it back and runs :meth:`Recording.skipped` (step
  counts taken back) and the scaler's update.

This module holds no GPU code: the recording itself is :mod:`minipeft.graph_train`'s.
"""
from __future__ import annotations

import numpy as np

CAPACITY = 1 << 16  # float32 per-replay values one recording may hold (AdamW: 3 per parameter)

_ACTIVE: "Recording | None" = None


def capturing() -> "Recording | None":
    """The :class:`Recording` being recorded now, or None (the code runs eagerly)."""
    return _ACTIVE


class Recording:
    """What a recorded step keeps: its allocations and its per-replay scalars.

    ``buffer`` is a float32 device array of :data:`CAPACITY` values allocated before the
    recording (its address is in the graph); ``host`` is its host twin, refilled before
    every replay by :meth:`refresh`.
    """

    def __init__(self, buffer) -> None:
        self.buffer = buffer  # (CAPACITY,) float32 on the device
        self.host = np.zeros(CAPACITY, np.float32)  # what the next replay reads from buffer
        self.hooks: list = []  # (advance, offset, n): advance() -> n values for the next replay
        self.used = 0  # values handed out so far
        self.held: list = []  # every allocation made while recording (CuPy MemoryPointers)
        self.skip = None  # a 0-d device bool (float16's overflow flag): the optimizer does nothing when set
        self.skip_hooks: list = []  # host functions to call after a replay whose skip flag was set

    def per_replay(self, advance, n: int):
        """A device view of ``n`` float32 values that ``advance()`` computes before every replay.

        ``advance`` is called only before replays, never while recording: it may advance host
        state (a step counter) that the eager code would have advanced when it ran.
        """
        if self.used + n > CAPACITY:
            raise RuntimeError(f"the recorded step needs more than {CAPACITY} per-replay values "
                               f"(minipeft.capture.CAPACITY); raise it for this many parameters")
        off = self.used
        self.used += n
        self.hooks.append((advance, off, n))
        return self.buffer[off:off + n]

    def refresh(self) -> None:
        """Compute every slot's values for the next replay (into :attr:`host`)."""
        for advance, off, n in self.hooks:
            self.host[off:off + n] = advance()

    def on_skip(self, undo) -> None:
        """Call ``undo()`` after every replay whose :attr:`skip` flag was set (the step did not happen:
        a step count advanced before it is taken back)."""
        self.skip_hooks.append(undo)

    def skipped(self) -> None:
        """Run the hooks of a replay that skipped its optimizer step."""
        for undo in self.skip_hooks:
            undo()


class recording:
    """``with recording(rec):`` marks the code inside as being recorded into ``rec``."""

    def __init__(self, rec: Recording) -> None:
        self.rec = rec

    def __enter__(self) -> Recording:
        global _ACTIVE
        if _ACTIVE is not None:
            raise RuntimeError("a step is already being recorded; recordings do not nest")
        _ACTIVE = self.rec
        return self.rec

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        _ACTIVE = None
