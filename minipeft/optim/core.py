"""Optimizers and gradient clipping: SGD, AdamW and the update rules they share.

* SGD with momentum (Polyak 1964; Nesterov as in Sutskever et al. 2013), written the
  way ``torch.optim.SGD`` computes it: ``b <- mu*b + (1-dampening)*g``, ``p <- p - lr*b``
  (or ``g + mu*b`` for Nesterov); weight decay is added to the gradient (L2).
* AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization", Alg. 2)
  with Adam's bias correction (Kingma & Ba 2015, Alg. 1), as ``torch.optim.AdamW``::

      p <- p * (1 - lr*wd)                       # decoupled decay, line 12 of Alg. 2
      m <- b1*m + (1-b1)*g ;  v <- b2*v + (1-b2)*g^2
      p <- p - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)

  The update is the pure function ``adamw_update`` so that 8-bit and paged AdamW
  (bitsandbytes; ``adamw8bit.py``, ``paged.py``) reuse it on dequantized or paged states.
* ``clip_grad_norm_``: scale all gradients so that their global L2 norm is at most
  ``max_norm`` (Pascanu et al. 2013), as ``torch.nn.utils.clip_grad_norm_``.

Only parameters that require gradients get optimizer state; frozen weights cost nothing
here, which is half of where parameter-efficient fine-tuning saves memory.
Everything works on NumPy and CuPy arrays alike (``xp = xp_of(array)``).
"""
from __future__ import annotations

import math

import numpy as np

from .. import fast
from ..backend import to_device, xp_of
from ..capture import capturing
from ..engine import Tensor

# ------------------------------------------------------------------ update rules


def adamw_scalars(step: int, lr: float, betas: tuple[float, float], wd: float) -> np.ndarray:
    """``(keep, bc2_sqrt, step_size)`` (float64): what one AdamW update needs of the step number and lr.

    ``keep = 1 - lr*wd`` (the decoupled decay), ``bc2_sqrt = sqrt(1 - b2^t)``, ``step_size =
    lr / (1 - b1^t)``; :func:`adamw_update_from` rounds them once to the moments' dtype, as
    an array rounds a Python float it is multiplied by.
    """
    b1, b2 = betas
    return np.array([1.0 - lr * wd, math.sqrt(1.0 - b2**step), lr / (1.0 - b1**step)])


@fast.dispatch  # float32 CuPy arrays: one fused kernel instead (minipeft/kernels/adamw.cu), bit for bit
def adamw_update(p, g, m, v, step: int, lr: float, betas: tuple[float, float], eps: float, wd: float) -> None:
    """One AdamW step, in place on the arrays ``p`` (param), ``m`` and ``v`` (moments).

    ``step`` is the 1-based count of this update (used for bias correction). ``m``/``v``
    may be float32 while ``p`` is lower precision: the math runs in ``m``'s dtype.
    """
    adamw_update_from(p, g, m, v, adamw_scalars(step, lr, betas, wd), betas, eps, wd)


@fast.dispatch  # float32 CuPy arrays and scalars on the device: the same kernel, reading them there
def adamw_update_from(p, g, m, v, scalars, betas: tuple[float, float], eps: float, wd: float,
                      skip=None) -> None:
    """:func:`adamw_update` with the step's scalars given as an array ``(keep, bc2_sqrt, step_size)``
    (:func:`adamw_scalars`), on the host or, for a step recorded into a CUDA graph, on the device.

    ``skip``: a 0-d bool array (float16's overflow verdict); when true nothing changes (the
    kernel reads it on the device; here it is read back).
    """
    if skip is not None and bool(skip):
        return
    b1, b2 = betas
    scalars = scalars.astype(m.dtype, copy=False)  # rounded once to the working dtype
    keep, bias_correction2_sqrt, step_size = scalars[0], scalars[1], scalars[2]
    work = p if p.dtype == m.dtype else p.astype(m.dtype)
    g = g if g.dtype == m.dtype else g.astype(m.dtype)
    if wd != 0.0:
        work *= keep  # decoupled weight decay (Loshchilov & Hutter, Alg. 2 line 12)
    m += (1.0 - b1) * (g - m)  # m <- b1*m + (1-b1)*g
    v *= b2
    v += (1.0 - b2) * g * g  # v <- b2*v + (1-b2)*g^2
    xp = xp_of(p)
    denom = xp.sqrt(v) / bias_correction2_sqrt + eps
    work -= step_size * (m / denom)  # step_size = lr / (1 - b1^t)
    if work is not p:
        p[...] = work.astype(p.dtype)


def sgd_update(p, g, buf, lr: float, momentum: float, dampening: float, nesterov: bool, wd: float):
    """One SGD step in place on ``p``; returns the momentum buffer (``None`` without momentum).

    ``buf`` is ``None`` on the first step, when the buffer starts as a copy of the gradient.
    """
    if wd != 0.0:
        g = g + wd * p  # L2 penalty folded into the gradient (coupled, unlike AdamW)
    if momentum != 0.0:
        if buf is None:
            buf = g.copy()
        else:
            buf *= momentum
            buf += (1.0 - dampening) * g
        g = g + momentum * buf if nesterov else buf
    p -= lr * g
    return buf


# --------------------------------------------------------------------- optimizers


def _named_trainable(params) -> list[tuple[str, Tensor]]:
    """(name, Parameter) pairs from a Module, named pairs or plain Parameters; trainable only."""
    if hasattr(params, "named_parameters"):
        items = list(params.named_parameters())
    else:
        items = list(params)
        if not items:
            raise ValueError("optimizer got an empty parameter list")
        if all(isinstance(x, Tensor) for x in items):
            items = [(str(i), p) for i, p in enumerate(items)]
        elif not all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], Tensor) for x in items):
            raise TypeError(
                "optimizer parameters must be a Module, a list of Parameters, or (name, Parameter) pairs "
                "as given by model.named_parameters()"
            )
    seen, out = set(), []
    for name, p in items:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        out.append((name, p))
    if not out:
        raise ValueError(
            "no parameter requires grad: everything is frozen, so there is nothing to optimize "
            "(did you forget to unfreeze the adapter, or pass the wrong parameters?)"
        )
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate parameter names: {sorted({n for n in names if names.count(n) > 1})}")
    return out


class Optimizer:
    """Base class: holds trainable parameters by name and a per-parameter state dict.

    State (``self.state[name]``) is created lazily at a parameter's first update, as in
    PyTorch, and only for parameters with ``requires_grad``; a parameter whose ``grad``
    is ``None`` at ``step()`` is skipped. ``lr`` is a plain attribute a scheduler sets.
    """

    _array_keys: tuple[str, ...] = ()  # names of the per-parameter state arrays
    _hparam_names: tuple[str, ...] = ("lr",)  # saved and restored by state_dict

    def __init__(self, params, lr: float):
        if not (isinstance(lr, (int, float)) and lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"learning rate must be a finite number >= 0, got {lr!r}")
        self.named_params = _named_trainable(params)
        self.lr = float(lr)
        self.state: dict[str, dict] = {}

    @property
    def params(self) -> list[Tensor]:
        return [p for _, p in self.named_params]

    def zero_grad(self) -> None:
        """Drop every gradient (``grad = None``), ready for the next backward."""
        for _, p in self.named_params:
            p.grad = None

    def step(self) -> None:
        for name, p in self.named_params:
            if p.grad is None:
                continue
            if p.grad.shape != p.data.shape:
                raise ValueError(f"gradient of {name} has shape {p.grad.shape}, parameter {p.shape}")
            self._update(name, p)

    def _update(self, name: str, p: Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def keep_only(self, names) -> None:
        """Update, and hold state for, only the parameters ``names`` (ZeRO stage 1: this rank's share).

        The full list stays in ``all_named_params`` (what a checkpoint names); state of the
        others is dropped. ``minipeft.distributed`` calls it; a lone optimizer never needs it.
        """
        keep = set(names)
        unknown = keep - {n for n, _ in self.named_params}
        if unknown:
            raise ValueError(f"keep_only: {sorted(unknown)[:5]} are not parameters of this optimizer")
        if not hasattr(self, "all_named_params"):
            self.all_named_params = list(self.named_params)
        self.named_params = [(n, p) for n, p in self.named_params if n in keep]
        self.state = {n: st for n, st in self.state.items() if n in keep}

    def state_bytes(self) -> int:
        """Bytes held by optimizer state arrays (moments, momentum buffers)."""
        return sum(int(a.nbytes) for st in self.state.values() for a in st.values() if hasattr(a, "nbytes"))

    # ---- saving
    def hparams(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in
                ((k, getattr(self, k)) for k in self._hparam_names)}

    def state_dict(self) -> dict:
        """``{"type", "hparams", "param_names", "state": {name: {"step": int, <arrays>}}}``.

        Arrays are the live buffers (not copies), on the parameters' device.
        """
        return {
            "type": type(self).__name__,
            "hparams": self.hparams(),
            "param_names": [n for n, _ in self.named_params],
            "state": {n: dict(st) for n, st in self.state.items()},
        }

    def _state_shape(self, key: str, p: Tensor, hparams: dict) -> tuple:
        """Shape the state array ``key`` must have for parameter ``p`` (its own by default).

        ``hparams`` are the saved ones (a block size, say, may change the expected shape).
        """
        return tuple(p.shape)

    def check_state_dict(self, sd: dict) -> None:
        """Raise ``ValueError`` listing every way ``sd`` does not fit this optimizer."""
        problems = []
        if sd.get("type") != type(self).__name__:
            problems.append(f"state is for optimizer {sd.get('type')!r}, this is {type(self).__name__}")
        own = dict(self.named_params)
        names = sd.get("param_names", [])
        missing = sorted(set(own) - set(names))
        unexpected = sorted(set(names) - set(own))
        if missing:
            problems.append(f"parameters without saved state entry ({len(missing)}): {missing[:20]}")
        if unexpected:
            problems.append(f"saved parameters this optimizer does not have ({len(unexpected)}): {unexpected[:20]}")
        for name, st in sd.get("state", {}).items():
            if name not in own:
                continue
            if "step" not in st:
                problems.append(f"{name}: no 'step' count")
            for k in self._array_keys:
                if k not in st:
                    continue
                want = self._state_shape(k, own[name], sd.get("hparams", {}))
                if tuple(st[k].shape) != want:
                    shape = tuple(own[name].shape)
                    problems.append(f"{name}.{k}: saved {tuple(st[k].shape)} vs "
                                    + (f"parameter {shape}" if want == shape else f"{want} for parameter {shape}"))
            extra = set(st) - set(self._array_keys) - {"step"}
            if extra:
                problems.append(f"{name}: unknown state keys {sorted(extra)}")
        if problems:
            raise ValueError("optimizer load_state_dict failed (optimizer unchanged):\n  " + "\n  ".join(problems))

    def load_state_dict(self, sd: dict) -> None:
        """Restore hyperparameters, step counts and state arrays (copied to each param's device)."""
        self.check_state_dict(sd)
        own = dict(self.named_params)
        for k in self._hparam_names:
            if k in sd.get("hparams", {}):
                v = sd["hparams"][k]
                setattr(self, k, tuple(v) if isinstance(v, list) else v)
        self.state = {}
        for name, st in sd["state"].items():
            p = own[name]
            new = {"step": int(st["step"])}
            for k in self._array_keys:
                if k in st:
                    a = to_device(st[k], p.device)
                    new[k] = a.copy() if a is st[k] else a  # never alias the caller's arrays
            self.state[name] = new

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({len(self.named_params)} params, {hp})"


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay."""

    _array_keys = ("momentum_buffer",)
    _hparam_names = ("lr", "momentum", "dampening", "nesterov", "weight_decay")

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):
        super().__init__(params, lr)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not 0.0 <= dampening <= 1.0:
            raise ValueError(f"dampening must be in [0, 1], got {dampening}")
        if not (weight_decay >= 0 and math.isfinite(weight_decay)):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
        if nesterov and (momentum == 0 or dampening != 0):
            raise ValueError("nesterov momentum needs momentum > 0 and dampening = 0")
        self.momentum, self.dampening = float(momentum), float(dampening)
        self.nesterov, self.weight_decay = bool(nesterov), float(weight_decay)

    def _update(self, name: str, p: Tensor) -> None:
        st = self.state.setdefault(name, {"step": 0})
        st["step"] += 1
        buf = sgd_update(p.data, p.grad, st.get("momentum_buffer"), self.lr, self.momentum,
                         self.dampening, self.nesterov, self.weight_decay)
        if buf is not None:
            st["momentum_buffer"] = buf


class AdamW(Optimizer):
    """Adam with decoupled weight decay; defaults are ``torch.optim.AdamW``'s."""

    _array_keys = ("exp_avg", "exp_avg_sq")
    _hparam_names = ("lr", "betas", "eps", "weight_decay")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01):
        super().__init__(params, lr)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"eps must be a finite number > 0, got {eps}")
        if not (weight_decay >= 0 and math.isfinite(weight_decay)):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps, self.weight_decay = float(eps), float(weight_decay)

    def _init_state(self, p: Tensor) -> dict:
        xp = xp_of(p.data)
        dtype = np.float32 if p.dtype.itemsize < 4 else p.dtype  # keep fp16 moments in fp32
        return {"step": 0, "exp_avg": xp.zeros(p.shape, dtype=dtype), "exp_avg_sq": xp.zeros(p.shape, dtype=dtype)}

    def _update(self, name: str, p: Tensor) -> None:
        st = self.state.get(name)
        rec = capturing()
        if st is None:
            if rec is not None:
                raise RuntimeError(f"{name} has no AdamW state yet: a recorded step cannot make it (its zeros "
                                   "would be recorded too, and replayed); take one eager step first")
            st = self.state[name] = self._init_state(p)
        if rec is None:
            st["step"] += 1
            adamw_update(p.data, p.grad, st["exp_avg"], st["exp_avg_sq"], st["step"], self.lr,
                         self.betas, self.eps, self.weight_decay)
            return

        def advance():  # before each replay of a recorded step: the step it takes, at the lr of now
            st["step"] += 1
            return adamw_scalars(st["step"], self.lr, self.betas, self.weight_decay)

        adamw_update_from(p.data, p.grad, st["exp_avg"], st["exp_avg_sq"], rec.per_replay(advance, 3),
                          self.betas, self.eps, self.weight_decay, skip=rec.skip)
        if rec.skip is not None:  # a replay that skipped the step did not take it: its count goes back

            def undo():
                st["step"] -= 1

            rec.on_skip(undo)


# ---------------------------------------------------------------- gradient clipping


def _grads(params) -> list:
    if hasattr(params, "parameters"):
        params = params.parameters()
    elif isinstance(params, Tensor):
        params = [params]
    out = []
    for p in params:
        p = p[1] if isinstance(p, tuple) else p
        if not isinstance(p, Tensor):
            raise TypeError(f"clip_grad_norm_ needs Tensors or a Module, got {type(p).__name__}")
        if p.grad is not None:
            out.append(p)
    return out


def clip_grad_norm_(params, max_norm: float) -> float:
    """Scale gradients in place so their global L2 norm is <= ``max_norm``; return the norm.

    The norm is taken over all gradients together, ``sqrt(sum_p ||g_p||^2)``, before
    clipping; the scale is ``max_norm / (norm + 1e-6)`` when that is below 1 (PyTorch's).
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    ps = _grads(params)
    if not ps:
        return 0.0
    xp = xp_of(ps[0].grad)
    sq = xp.stack([xp.sum(p.grad.astype(np.float32) ** 2) for p in ps])  # (n_params,)
    total = float(xp.sqrt(sq.sum()))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for p in ps:
            p.grad = p.grad * p.grad.dtype.type(coef)
    return total
