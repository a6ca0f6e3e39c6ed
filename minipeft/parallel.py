"""Independent runs in worker processes: one pool for every experiment grid (transfer, E2E).

Workers are *spawned*, never forked: a forked CUDA context is unusable, and a fresh process
reads its BLAS settings (and CuPy's memory limit) from the environment it starts with,
which ``env`` sets for the workers only.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
from typing import Callable, Iterator


@contextlib.contextmanager
def environment(env: dict | None):
    """Set ``env`` in ``os.environ`` for the duration (spawned workers inherit it), then restore it."""
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _call(item):
    fn, i, arg = item
    return i, fn(arg)


def spawn_map(fn: Callable, args: list, workers: int, env: dict | None = None) -> Iterator[tuple]:
    """Yield ``(index, fn(args[index]))`` as ``workers`` spawned processes finish them (any order).

    ``fn`` must be a module-level function (it is pickled by name).
    """
    with environment(env), mp.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap_unordered(_call, [(fn, i, a) for i, a in enumerate(args)])
