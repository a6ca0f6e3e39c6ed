"""Memory arithmetic (analytic): what fine-tuning holds in memory, by category.

Accounting follows ZeRO (arXiv 1910.02054, §3.1): weights, gradients and optimizer states
cost a fixed number of bytes per parameter (fp32 AdamW: 4 + 4 + 2*4 = 16), activations
depend on batch, sequence and architecture. LoRA (arXiv 2106.09685) trains r*(d_in+d_out)
parameters per adapted matrix; the frozen base gets no gradient and no state. QLoRA
(arXiv 2305.14314) stores that base in 4-bit NF4 with one absmax per block: 32/64 = 0.5
bit/param of constants, or 8/64 + 32/(64*256) = 0.127 with double quantization
(quantization.md §5). Side tuning (LST, arXiv 2206.06522) runs the backbone without a graph
and trains a network 1/rf as wide. Prompt/prefix tuning train p*d / p*2*L*d vectors.

Models: a GPT-2 shape (names as in the checkpoint, tied lm_head, biases everywhere) or a
raw parameter count. Units: GB = 1e9 bytes, MB = 1e6 (the course's units).
Each kind of fine-tuning the calculator knows is one entry of ``METHOD_MODELS`` (what it
adds to the model, what it does to the saved activations); a PEFT method's row in the
method table (``minipeft.peft.method_table()``, column ``memory``) names the entry that
models it. Activations are counted op by op in ``memory_activations``; the measured
counterpart (a profiler over a real step) lives in ``memory_measure``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Callable

from .memory_activations import activation_bytes
from .sizes import BASES, SHAPES, shape_of

GB, MB = 1e9, 1e6
_DTYPE_BYTES = {"float64": 8, "fp64": 8, "float32": 4, "fp32": 4, "float16": 2, "fp16": 2,
                "bfloat16": 2, "bf16": 2, "int8": 1, "uint8": 1}
OPTIMIZERS = ("adamw", "adam", "adamw8bit", "paged_adamw", "paged_adamw8bit", "sgd_momentum", "sgd")
MIN_8BIT_SIZE = 4096  # bnb: tensors with fewer elements keep 32-bit optimizer states
STATE_BLOCKSIZE = 256  # bnb 8-bit optimizer state block size (one fp32 absmax per block)


def dtype_bytes(name: str) -> int:
    """Bytes per element of a dtype name ('float32', 'bf16', ...)."""
    try:
        return _DTYPE_BYTES[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPE_BYTES)}") from None


# ----------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelShape:
    """A GPT-2-architecture model (pre-LN blocks, tied lm_head, learned positions)."""

    n_layer: int  # transformer blocks
    n_embd: int  # model width d
    n_head: int  # attention heads
    vocab_size: int = 50257  # GPT-2 BPE vocabulary
    n_positions: int = 1024  # context length (block_size)
    n_inner: int | None = None  # MLP width; None -> 4 * n_embd

    @property
    def d_ff(self) -> int:
        return 4 * self.n_embd if self.n_inner is None else self.n_inner


# Named shapes: GPT-2's sizes (Radford et al. 2019), GPT-3 175B (Brown et al. 2020, Table 2.1) and
# minipeft's own bases, all read from the one table in minipeft.sizes (base names such as 'small' too).
MODELS = {name: ModelShape(f["n_layer"], f["n_embd"], f["n_head"], f["vocab_size"], f["block_size"])
          for name, f in ((n, shape_of(n)) for n in [*SHAPES, *BASES])}
# LLaMA (Touvron et al. 2023, Table 2): published parameter counts, used as raw counts.
RAW_COUNTS = {"llama-7b": 6.7e9, "llama-13b": 13.0e9, "llama-33b": 32.5e9, "llama-65b": 65.2e9}


def as_shape(model) -> ModelShape:
    """ModelShape from a ModelShape, a name, a dict or a config object (GPTConfig, GPT2Config)."""
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, str):
        if model in MODELS:
            return MODELS[model]
        raise ValueError(f"unknown model {model!r}; shapes: {sorted(MODELS)}, raw counts: {sorted(RAW_COUNTS)}")
    get = model.get if isinstance(model, dict) else (lambda k, d=None: getattr(model, k, d))
    try:
        n_pos = get("n_positions", None) or get("block_size", None) or 1024
        shape = ModelShape(int(get("n_layer")), int(get("n_embd")), int(get("n_head")),
                           int(get("vocab_size", 50257)), int(n_pos), get("n_inner", None))
    except (TypeError, KeyError) as e:
        raise TypeError(f"cannot read a model shape from {model!r}: need n_layer, n_embd, n_head "
                        "(and optionally vocab_size, n_positions/block_size, n_inner)") from e
    if min(shape.n_layer, shape.n_embd, shape.n_head, shape.vocab_size, shape.n_positions, shape.d_ff) <= 0:
        raise ValueError(f"model shape sizes must be positive, got {shape}")
    return shape


def linear_shapes(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each linear in one block; '.q/.k/.v' are the slices of fused c_attn."""
    c, f = shape.n_embd, shape.d_ff
    out = {"attn.c_attn": (c, 3 * c), "attn.c_proj": (c, c), "mlp.c_fc": (c, f), "mlp.c_proj": (f, c)}
    out.update({f"attn.c_attn.{s}": (c, c) for s in "qkv"})
    return out


def gpt2_param_count(shape) -> int:
    """Exact parameter count of a GPT-2 LM with tied head (124,439,808 for GPT-2 small)."""
    s = as_shape(shape)
    c, f = s.n_embd, s.d_ff
    block = 2 * 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * f + f) + (f * c + c)  # ln_1,2; 4 linears
    return s.vocab_size * c + s.n_positions * c + s.n_layer * block + 2 * c  # wte, wpe, blocks, ln_f


def resolve_targets(shape: ModelShape, targets) -> list[str]:
    """Block-relative module names matched by peft-style targets (exact or '.'-suffix match)."""
    if isinstance(targets, str):
        targets = (targets,)
    names = list(linear_shapes(shape))
    found: list[str] = []
    for t in targets:
        hits = [n for n in names if n == t or n.endswith("." + t)]
        if not hits:
            raise ValueError(f"LoRA target {t!r} matches no module of a GPT-2 block; "
                             f"use one of {names} (or a suffix such as 'c_attn', 'c_proj')")
        found += [h for h in hits if h not in found]
    if "attn.c_attn" in found and any(n.startswith("attn.c_attn.") for n in found):
        raise ValueError("targets select both the whole attn.c_attn and its q/k/v slices; pick one")
    if not found:
        raise ValueError("no LoRA targets given; expected e.g. ('c_attn',)")
    return found


def lora_matrix_param_count(d_out: int, d_in: int, r: int) -> int:
    """LoRA on one d_out x d_in matrix: A (r x d_in) + B (d_out x r)."""
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {r!r}")
    if r > min(d_out, d_in):
        raise ValueError(f"LoRA rank {r} exceeds the matrix's smaller side {min(d_out, d_in)} "
                         f"({d_out}x{d_in}); a rank above it adds parameters but no capacity")
    return r * (d_in + d_out)


def lora_param_count(shape, targets, r: int) -> int:
    """Trainable LoRA parameters over every block (no LoRA bias, as peft bias='none')."""
    s = as_shape(shape)
    ls = linear_shapes(s)
    return s.n_layer * sum(lora_matrix_param_count(ls[m][1], ls[m][0], r) for m in resolve_targets(s, targets))


def quant_constant_bits(blocksize: int = 64, double_quant: bool = False, nested_blocksize: int = 256) -> float:
    """Bits per parameter spent on block-wise scale constants (quantization.md §5)."""
    for name, b in (("blocksize", blocksize), ("nested_blocksize", nested_blocksize)):
        if not isinstance(b, int) or b < 2 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 2 (bnb uses 64 and 256), got {b!r}")
    if not double_quant:
        return 32 / blocksize  # one fp32 absmax per block
    return 8 / blocksize + 32 / (blocksize * nested_blocksize)  # uint8 absmax + fp32 per 256 of them


# ---------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class MethodConfig:
    """What is trained. Flat: fields a method does not use are ignored by it."""

    method: str = "full"  # one of METHODS
    targets: tuple = ("attn.c_attn",)  # LoRA/QLoRA modules, peft-style suffix match
    r: int = 8  # LoRA rank
    lora_dropout: float = 0.0  # LoRA input dropout (saves a 1-byte mask when > 0)
    quantize: bool | None = None  # NF4 frozen base; None -> True for qlora only (True+side = QST)
    blocksize: int = 64  # NF4 block size (bnb default 64)
    double_quant: bool = True  # quantize the absmax constants (QLoRA default)
    reduction_factor: int = 8  # side network width divisor (LST: 8)
    n_virtual_tokens: int = 10  # prompt / prefix length p
    prefix_projection: bool = False  # prefix reparameterised by an MLP (training only)
    encoder_hidden_size: int = 512  # width of that MLP
    trainable_params: int | None = None  # for raw counts: adapter parameters (required there)


@dataclass(frozen=True)
class TrainConfig:
    """How it is trained."""

    batch_size: int = 1  # B
    seq_len: int | None = None  # T; None -> model's n_positions
    weight_dtype: str = "float32"  # trainable weights
    frozen_dtype: str | None = None  # frozen, unquantized weights; None -> weight_dtype
    grad_dtype: str | None = None  # None -> weight_dtype
    compute_dtype: str | None = None  # activations; None -> weight_dtype
    optimizer: str = "adamw"  # one of OPTIMIZERS
    state_dtype: str = "float32"  # 32-bit optimizers' states
    master_weights: bool = False  # fp32 master copy (mixed precision; ZeRO's K = 12)
    resid_pdrop: float = 0.0  # residual dropout (1-byte mask per element when > 0)
    embd_pdrop: float = 0.0  # embedding dropout
    save_frozen_linear_inputs: bool = False  # True: a frozen linear keeps x anyway (naive engine)
    ledger_view: bool = False  # True: skip arrays made outside the graph, as the engine's ledger does


# ---------------------------------------------------------------------- method models


def _lora_tensors(s: ModelShape, m: MethodConfig) -> list:
    ls = linear_shapes(s)
    out = []
    for mod in resolve_targets(s, m.targets):
        lora_matrix_param_count(ls[mod][1], ls[mod][0], m.r)  # validates the rank
        out += [(f"h.{i}.{mod}.lora_{ab}.weight", m.r * ls[mod][ab == "B"], True, False)
                for i in range(s.n_layer) for ab in "AB"]
    return out


def _prefix_tensors(s: ModelShape, m: MethodConfig) -> list:
    c, L, p, h = s.n_embd, s.n_layer, m.n_virtual_tokens, m.encoder_hidden_size
    if m.prefix_projection:  # Embedding(p, d) -> Linear(d, h) -> tanh -> Linear(h, 2 L d)
        return [("prefix.embedding", p * c, True, False), ("prefix.mlp.0", c * h + h, True, False),
                ("prefix.mlp.2", h * 2 * L * c + 2 * L * c, True, False)]
    return [("prefix.embedding", p * 2 * L * c, True, False)]


def _side_tensors(s: ModelShape, m: MethodConfig) -> list:
    c, L = s.n_embd, s.n_layer
    ds, fs = c // m.reduction_factor, s.d_ff // m.reduction_factor
    if ds < 1 or fs < 1:
        raise ValueError(f"reduction_factor {m.reduction_factor} leaves no side width for d={c}")
    side = gpt2_param_count(ModelShape(L, ds, 1, 1, 1, fs)) - 4 * ds  # blocks only (no wte, wpe, ln_f)
    return [("side.downsamples", (L + 1) * (c * ds + ds), True, False), ("side.gates", L, True, False),
            ("side.blocks", side, True, False), ("side.upsample", ds * c + c, True, False)]


@dataclass(frozen=True)
class MethodModel:
    """How the calculator models one kind of fine-tuning (an entry of ``METHOD_MODELS``)."""

    adds: Callable  # (ModelShape, MethodConfig) -> [(name, numel, trainable, quantized)] added to the base
    activations: Callable  # (ModelShape, MethodConfig) -> activation_bytes keyword arguments
    trains_base: bool = False  # the base's own tensors train (full fine-tuning)
    quantized_base: bool = False  # NF4 base unless MethodConfig.quantize says otherwise (QLoRA)


def _lora_activations(s: ModelShape, m: MethodConfig) -> dict:
    return dict(lora_ranks={k: m.r for k in resolve_targets(s, m.targets)})


METHOD_MODELS = {
    "full": MethodModel(lambda s, m: [], lambda s, m: dict(
        trainable_linears=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), ln_trainable=True,
        embeddings_trainable=True), trains_base=True),
    "lora": MethodModel(_lora_tensors, _lora_activations),
    "qlora": MethodModel(_lora_tensors, _lora_activations, quantized_base=True),
    "side": MethodModel(_side_tensors, lambda s, m: dict(  # LST: the backbone runs without a graph
        side_width=s.n_embd // m.reduction_factor, side_inner=s.d_ff // m.reduction_factor)),
    "prompt": MethodModel(lambda s, m: [("prompt_embeddings", m.n_virtual_tokens * s.n_embd, True, False)],
                          lambda s, m: dict(n_prompt=m.n_virtual_tokens)),
    "prefix": MethodModel(_prefix_tensors, lambda s, m: dict(n_prefix=m.n_virtual_tokens)),
}
METHODS = tuple(METHOD_MODELS)


# --------------------------------------------------------------------------- estimate


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes by category. weights_frozen includes packed 4-bit codes; their scales are quant_constants."""

    weights_trainable: int
    weights_frozen: int
    gradients: int
    optimizer_state: int
    activations: int
    quant_constants: int
    n_params: int = 0  # all parameters (base + added)
    n_trainable: int = 0
    optimizer_paged: bool = False  # paged optimizer: state lives in host memory
    activations_known: bool = True  # False for raw parameter counts

    @property
    def total(self) -> int:
        return (self.weights_trainable + self.weights_frozen + self.gradients + self.optimizer_state
                + self.activations + self.quant_constants)

    @property
    def device_total(self) -> int:
        """Total minus optimizer state paged out to the host."""
        return self.total - (self.optimizer_state if self.optimizer_paged else 0)

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "device_total": self.device_total}

    def table(self, title: str = "") -> str:
        rows = [(f.name, getattr(self, f.name)) for f in fields(self)][:6] + [("total", self.total)]
        lines = [title] if title else []
        lines.append(f"{'category':<20}{'bytes':>18}  {'human':>10}")
        for name, v in rows:
            note = " (n/a: raw count)" if name == "activations" and not self.activations_known else ""
            note += " (paged, host)" if name == "optimizer_state" and self.optimizer_paged else ""
            lines.append(f"{name:<20}{v:>18,}  {format_bytes(v):>10}{note}")
        lines.append(f"parameters {self.n_params:,}, trainable {self.n_trainable:,} "
                     f"({100 * self.n_trainable / max(self.n_params, 1):.4g}%)")
        return "\n".join(lines)


def format_bytes(n: float) -> str:
    """Decimal units, as the course: 24 GB = 24e9 bytes."""
    for unit, size in (("TB", 1e12), ("GB", GB), ("MB", MB), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _check(method: MethodConfig, train: TrainConfig):
    if method.method not in METHODS:
        raise ValueError(f"unknown method {method.method!r}; expected one of {METHODS}")
    if train.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {train.optimizer!r}; expected one of {OPTIMIZERS}")
    if method.quantize and METHOD_MODELS[method.method].trains_base:
        raise ValueError("full fine-tuning cannot train a 4-bit base; use method='qlora' or quantize=False")
    for name in ("r", "reduction_factor", "n_virtual_tokens", "encoder_hidden_size"):
        v = getattr(method, name)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    for name, p in (("lora_dropout", method.lora_dropout), ("resid_pdrop", train.resid_pdrop),
                    ("embd_pdrop", train.embd_pdrop)):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {p}")
    quant_constant_bits(method.blocksize)  # validates the block size
    if not isinstance(train.batch_size, int) or train.batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {train.batch_size!r}")


def _gpt2_tensors(s: ModelShape, m: MethodConfig, quantize: bool):
    """[(name, numel, trainable, quantized)] for a GPT-2 shape under a method."""
    c, L, full = s.n_embd, s.n_layer, METHOD_MODELS[m.method].trains_base
    out = [("transformer.wte.weight", s.vocab_size * c, full, False),
           ("transformer.wpe.weight", s.n_positions * c, full, False)]
    for i in range(L):
        for mod, (d_in, d_out) in list(linear_shapes(s).items())[:4]:
            out += [(f"h.{i}.{mod}.weight", d_in * d_out, full, quantize), (f"h.{i}.{mod}.bias", d_out, full, False)]
        out += [(f"h.{i}.{ln}.{w}", c, full, False) for ln in ("ln_1", "ln_2") for w in ("weight", "bias")]
    out += [("transformer.ln_f.weight", c, full, False), ("transformer.ln_f.bias", c, full, False)]
    return out + METHOD_MODELS[m.method].adds(s, m)


def estimate_memory(model, method: MethodConfig | None = None, train: TrainConfig | None = None) -> MemoryBreakdown:
    """Breakdown of one training step's memory (bytes) for a model shape, name or raw count."""
    m, t = method or MethodConfig(), train or TrainConfig()
    _check(m, t)
    model_of = METHOD_MODELS[m.method]
    quantize = model_of.quantized_base if m.quantize is None else bool(m.quantize)
    wb, ab = dtype_bytes(t.weight_dtype), dtype_bytes(t.compute_dtype or t.weight_dtype)
    fb, gb = dtype_bytes(t.frozen_dtype or t.weight_dtype), dtype_bytes(t.grad_dtype or t.weight_dtype)
    sb = dtype_bytes(t.state_dtype)
    raw = isinstance(model, (int, float)) and not isinstance(model, bool)
    raw = raw or (isinstance(model, str) and model in RAW_COUNTS)
    if raw:
        n = int(RAW_COUNTS.get(model, model))
        if n <= 0:
            raise ValueError(f"parameter count must be positive, got {model}")
        tensors = [("base", n, model_of.trains_base, quantize)]
        if not model_of.trains_base:
            if m.trainable_params is None or m.trainable_params < 1:
                raise ValueError(f"a raw parameter count with method {m.method!r} needs "
                                 "MethodConfig(trainable_params=...) (the adapter's size)")
            tensors.append(("adapter", int(m.trainable_params), True, False))
    else:
        s = as_shape(model)
        tensors = _gpt2_tensors(s, m, quantize)
    trainable = [k for _, k, tr, _ in tensors if tr]
    w_tr = sum(trainable) * wb
    w_fr = q_c = 0
    for _, k, tr, q in tensors:
        if tr:
            continue
        if q:  # NF4: two codes per byte + block constants (+ one fp32 offset per tensor with DQ)
            nb = -(-k // m.blocksize)
            w_fr += (k + 1) // 2
            q_c += (nb + 4 * -(-nb // 256) + 4) if m.double_quant else 4 * nb
            q_c += 16 * 4  # each quantized tensor's state carries its 16-entry float32 code table
            q_c += 256 * 4 if m.double_quant else 0  # and the 8-bit dynamic map of its nested absmax
        else:
            w_fr += k * fb
    if raw and quantize:  # a raw count is one 'tensor': use the per-parameter rate
        q_c = math.ceil(tensors[0][1] * quant_constant_bits(m.blocksize, m.double_quant) / 8)
    opt = t.optimizer.replace("paged_", "")
    per_state = {"adamw": 2, "adam": 2, "sgd_momentum": 1, "sgd": 0}
    if opt == "adamw8bit":  # bnb: uint8 states + fp32 absmax per 256; small tensors stay 32-bit
        o = sum(8 * k if k < MIN_8BIT_SIZE else 2 * k + 8 * -(-k // STATE_BLOCKSIZE) for k in trainable)
    else:
        o = per_state[opt] * sb * sum(trainable)
    o += 4 * sum(trainable) if t.master_weights else 0
    acts, known = 0, not raw
    if known:
        T = s.n_positions if t.seq_len is None else t.seq_len
        if not isinstance(T, int) or T < 1:
            raise ValueError(f"seq_len must be an integer >= 1, got {T!r}")
        acts = sum(activation_bytes(
            t.batch_size, T, s.n_layer, s.n_embd, s.n_head, s.d_ff, s.vocab_size, ab, lora_dropout=m.lora_dropout,
            save_frozen_linear_inputs=t.save_frozen_linear_inputs, resid_pdrop=t.resid_pdrop,
            embd_pdrop=t.embd_pdrop, ledger_view=t.ledger_view, **model_of.activations(s, m)).values())
    return MemoryBreakdown(w_tr, w_fr, sum(trainable) * gb, o, acts, q_c, sum(k for _, k, _, _ in tensors),
                           sum(trainable), t.optimizer.startswith("paged_"), known)


# ----------------------------------------------------------------------- course cases


@dataclass(frozen=True)
class CourseFigure:
    case: str  # what is computed
    minipeft: float  # computed here from the case's inputs
    course: float  # as stated in the lecture notes / issue
    unit: str
    relation: str = "≈"  # '≈' within rel_tol, '≤' / '<' a bound the course number states
    rel_tol: float = 0.01
    note: str = ""

    @property
    def ok(self) -> bool:
        if self.relation == "≤":
            return self.minipeft <= self.course * (1 + 1e-12)
        if self.relation == "<":
            return self.minipeft < self.course
        if self.relation == "≥":
            return self.minipeft >= self.course * (1 - 1e-12)
        return abs(self.minipeft - self.course) <= self.rel_tol * abs(self.course)


# LLaMA dims (released configs: layers, hidden, intermediate) only to size QLoRA's r=64 adapters
_LLAMA_DIMS = {"llama-33b": (60, 6656, 17920), "llama-65b": (80, 8192, 22016)}


def course_figures() -> list[CourseFigure]:
    """Each course memory figure recomputed from its inputs, next to the number the course states."""
    F = CourseFigure
    rows = []
    full32 = TrainConfig(weight_dtype="float32", optimizer="adamw")
    b = estimate_memory(1.5e9, MethodConfig("full"), full32)
    rows.append(F("1.5B params, fp32 AdamW: weights 4 + grads 4 + m,v 8 B/param", b.total / GB, 24, "GB",
                  note="model states only; activations, buffers and fragmentation come on top"))
    b = estimate_memory("gpt2-xl", MethodConfig("full"), full32)
    rows.append(F("GPT-2 XL exact count (1,557,611,200), same accounting, states only",
                  (b.total - b.activations) / GB, 24, "GB", "≥"))
    bits, dq = quant_constant_bits(64), quant_constant_bits(64, double_quant=True)
    rows.append(F("block-wise fp32 absmax constants, block 64", bits, 0.5, "bit/param", rel_tol=0))
    rows.append(F("double quant: 8-bit constants + fp32 per 256 blocks", dq, 0.127, "bit/param", rel_tol=0.005))
    rows.append(F("double quant: reduction of constant memory", 100 * (1 - dq / bits), 75, "%", rel_tol=0.01))
    rows.append(F("double quant saving at 65B (LLaMA 65.2B)", RAW_COUNTS["llama-65b"] * (bits - dq) / 8 / GB, 3,
                  "GB", rel_tol=0.05, note=f"saving {bits - dq:.3f} bit/param (course: ~0.4)"))
    lo = lora_matrix_param_count(512, 64, 8)
    rows.append(F("LoRA r=8 on 512x64: trainable (A 8x64 + B 512x8)", lo, 512 + 4096, "params", rel_tol=0))
    rows.append(F("LoRA r=8 on 512x64: trainable cut vs 32,768", 100 * (1 - lo / (512 * 64)), 86, "%", rel_tol=0.005))
    g3 = gpt2_param_count("gpt3-175b")
    rows.append(F("GPT-3 175B parameters from its shape (96 x 12288, vocab 50257, ctx 2048)", g3 / 1e9, 175, "B",
                  note="tied head, GPT-2 architecture"))
    lq = MethodConfig("lora", targets=("c_attn.q", "c_attn.v"), r=4)
    nl = lora_param_count("gpt3-175b", lq.targets, 4)
    rows.append(F("GPT-3 LoRA r=4 on Wq, Wv: trainable", nl / 1e6, 18, "M", rel_tol=0.05,
                  note="LoRA paper §7.1 budget of 18M; the course's '18M' is rounded down"))
    rows.append(F("GPT-3 LoRA r=4 on Wq, Wv: share of all parameters", 100 * nl / g3, 0.01, "%", rel_tol=0.1))
    half = TrainConfig(batch_size=1, seq_len=1, weight_dtype="float16", state_dtype="float16")
    b = estimate_memory("gpt3-175b", MethodConfig("full"), half)
    rows.append(F("GPT-3 full FT, all 16-bit: weights, grads, Adam m, v (8 B/param)", (b.total - b.activations) / 1e12,
                  1.2, "TB", rel_tol=0.2, note="the paper's 1.2 TB is measured; it implies "
                  f"{1.2e12 / g3:.2f} B/param: no standard accounting gives it (16 B/param: 2.79 TB)"))
    b = estimate_memory("gpt3-175b", lq, half)
    rows.append(F("GPT-3 LoRA r=4 (Wq, Wv): fp16 frozen weights + LoRA states", (b.total - b.activations) / GB,
                  350, "GB", note="= the fp16 checkpoint: 2 B x 174.6B; LoRA adds 0.15 GB"))
    rows.append(F("GPT-3 LoRA checkpoint (A, B in fp16)", nl * 2 / MB, 35, "MB", rel_tol=0.1,
                  note="LoRA paper: 350 GB -> 35 MB"))
    b = estimate_memory("gpt3-175b", MethodConfig("full"), TrainConfig(
        seq_len=1, weight_dtype="float16", state_dtype="float32", master_weights=True))
    rows.append(F("GPT-3 full FT, mixed-precision Adam (16 B/param): A100-40GB GPUs for states",
                  math.ceil((b.total - b.activations) / (40 * GB)), 80, "GPUs", "≤",
                  note="states alone; activations and buffers need the rest"))
    for name, course in (("llama-7b", 6), ("llama-13b", 10), ("llama-33b", 21), ("llama-65b", 41)):
        n = RAW_COUNTS[name]
        rows.append(F(f"{name} ({n / 1e9:.1f}B) 4-bit base, NF4 bs 64 + double quant", n * (4 + dq) / 8 / GB,
                      course, "GB", "≤", note="course: Guanaco footprint (base + adapters + 16-bit parts)"))
    rows.append(F("llama-13b in 16 bit (Vicuna 13B)", RAW_COUNTS["llama-13b"] * 2 / GB, 26, "GB"))
    for name, gpu in (("llama-65b", 48), ("llama-33b", 24)):
        L, d, ff = _LLAMA_DIMS[name]
        n_lora = L * 64 * (4 * (d + d) + 3 * (d + ff))  # r=64 on q,k,v,o,gate,up,down
        b = estimate_memory(name, MethodConfig("qlora", trainable_params=n_lora), TrainConfig(
            weight_dtype="bfloat16", optimizer="paged_adamw"))
        rows.append(F(f"{name} QLoRA (r=64 all linears, bf16 LoRA, paged fp32 AdamW) on device",
                      b.device_total / GB, gpu, "GB", "<", note=f"{gpu - b.device_total / GB:.1f} GB left for "
                      f"activations; {n_lora / 1e6:.0f}M LoRA params"))
    b = estimate_memory("llama-65b", MethodConfig("full"), TrainConfig(weight_dtype="float16"))
    rows.append(F("llama-65b 16-bit full FT: fp16 W + grads + fp32 m, v (12 B/param)", b.total / GB, 780, "GB",
                  "≥", note="QLoRA paper '>780 GB' (methods.md §18.4, unverified)"))
    return rows


def format_course_figures(rows=None) -> str:
    rows = course_figures() if rows is None else rows
    out = [f"{'case':<78}{'minipeft':>12} {'course':>9} {'unit':<10} ok"]
    for r in rows:
        out.append(f"{r.case:<78}{r.minipeft:>12.6g} {r.relation}{r.course:>8g} {r.unit:<10} "
                   f"{'yes' if r.ok else 'NO'}{'  ' + r.note if r.note else ''}")
    return "\n".join(out)
