"""Paged AdamW: optimizer state lives in host memory and visits the device page by page.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314, Sec. 3, "Paged Optimizers") keeps Adam's
moments where they fit - in CPU RAM - and brings them to the GPU only for the update, so
that a memory spike (a long sequence under gradient checkpointing) does not run the GPU
out of memory. Here the moments of each parameter are a host (NumPy) array per moment,
cut into fixed-size *pages* of ``page_size`` elements; page j of a parameter is its
elements ``[j*P, (j+1)*P)`` of both m and v. For an update, each page is

    page in  -> host -> device copy (CuPy when the parameter is on the GPU; on the CPU a
                copy into a *simulated* device pool whose bytes are counted against
                ``device_budget_bytes``)
    update   -> ``adamw_update`` on that slice of p, g, m, v (AdamW's own function; it is
                elementwise, so the result is bit-identical to unpaged AdamW)
    page out -> copied back to the host when evicted to make room (least recently used)

(``_host_layout`` names the host arrays a page is cut from and ``_update_page`` updates one
page: PagedAdamW8bit in ``paged8bit.py`` overrides just these two), so a step whose whole
state would not fit the device budget still runs: at most
``device_budget_bytes`` of optimizer state is ever on the device. Pages stay resident
after their update until the budget forces them out, and the sweep over pages reverses
direction every step, so the pages left on the device by one step are the first ones the
next step needs (an LRU cache scanned cyclically in one direction would miss every page
when the state is one page larger than the budget). With a budget of B pages and T pages
in all, a step moves ``T - B`` pages each way (after the first); with ``B >= T`` nothing
moves after the first step. ``paging_stats()`` counts page-ins, page-outs and the peak
device bytes of optimizer state.

How bitsandbytes' paged optimizers differ (its ``get_paged``/``prefetch_tensor``):
* they allocate states of tensors with >= 1e5 elements in CUDA *unified memory*
  (``cudaMallocManaged``); the driver pages 4 KiB-2 MiB pages on demand and evicts only
  when GPU memory runs out - no budget is set, and eviction order is the driver's;
* before each parameter's update they ``cudaMemPrefetchAsync`` its states to the GPU
  (asynchronously, overlapping the transfer with compute), and synchronize after a step;
* the update kernel reads the states in place through unified addresses.
Here the paging is explicit, synchronous, at a page size and budget you choose, and
counted, so that its cost can be seen and reproduced on a laptop; every tensor is paged
whatever its size. The host pages are ordinary (pageable) memory, not pinned.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..backend import device_of, xp_of
from ..engine import Tensor
from .core import AdamW, adamw_update

DEFAULT_PAGE_SIZE = 1 << 16  # elements per page and moment: 64 Ki float32 = 256 KiB, 512 KiB for m and v


class PagedAdamW(AdamW):
    """AdamW whose moments live on the host and are paged to the device for each update.

    ``page_size``: elements per page (of each moment). ``device_budget_bytes``: the most
    bytes of optimizer state allowed on the device at once (``None``: no limit - pages
    stay on the device once touched, as unified memory does without memory pressure).
    The budget must hold at least the largest page (``2 * page_size * 4`` bytes for
    float32 moments). Results are bit-identical to :class:`AdamW`.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, *, page_size: int = DEFAULT_PAGE_SIZE,
                 device_budget_bytes: int | None = None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        if isinstance(page_size, bool) or not isinstance(page_size, (int, np.integer)) or page_size < 1:
            raise ValueError(f"page_size must be an int >= 1 (elements per page), got {page_size!r}")
        self.page_size = int(page_size)
        self._params = dict(self.named_params)
        big_name, big = max(self.named_params, key=lambda item: self._page_bytes(item[1], 0))
        largest = self._page_bytes(big, 0)
        if device_budget_bytes is not None:
            if isinstance(device_budget_bytes, bool) or not isinstance(device_budget_bytes, (int, np.integer)):
                raise TypeError(f"device_budget_bytes must be an int or None, got {device_budget_bytes!r}")
            if device_budget_bytes < largest:
                raise ValueError(
                    f"device_budget_bytes={device_budget_bytes} cannot hold one page: a page of {big_name} "
                    f"takes {largest} bytes (the state of {min(self.page_size, big.data.size)} elements); "
                    f"raise the budget to at least {largest} or lower page_size (now {self.page_size})")
        self.device_budget_bytes = None if device_budget_bytes is None else int(device_budget_bytes)
        self._host: dict[str, tuple[np.ndarray, ...]] = {}          # name -> flat host m, v
        self._resident: OrderedDict = OrderedDict()                # (name, j) -> [arrays, nbytes, dirty]
        self._sweeps = 0
        self.reset_stats()

    # ---- pages
    def _state_dtype(self, p: Tensor) -> np.dtype:
        return np.dtype(np.float32) if p.dtype.itemsize < 4 else np.dtype(p.dtype)  # as AdamW

    def _host_layout(self, p: Tensor) -> list[tuple[str, int, np.dtype, int]]:
        """The host arrays of ``p``'s state: (state_dict key, items, dtype, elements per item).

        A page of elements [a, b) holds items [a//unit, ceil(b/unit)) of each array.
        """
        dt = self._state_dtype(p)
        return [("exp_avg", p.data.size, dt, 1), ("exp_avg_sq", p.data.size, dt, 1)]

    def _item_bounds(self, p: Tensor, j: int) -> list[tuple[int, int]]:
        a, b = self._bounds(p, j)
        return [(a // unit, -(-b // unit)) for _, _, _, unit in self._host_layout(p)]

    def _update_page(self, name: str, p: Tensor, arrays: list, pf, gf) -> None:
        """Update one page: ``arrays`` are its device copies, ``pf``/``gf`` p's and g's slices."""
        adamw_update(pf, gf, arrays[0], arrays[1], self.state[name]["step"], self.lr,
                     self.betas, self.eps, self.weight_decay)

    def n_pages(self, p: Tensor) -> int:
        """Pages holding one parameter's state."""
        return -(-p.data.size // self.page_size)

    def _bounds(self, p: Tensor, j: int) -> tuple[int, int]:
        a = j * self.page_size
        return a, min(p.data.size, a + self.page_size)

    def _page_bytes(self, p: Tensor, j: int) -> int:
        return sum((b - a) * dt.itemsize for (a, b), (_, _, dt, _) in
                   zip(self._item_bounds(p, j), self._host_layout(p)))   # m and v

    def reset_stats(self) -> None:
        """Zero the page-in/page-out counters and restart the peak from what is resident now."""
        self.page_ins = self.page_outs = 0
        self.device_bytes = sum(e[1] for e in self._resident.values())
        self.peak_device_bytes = self.device_bytes

    def paging_stats(self) -> dict:
        """Counters and sizes of the paging so far (bytes are optimizer state only)."""
        return {"page_ins": self.page_ins, "page_outs": self.page_outs,
                "device_bytes": self.device_bytes, "peak_device_bytes": self.peak_device_bytes,
                "device_budget_bytes": self.device_budget_bytes, "host_bytes": self.state_bytes(),
                "pages": sum(self.n_pages(p) for _, p in self.named_params), "page_size": self.page_size,
                "resident_pages": len(self._resident)}

    def _write_back(self, key, entry) -> None:
        """Copy a resident page's m and v back into the host arrays (device -> host)."""
        name, j = key
        bounds = self._item_bounds(self._params[name], j)
        for dev, host, (a, b) in zip(entry[0], self._host[name], bounds):
            if device_of(dev) == "cuda":
                dev.get(out=host[a:b])
            else:
                host[a:b] = dev
        entry[2] = False
        self.page_outs += 1

    def _page_out(self, key) -> None:
        entry = self._resident.pop(key)
        if entry[2]:                                                     # modified since page-in
            self._write_back(key, entry)
        self.device_bytes -= entry[1]

    def _page_in(self, name: str, p: Tensor, j: int, xp):
        key = (name, j)
        entry = self._resident.get(key)
        if entry is not None and device_of(entry[0][0]) != device_of(p.data):
            self._page_out(key)                                          # the parameter moved device
            entry = None
        if entry is not None:
            self._resident.move_to_end(key)                              # most recently used
            return entry
        nbytes = self._page_bytes(p, j)
        budget = self.device_budget_bytes
        while budget is not None and self.device_bytes + nbytes > budget:
            self._page_out(next(iter(self._resident)))                   # evict least recently used
        arrays = [xp.array(h[a:b]) for h, (a, b) in zip(self._host[name], self._item_bounds(p, j))]
        entry = [arrays, nbytes, False]                                  # host -> device copies
        self._resident[key] = entry
        self.device_bytes += nbytes
        self.peak_device_bytes = max(self.peak_device_bytes, self.device_bytes)
        self.page_ins += 1
        return entry

    def flush(self) -> None:
        """Copy every modified resident page back to the host (they stay resident, clean)."""
        for key, entry in self._resident.items():
            if entry[2]:
                self._write_back(key, entry)

    def _drop_resident(self) -> None:
        self._resident.clear()
        self.device_bytes = 0

    # ---- the step
    def step(self) -> None:
        todo = []
        for name, p in self.named_params:
            if p.grad is None:
                continue
            if p.grad.shape != p.data.shape:
                raise ValueError(f"gradient of {name} has shape {p.grad.shape}, parameter {p.shape}")
            if name not in self._host:
                self._host[name] = tuple(np.zeros(n, dt) for _, n, dt, _ in self._host_layout(p))
                self.state[name] = {"step": 0}
            self.state[name]["step"] += 1
            todo.append((name, p))
        sweep = [(name, p, j) for name, p in todo for j in range(self.n_pages(p))]
        if self._sweeps % 2:
            sweep.reverse()                  # start with the pages the last sweep left resident
        self._sweeps += 1
        flats = {}
        for name, p in todo:
            contiguous = p.data.flags.c_contiguous
            flats[name] = (p.data.reshape(-1) if contiguous else p.data.ravel().copy(),  # (n,)
                           p.grad.reshape(-1), contiguous)
        for name, p, j in sweep:
            xp = xp_of(p.data)
            entry = self._page_in(name, p, j, xp)
            pf, gf, _ = flats[name]
            a, b = self._bounds(p, j)
            self._update_page(name, p, entry[0], pf[a:b], gf[a:b])
            entry[2] = True
        for name, p in todo:
            pf, _, contiguous = flats[name]
            if not contiguous:
                p.data[...] = pf.reshape(p.shape)

    def _update(self, name: str, p: Tensor) -> None:  # pragma: no cover - step() does the work
        raise NotImplementedError("PagedAdamW updates in step(), page by page")

    def keep_only(self, names) -> None:
        """As ``Optimizer.keep_only``, and the host pages of the others are dropped too."""
        self.flush()
        self._drop_resident()
        super().keep_only(names)
        self._host = {n: hv for n, hv in self._host.items() if n in self.state}

    # ---- memory and saving
    def state_bytes(self) -> int:
        """Bytes of optimizer state (the host copy; ``paging_stats()`` has the device side)."""
        return sum(int(a.nbytes) for arrays in self._host.values() for a in arrays)

    def state_dict(self) -> dict:
        """As AdamW's: ``exp_avg``/``exp_avg_sq`` shaped like each parameter, on the host.

        Resident pages are flushed first; the arrays are views of the host state, current
        as of this call.
        """
        self.flush()
        params = self._params
        sd = super().state_dict()
        sd["state"] = {}
        for name, arrays in self._host.items():
            p = params[name]
            st = sd["state"][name] = {"step": self.state[name]["step"]}
            for (key, _, _, unit), a in zip(self._host_layout(p), arrays):
                st[key] = a.reshape(p.shape) if unit == 1 else a        # shaped like p, or per block
        return sd

    def load_state_dict(self, sd: dict) -> None:
        """Restore hyperparameters, step counts and moments into host pages (nothing resident)."""
        self.check_state_dict(sd)
        for k in self._hparam_names:
            if k in sd.get("hparams", {}):
                v = sd["hparams"][k]
                setattr(self, k, tuple(v) if isinstance(v, list) else v)
        params = self._params
        self._drop_resident()
        self._host, self.state = {}, {}
        for name, st in sd["state"].items():
            host = []
            for k, n, dt, _ in self._host_layout(params[name]):
                a = st.get(k)
                a = np.zeros(n, dt) if a is None else a
                a = a.get() if device_of(a) == "cuda" else a
                host.append(np.array(a, dtype=dt).reshape(-1))           # a copy, never the caller's
            self._host[name] = tuple(host)
            self.state[name] = {"step": int(st["step"])}
