"""Quantized Linear layers: frozen 4-bit (NF4/FP4) and 8-bit (LLM.int8()) weights.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314), eq. (5): a frozen base layer computes

    Y = X · doubleDequant(c1, c2, W_NF4)^T          (+ X L1 L2 from a LoRA adapter)

The weight is held only as packed 4-bit codes plus its ``QuantState`` (block absmax,
double-quantized or not); every forward dequantizes it on the fly, and the backward
needs ``dL/dX = dL/dY · W_deq``, so it dequantizes **again** instead of keeping
``W_deq`` alive between forward and backward. The weight gets no gradient and ``X`` is
not saved (the weight is frozen): a ``Linear4bit`` holds nothing for backward, which is
why QLoRA's saved activations are those of its adapters only.

LLM.int8() (Dettmers et al. 2022, arXiv 2208.07339), Sec. 3: ``Linear8bitLt`` holds an
int8 weight with one absmax per output row and multiplies with vector-wise int8 plus
the mixed-precision decomposition for input columns holding ``|x| >= threshold``
(:func:`minipeft.quant.int8.matmul_8bit`); backward uses the dequantized int8 weight
(bitsandbytes' ``grad_A = grad_out @ (CB * SCB / 127)``).

Merging an adapter into a quantized layer (peft's ``lora/bnb.py``) cannot add to the
codes: it dequantizes the weight, adds the update and quantizes the sum again with the
layer's own settings (``requantize``; 8-bit, as bitsandbytes' ``Int8Params``, rounds the
sum to float16 first). The stored weight is then the sum *rounded*: ``requantize``
returns the largest change it made, and ``requantization_error`` (``quant/requantize.py``)
says what storing a weight would cost before it is done. Unmerging subtracts the update from the merged,
dequantized weight and rounds again, so a merge and unmerge need not give back the
original codes.

``quantize_model`` swaps chosen ``nn.Linear`` layers of a model for these modules
(``set_submodule``, as bitsandbytes' ``replace_with_bnb_linear``) and reports the bytes
the model holds before and after. State-dict keys follow bitsandbytes' serialization:
``weight`` (packed uint8), ``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4`` (JSON bytes); for 8-bit ``weight`` (int8) and
``SCB``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..amp import COMPUTE_DTYPES, autocast_dtype, device_dtype, gemm_2d, round_to_compute, to_compute
from ..amp import check_compute_dtype as _check_compute_dtype
from ..backend import device_of, to_device, xp_of
from ..engine import Function, Tensor
from ..nn import Linear, Module, Parameter
from .blockwise import QUANT_TYPES_4BIT, QuantState, dequantize_4bit, quantize_4bit
from .int8 import int8_vectorwise_dequant, int8_vectorwise_quant, matmul_8bit
from .requantize import checked_weight, requantize

def _linear_compute(x, w, b, compute_dtype: str):
    """``x @ w.T + b`` in ``compute_dtype`` (float32 accumulation), returned in x's dtype.

    16-bit compute is :mod:`minipeft.amp`'s (:class:`~minipeft.amp.AmpLinear`'s arithmetic): a
    real float16 or bfloat16 GEMM on the GPU, rounding emulation elsewhere, the float32 sums
    kept and the bias added in float32.
    """
    if compute_dtype == "float32":
        w = w.astype(x.dtype, copy=False)
        y = x @ w.T                                                    # (..., out)
        return y if b is None else y + b.astype(x.dtype, copy=False)
    bias = None if b is None else b.astype(np.float32, copy=False)  # added by the GEMM (on the GPU, its epilogue)
    y = gemm_2d(to_compute(x, compute_dtype), to_compute(w, compute_dtype).T, bias=bias)  # (..., out) float32
    return y.astype(x.dtype, copy=False)


def _grad_input(g, w, compute_dtype: str):
    """``dL/dx = g @ w`` in ``compute_dtype``, returned in g's dtype."""
    if compute_dtype == "float32":
        return g @ w.astype(g.dtype, copy=False)                       # (..., in)
    return gemm_2d(to_compute(g, compute_dtype), to_compute(w, compute_dtype)).astype(g.dtype, copy=False)


def _effective_compute_dtype(x, compute_dtype: str) -> str:
    """The layer's own ``compute_dtype``; a float32 layer follows an active :func:`amp.autocast`."""
    return compute_dtype if compute_dtype != "float32" else (autocast_dtype(x) or "float32")


def _weight_dtype(x, compute_dtype: str):
    """Dequantize straight to the 16-bit compute dtype where the product runs in real 16-bit arrays (the GPU).

    The kernel rounds ``code * absmax`` (float32) once to float16 or bfloat16, as bitsandbytes
    does, so no float32 weight is written and cast; elsewhere the weight is float32 and the
    emulation rounds it (``amp.to_compute``) to the same values."""
    if compute_dtype != "float32" and device_of(x) == "cuda":
        return device_dtype(compute_dtype)
    return np.float32


def dequantized_for(packed, quant_state, x, compute_dtype: str):
    """The weight (out, in) of 4-bit codes as a product with ``x`` in ``compute_dtype`` (resolved
    already, as :func:`_effective_compute_dtype` gives it) takes it: 16-bit straight from the
    kernel on the GPU, float32 elsewhere. :class:`MatMul4bit` and the fused LoRA op both call it."""
    return dequantize_4bit(packed, quant_state, dtype=_weight_dtype(x, compute_dtype))


class MatMul4bit(Function):
    """``y = x W^T (+ b)`` with ``W`` dequantized from 4-bit codes in forward *and* backward.

    Nothing is saved for backward: the codes and the quant state are weights (held by the
    layer anyway), the dequantized ``W`` is rebuilt when the gradient arrives, and ``x``
    is not needed because the 4-bit weight gets no gradient.
    """

    @staticmethod
    def forward(ctx, x, b=None, *, packed, quant_state, compute_dtype):
        compute_dtype = _effective_compute_dtype(x, compute_dtype)
        ctx.packed, ctx.quant_state, ctx.compute_dtype = packed, quant_state, compute_dtype
        w = dequantized_for(packed, quant_state, x, compute_dtype)     # (out, in)
        return _linear_compute(x, w, b, compute_dtype)                 # (..., out)

    @staticmethod
    def backward(ctx, g):
        needs = ctx.needs_input_grad
        gx = gb = None
        if needs[0]:
            w = dequantized_for(ctx.packed, ctx.quant_state, g, ctx.compute_dtype)  # again
            gx = _grad_input(g, w, ctx.compute_dtype)                  # (..., in)
        if len(needs) > 1 and needs[1]:
            gb = g.reshape(-1, g.shape[-1]).sum(axis=0)                # (out,)
        return (gx, gb) if len(needs) > 1 else (gx,)


class MatMul8bitLt(Function):
    """LLM.int8() ``y = x W^T (+ b)``; backward ``dL/dx = g · (CB · SCB / 127)``, nothing saved."""

    @staticmethod
    def forward(ctx, x, b=None, *, CB, SCB, threshold):
        ctx.CB, ctx.SCB = CB, SCB
        xp = xp_of(x)
        x32 = x if x.dtype in (np.float16, np.float32) else x.astype(xp.float32)
        y = matmul_8bit(x32, CB, SCB, threshold=threshold,
                        bias=None if b is None else b.astype(xp.float32))  # (..., out)
        return y.astype(x.dtype)

    @staticmethod
    def backward(ctx, g):
        needs = ctx.needs_input_grad
        gx = gb = None
        if needs[0]:
            w = int8_vectorwise_dequant(ctx.CB, ctx.SCB)               # (out, in) float32
            gx = g @ w.astype(g.dtype, copy=False)                     # (..., in)
        if len(needs) > 1 and needs[1]:
            gb = g.reshape(-1, g.shape[-1]).sum(axis=0)
        return (gx, gb) if len(needs) > 1 else (gx,)


def _check_linear(linear, what: str) -> None:
    if not isinstance(linear, Linear):
        raise TypeError(f"{what} is built from a minipeft.nn.Linear, got {type(linear).__name__}; "
                        "quantize a model's Linear layers with quantize_model(model)")


def _frozen_bias(linear: Linear):
    if linear.bias is None:
        return None
    return Parameter(linear.bias.data, requires_grad=False)


def _weight_for_quant(linear: Linear):
    w = linear.weight.data
    xp = xp_of(w)
    return w if w.dtype in (np.float16, np.float32) else w.astype(xp.float32)   # (out, in)


class _QuantLinear(Module):
    """What both quantized layers share: sizes, frozen bias, device, held arrays."""

    def __init__(self, linear: Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = _frozen_bias(linear)

    @property
    def device(self) -> str:
        return device_of(self.weight.data)

    def _bias_args(self):
        return () if self.bias is None else (self.bias,)

    def _held_arrays(self) -> list:
        """Every non-parameter array this layer keeps (for :func:`model_nbytes`)."""
        raise NotImplementedError

    def requantize(self, weight) -> float:
        """Store float ``weight`` (out, in) quantized with this layer's settings (a merge into it);
        return max |stored - weight|, the rounding it cost (``minipeft.quant.requantize``)."""
        return requantize(self, weight)

    def quantized_numel(self) -> int:
        """Parameters the quantized weight stands for (peft counts a 4-bit weight at its full size)."""
        return self.in_features * self.out_features

    def _check_shape(self, shape) -> None:
        if tuple(shape) != (self.out_features, self.in_features):
            raise ValueError(f"{type(self).__name__}: state is for a weight of shape {tuple(shape)}, "
                             f"but this layer is ({self.out_features}, {self.in_features})")


class Linear4bit(_QuantLinear):
    """A frozen Linear whose weight is 4-bit block-wise codes (bitsandbytes' ``Linear4bit``).

    ``Linear4bit(linear, quant_type='nf4', blocksize=64, compress_statistics=True,
    compute_dtype='float32')``. ``weight`` is a (non-trainable) Tensor of packed uint8
    codes, shape ``((out*in + 1)//2, 1)`` as in bitsandbytes; ``quant_state`` is its
    :class:`QuantState`. ``dequantize()`` returns the float weight (out, in).
    """

    def __init__(self, linear: Linear, quant_type: str = "nf4", blocksize: int = 64,
                 compress_statistics: bool = True, compute_dtype="float32") -> None:
        _check_linear(linear, "Linear4bit")
        if quant_type not in QUANT_TYPES_4BIT:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES_4BIT}, got {quant_type!r}")
        super().__init__(linear)
        self.compute_dtype = _check_compute_dtype(compute_dtype)
        packed, state = quantize_4bit(_weight_for_quant(linear), blocksize=blocksize,
                                      compress_statistics=compress_statistics, quant_type=quant_type)
        self._set_quantized(packed, state)

    def _set_quantized(self, packed, state: QuantState) -> None:
        self.weight = Tensor(packed)                                   # ((n+1)//2, 1) uint8, frozen
        self.quant_state = state
        self.quant_type, self.blocksize = state.quant_type, state.blocksize
        self.compress_statistics = state.nested

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear4bit: input has {x.shape[-1]} features, expected {self.in_features}")
        return MatMul4bit.apply(x, *self._bias_args(), packed=self.weight.data,
                                quant_state=self.quant_state, compute_dtype=self.compute_dtype)

    def dequantize(self, dtype=np.float32):
        """The float weight (out, in) the codes stand for (what LoRA merges into)."""
        return dequantize_4bit(self.weight.data, self.quant_state, dtype=dtype)

    def _quantize(self, weight):
        """(packed, state) of ``weight`` at this layer's quant_type, blocksize and double quantization
        (bitsandbytes' ``Params4bit`` made again from the merged float weight, as peft's merge does)."""
        w = checked_weight(self, weight)
        return quantize_4bit(w if w.dtype in (np.float16, np.float32) else w.astype(np.float32),
                             blocksize=self.blocksize, compress_statistics=self.compress_statistics,
                             quant_type=self.quant_type)

    def _dequantize_from(self, packed, state):
        return dequantize_4bit(packed, state, dtype=np.float32)

    def _store(self, packed, state) -> None:
        self._set_quantized(packed, state)

    # ---- state (bitsandbytes' key names) and devices
    def _extra_state(self) -> dict:
        out = {"weight": self.weight.data}
        for k, v in self.quant_state.as_dict(packed=True).items():
            out[f"weight.{k}"] = v
        return out

    def _load_extra_state(self, state: dict) -> None:
        own = set(self._extra_state())
        if set(state) != own:
            raise KeyError(f"Linear4bit state needs keys {sorted(own)}, got {sorted(state)}")
        qs = QuantState.from_dict({k[len("weight."):]: v for k, v in state.items() if k != "weight"})
        self._check_shape(qs.shape)
        packed = state["weight"]
        if np.dtype(packed.dtype) != np.uint8 or packed.size != (self.in_features * self.out_features + 1) // 2:
            raise ValueError(f"Linear4bit: 'weight' must be {(self.in_features * self.out_features + 1) // 2} "
                             f"packed uint8 bytes, got {packed.dtype} of size {packed.size}")
        device = self.device
        self._set_quantized(to_device(packed, device).copy().reshape(-1, 1), qs.to(device))

    def _moved_to(self, device: str) -> None:
        self.weight = Tensor(to_device(self.weight.data, device))
        self.quant_state = self.quant_state.to(device)

    def _held_arrays(self) -> list:
        s = self.quant_state
        arrays = [self.weight.data, s.absmax, s.code, s.offset]
        if s.state2 is not None:
            arrays += [s.state2.absmax, s.state2.code]
        return [a for a in arrays if a is not None and hasattr(a, "nbytes")]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, quant_type={self.quant_type}, blocksize={self.blocksize}, "
                f"compress_statistics={self.compress_statistics}, compute_dtype={self.compute_dtype}")


def _int8_params(W):
    """(CB, SCB) as bitsandbytes' ``Int8Params`` makes them: W rounded to float16, then row-wise absmax int8."""
    xp = xp_of(W)
    CB, SCB, _ = int8_vectorwise_quant(W.astype(xp.float16).astype(xp.float32))  # (out, in), (out,)
    return CB, SCB


class Linear8bitLt(_QuantLinear):
    """A frozen Linear with an int8 weight and LLM.int8() matmul (bitsandbytes' ``Linear8bitLt``).

    ``weight`` holds ``CB`` (out, in) int8, ``SCB`` the absmax of each output row, quantized
    from the weight rounded to float16 as bitsandbytes' ``Int8Params`` does;
    ``threshold`` (6.0, the paper's and Hugging Face's ``llm_int8_threshold``) sends input
    columns with any ``|x| >= threshold`` through a float matmul; 0 turns that off.
    """

    def __init__(self, linear: Linear, threshold: float = 6.0) -> None:
        _check_linear(linear, "Linear8bitLt")
        if not threshold >= 0:
            raise ValueError(f"threshold must be >= 0 (0 = no outlier decomposition), got {threshold}")
        super().__init__(linear)
        self.threshold = float(threshold)
        CB, SCB = _int8_params(_weight_for_quant(linear))             # (out, in), (out,)
        self.weight = Tensor(CB)
        self.SCB = SCB

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear8bitLt: input has {x.shape[-1]} features, expected {self.in_features}")
        return MatMul8bitLt.apply(x, *self._bias_args(), CB=self.weight.data, SCB=self.SCB,
                                  threshold=self.threshold)

    def dequantize(self, dtype=np.float32):
        """The float weight (out, in): ``CB * SCB / 127``."""
        return int8_vectorwise_dequant(self.weight.data, self.SCB).astype(dtype)

    def _quantize(self, weight):
        """(CB, SCB) of ``weight`` as bitsandbytes' ``Int8Params`` makes them: rounded to float16,
        then row-wise absmax int8 (peft's merge builds a new ``Int8Params`` from the merged weight)."""
        return _int8_params(checked_weight(self, weight))

    def _dequantize_from(self, CB, SCB):
        return int8_vectorwise_dequant(CB, SCB)

    def _store(self, CB, SCB) -> None:
        self.weight = Tensor(CB)
        self.SCB = SCB

    def _extra_state(self) -> dict:
        return {"weight": self.weight.data, "SCB": self.SCB}

    def _load_extra_state(self, state: dict) -> None:
        if set(state) != {"weight", "SCB"}:
            raise KeyError(f"Linear8bitLt state needs keys ['SCB', 'weight'], got {sorted(state)}")
        CB, SCB = state["weight"], state["SCB"]
        self._check_shape(CB.shape)
        if np.dtype(CB.dtype) != np.int8 or tuple(SCB.shape) != (self.out_features,):
            raise ValueError(f"Linear8bitLt: expected int8 'weight' and 'SCB' of shape ({self.out_features},), "
                             f"got {CB.dtype} and {tuple(SCB.shape)}")
        device = self.device
        self.weight = Tensor(to_device(CB, device).copy())
        self.SCB = to_device(SCB, device).astype(np.float32)

    def _moved_to(self, device: str) -> None:
        self.weight = Tensor(to_device(self.weight.data, device))
        self.SCB = to_device(self.SCB, device)

    def _held_arrays(self) -> list:
        return [self.weight.data, self.SCB]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, threshold={self.threshold}")


# ---------------------------------------------------------------------------------------
# Whole models
def _buffer(a):
    base = a
    while getattr(base, "base", None) is not None:
        base = base.base
    return base


def model_nbytes(*models: Module) -> int:
    """Bytes of the arrays the modules hold: parameters and quantized weights with their state.

    Each buffer counts once (tied weights, code tables shared between layers); gradients
    and optimizer state are not included.
    """
    seen: dict[int, int] = {}
    arrays = []
    for model in models:
        arrays += [p.data for p in model.parameters()]
        for m in model.modules():
            held = getattr(m, "_held_arrays", None)
            if held is not None:
                arrays += held()
    for a in arrays:
        b = _buffer(a)
        seen[id(b)] = int((b.nbytes if hasattr(b, "nbytes") else np.asarray(b).nbytes))
    return sum(seen.values())


@dataclass
class QuantizeReport:
    """What :func:`quantize_model` did."""

    replaced: list = field(default_factory=list)  # dotted names of the layers swapped
    bits: int = 4                                  # 4 or 8
    quant_type: str = "nf4"                        # nf4 | fp4 | int4 | int8
    bytes_before: int = 0                          # model_nbytes before
    bytes_after: int = 0                           # model_nbytes after
    linear_bytes_before: int = 0                   # bytes of the replaced layers before
    linear_bytes_after: int = 0                    # bytes of the replacing layers after

    @property
    def ratio(self) -> float:
        return self.bytes_before / max(self.bytes_after, 1)

    def __str__(self) -> str:
        mb = 1 / 2 ** 20
        return (f"quantize_model: {len(self.replaced)} Linear layers -> {self.quant_type} ({self.bits}-bit); "
                f"model {self.bytes_before * mb:.3f} MiB -> {self.bytes_after * mb:.3f} MiB "
                f"({self.ratio:.2f}x smaller); quantized layers {self.linear_bytes_before * mb:.3f} -> "
                f"{self.linear_bytes_after * mb:.3f} MiB")


def _matches(name: str, patterns) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _refuse_peft_model(model: Module) -> None:
    """A model that already holds PEFT adapters is refused: its adapters' Linears would be quantized and frozen.

    (Duck-typed, so that quant/ does not import peft/: a PeftModel has ``peft_config``, a
    tuner layer ``adapter_layer_names``.)
    """
    where = "it is a PeftModel" if getattr(model, "peft_config", None) is not None else None
    if where is None:
        where = next((f"its module {n!r} is a {type(m).__name__}" for n, m in model.named_modules()
                      if hasattr(type(m), "adapter_layer_names") or type(m).__name__ == "ModulesToSaveWrapper"),
                     None)
    if where is not None:
        raise ValueError(f"quantize_model: {type(model).__name__} already holds PEFT adapters ({where}); quantizing "
                         "now would quantize and freeze the adapters' own layers (LoRA's A and B), leaving nothing "
                         "to train. Quantize the base first, then add the adapter (QLoRA's order): "
                         "quantize_model(base); model = get_peft_model(base, config)")


def quantize_model(model: Module, quant_type: str = "nf4", blocksize: int = 64, compress_statistics: bool = True,
                   modules=None, skip=("lm_head",), bits: int = 4, compute_dtype="float32",
                   threshold: float = 6.0, verbose: bool = False) -> QuantizeReport:
    """Replace ``model``'s Linear layers by :class:`Linear4bit` (``bits=4``) or :class:`Linear8bitLt` (8).

    ``modules``: names or name suffixes to quantize (``['c_attn', 'mlp.c_fc']``); default
    every ``nn.Linear`` except those matching ``skip`` (``lm_head``, as QLoRA and
    Hugging Face leave the head in 16 bits; GPT-2's is tied to the embedding anyway).
    Quantize *before* adding adapters (a model holding adapters is refused with ``ValueError``). Returns a :class:`QuantizeReport` with the bytes
    the model holds before and after (printed when ``verbose``).
    """
    _refuse_peft_model(model)
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 (Linear4bit) or 8 (Linear8bitLt), got {bits!r}")
    if bits == 4 and quant_type not in QUANT_TYPES_4BIT:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES_4BIT} for bits=4, got {quant_type!r}")
    if isinstance(modules, str) or isinstance(skip, str):
        raise TypeError("modules and skip take a list of names, e.g. modules=['c_attn'] (not a bare string)")
    skip = tuple(skip or ())
    linears = [(n, m) for n, m in model.named_modules() if n and type(m) is Linear]
    if modules is None:
        chosen = [(n, m) for n, m in linears if not _matches(n, skip)]
    else:
        modules = list(modules)
        unmatched = [p for p in modules if not any(_matches(n, [p]) for n, _ in linears)]
        if unmatched:
            raise ValueError(f"quantize_model: {unmatched} match no nn.Linear of {type(model).__name__}; "
                             f"its Linear layers are {[n for n, _ in linears][:12]}")
        chosen = [(n, m) for n, m in linears if _matches(n, modules) and not _matches(n, skip)]
    owners: dict[int, list] = {}
    for mname, m in model.named_modules():
        for pname, p in m._parameters.items():
            owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    for n, m in chosen:
        if len(owners.get(id(m.weight), [])) > 1:
            others = [o for o in owners[id(m.weight)] if o != f"{n}.weight"]
            raise ValueError(f"quantize_model: {n}.weight is tied to {others}; quantizing it would untie them. "
                             f"Leave it out (skip=['{n.rsplit('.', 1)[-1]}'])")
    report = QuantizeReport(bits=bits, quant_type=quant_type if bits == 4 else "int8",
                            bytes_before=model_nbytes(model))
    report.linear_bytes_before = model_nbytes(*[m for _, m in chosen])
    new = []
    for n, m in chosen:
        if bits == 4:
            q = Linear4bit(m, quant_type=quant_type, blocksize=blocksize,
                           compress_statistics=compress_statistics, compute_dtype=compute_dtype)
        else:
            q = Linear8bitLt(m, threshold=threshold)
        q.train(m.training)
        model.set_submodule(n, q)
        new.append(q)
        report.replaced.append(n)
    report.linear_bytes_after = model_nbytes(*new)
    report.bytes_after = model_nbytes(model)
    if verbose:
        print(report)
    return report


__all__ = ["Linear4bit", "Linear8bitLt", "MatMul4bit", "MatMul8bitLt", "QuantizeReport", "model_nbytes",
           "quantize_model", "round_to_compute", "COMPUTE_DTYPES"]
