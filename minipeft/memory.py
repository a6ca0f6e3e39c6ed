"""Memory arithmetic (analytic): what fine-tuning holds in memory, by category.

Accounting follows ZeRO (arXiv 1910.02054, §3.1): weights, gradients and optimizer states
cost a fixed number of bytes per parameter (fp32 AdamW: 4 + 4 + 2*4 = 16), activations
depend on batch, sequence and architecture. LoRA (arXiv 2106.09685) trains r*(d_in+d_out)
parameters per adapted matrix; the frozen base gets no gradient and no state. QLoRA
(arXiv 2305.14314) stores that base in 4-bit NF4 with one absmax per block: 32/64 = 0.5
bit/param of constants, or 8/64 + 32/(64*256) = 0.127 with double quantization
(quantization.md §5). Side tuning (LST, arXiv 2206.06522) runs the backbone without a graph
and trains a network 1/rf as wide. Prompt/prefix tuning train p*d / p*2*L*d vectors.

The vocabulary is the library's own: a model is a ``GPTConfig`` (or a size name from
``minipeft.sizes``, read through ``GPTConfig.preset``; GPT-2's architecture, tied lm_head,
biases everywhere) or a raw parameter count; what is trained is a PEFT config
(``LoraConfig``, ``PromptTuningConfig``, ...; ``method_config`` reads it) or a
``MethodConfig``; how one step runs is a ``StepSetup``. Predicted and measured memory are
the same ``Breakdown``. Units: GB = 1e9 bytes, MB = 1e6 (the course's units).
Each kind of fine-tuning the calculator knows is one entry of ``METHOD_MODELS`` (what it
adds to the model, what it does to the saved activations); a PEFT method's row in the
method table (``minipeft.peft.method_table()``, column ``memory``) names the entry that
models it. Activations are counted op by op in ``memory_activations``; the measured
counterpart (a profiler over a real step) lives in ``memory_measure``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable

from .gpt import GPTConfig
from .memory_activations import activation_bytes
from .sizes import BASES, SHAPES

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


# Named shapes: GPT-2's sizes (Radford et al. 2019), GPT-3 175B (Brown et al. 2020, Table 2.1) and
# minipeft's own bases: the one table of minipeft.sizes, read through GPTConfig.preset.
# LLaMA (Touvron et al. 2023, Table 2): published parameter counts, used as raw counts.
RAW_COUNTS = {"llama-7b": 6.7e9, "llama-13b": 13.0e9, "llama-33b": 32.5e9, "llama-65b": 65.2e9}


def as_config(model) -> GPTConfig:
    """The ``GPTConfig`` of a GPTConfig, a size name ('gpt2', 'small'), a dict or a config object (GPT2Config).

    A dict or foreign object must give n_layer, n_embd and n_head; its vocabulary defaults to
    GPT-2's 50257 and its positions to ``n_positions`` (Hugging Face) or ``block_size``.
    """
    if isinstance(model, GPTConfig):
        return model
    if isinstance(model, str):
        if model in SHAPES or model in BASES:
            return GPTConfig.preset(model)
        raise ValueError(f"unknown model {model!r}; sizes: {sorted([*SHAPES, *BASES])}, "
                         f"raw counts: {sorted(RAW_COUNTS)}")
    get = model.get if isinstance(model, dict) else (lambda k, d=None: getattr(model, k, d))
    try:
        n_pos = get("n_positions", None) or get("block_size", None) or 1024
        fields_ = dict(n_layer=int(get("n_layer")), n_embd=int(get("n_embd")), n_head=int(get("n_head")),
                       vocab_size=int(get("vocab_size", 50257)), block_size=int(n_pos), n_inner=get("n_inner", None))
    except (TypeError, KeyError) as e:
        raise TypeError(f"cannot read a model shape from {model!r}: need n_layer, n_embd, n_head "
                        "(and optionally vocab_size, n_positions/block_size, n_inner)") from e
    return GPTConfig(**fields_)  # checks every size is positive


def linear_shapes(shape: GPTConfig) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each linear in one block; '.q/.k/.v' are the slices of fused c_attn."""
    c, f = shape.n_embd, shape.d_ff
    out = {"attn.c_attn": (c, 3 * c), "attn.c_proj": (c, c), "mlp.c_fc": (c, f), "mlp.c_proj": (f, c)}
    out.update({f"attn.c_attn.{s}": (c, c) for s in "qkv"})
    return out


def block_param_count(c: int, f: int) -> int:
    """Parameters of one GPT-2 block of width ``c`` and MLP width ``f``: ln_1, ln_2 and four linears."""
    return 2 * 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * f + f) + (f * c + c)


def gpt2_param_count(model) -> int:
    """Exact parameter count of a GPT-2 LM with tied head (124,439,808 for GPT-2 small)."""
    s = as_config(model)
    block = block_param_count(s.n_embd, s.d_ff)
    return s.vocab_size * s.n_embd + s.block_size * s.n_embd + s.n_layer * block + 2 * s.n_embd  # wte, wpe, ln_f


def resolve_targets(shape: GPTConfig, targets) -> list[str]:
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


def lora_param_count(model, targets, r: int) -> int:
    """Trainable LoRA parameters over every block (no LoRA bias, as peft bias='none')."""
    s = as_config(model)
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


def method_config(config=None, quantize: bool | None = None) -> MethodConfig:
    """The ``MethodConfig`` that models a PEFT config (``LoraConfig``, ``PromptTuningConfig``, ...).

    A ``MethodConfig`` passes through, None is full fine-tuning. ``quantize=True`` models the
    base in NF4 (LoRA on it is QLoRA; a side network on it is QST). A setting the calculator
    cannot model (a regex of targets, per-module ranks, DoRA, trained biases) is an error.
    """
    if config is None:
        return MethodConfig("full", quantize=quantize)
    if isinstance(config, MethodConfig):
        return config if quantize is None else replace(config, quantize=quantize)
    kind = getattr(config, "peft_type", None)
    name = type(config).__name__
    if kind == "LORA":
        targets = config.target_modules or ("c_attn",)  # peft's GPT-2 default
        unmodelled = [what for what, bad in (
            ("a regex of target_modules", isinstance(targets, str)), ("rank_pattern", bool(config.rank_pattern)),
            ("layers_to_transform", config.layers_to_transform is not None), ("use_dora", config.use_dora),
            (f"bias={config.bias!r}", config.bias != "none")) if bad]
        if unmodelled:
            raise ValueError(f"the memory calculator models plain LoRA; {name} sets {', '.join(unmodelled)}. "
                             "Give a list of target module names and leave the rest at peft's defaults")
        return MethodConfig("qlora" if quantize else "lora", targets=tuple(targets), r=config.r,
                            lora_dropout=config.lora_dropout)
    if kind == "PROMPT_TUNING":
        return MethodConfig("prompt", n_virtual_tokens=config.num_virtual_tokens, quantize=quantize)
    if kind == "PREFIX_TUNING":
        return MethodConfig("prefix", n_virtual_tokens=config.num_virtual_tokens, quantize=quantize,
                            prefix_projection=config.prefix_projection,
                            encoder_hidden_size=config.encoder_hidden_size or MethodConfig.encoder_hidden_size)
    if kind in ("LST", "QST"):
        return MethodConfig("side", reduction_factor=config.reduction_factor,
                            quantize=(kind == "QST") if quantize is None else quantize)
    if kind == "FULL":
        return MethodConfig("full", quantize=quantize)
    raise ValueError(f"the memory calculator has no model of {name} (peft_type {kind!r}); it models "
                     "LoraConfig, PromptTuningConfig, PrefixTuningConfig, LSTConfig, QSTConfig and "
                     "FullFineTuningConfig, or give a MethodConfig")


@dataclass(frozen=True)
class StepSetup:
    """How one training step runs: batch, sequence, dtypes, optimizer (``train.TrainConfig`` says how long)."""

    batch_size: int = 1  # B
    seq_len: int | None = None  # T; None -> the model's block_size (its positions)
    weight_dtype: str = "float32"  # trainable weights
    frozen_dtype: str | None = None  # frozen, unquantized weights; None -> weight_dtype
    grad_dtype: str | None = None  # None -> weight_dtype
    compute_dtype: str | None = None  # activations; None -> weight_dtype (16-bit with float32 weights: amp.autocast)
    optimizer: str = "adamw"  # one of OPTIMIZERS
    state_dtype: str = "float32"  # 32-bit optimizers' states
    master_weights: bool = False  # fp32 master copy (mixed precision; ZeRO's K = 12)
    resid_pdrop: float = 0.0  # residual dropout (1-byte mask per element when > 0)
    embd_pdrop: float = 0.0  # embedding dropout
    save_frozen_linear_inputs: bool = False  # True: a frozen linear keeps x anyway (naive engine)
    ledger_view: bool = False  # True: skip arrays made outside the graph, as the engine's ledger does
    gradient_checkpointing: bool = False  # True: blocks keep their input only, recomputed in backward


# ---------------------------------------------------------------------- method models


def _lora_tensors(s: GPTConfig, m: MethodConfig) -> list:
    ls = linear_shapes(s)
    out = []
    for mod in resolve_targets(s, m.targets):
        lora_matrix_param_count(ls[mod][1], ls[mod][0], m.r)  # validates the rank
        out += [(f"h.{i}.{mod}.lora_{ab}.weight", m.r * ls[mod][ab == "B"], True, False)
                for i in range(s.n_layer) for ab in "AB"]
    return out


def _prefix_tensors(s: GPTConfig, m: MethodConfig) -> list:
    c, L, p, h = s.n_embd, s.n_layer, m.n_virtual_tokens, m.encoder_hidden_size
    if m.prefix_projection:  # Embedding(p, d) -> Linear(d, h) -> tanh -> Linear(h, 2 L d)
        return [("prefix.embedding", p * c, True, False), ("prefix.mlp.0", c * h + h, True, False),
                ("prefix.mlp.2", h * 2 * L * c + 2 * L * c, True, False)]
    return [("prefix.embedding", p * 2 * L * c, True, False)]


def _side_tensors(s: GPTConfig, m: MethodConfig) -> list:
    c, L = s.n_embd, s.n_layer
    ds, fs = c // m.reduction_factor, s.d_ff // m.reduction_factor
    if ds < 1 or fs < 1:
        raise ValueError(f"reduction_factor {m.reduction_factor} leaves no side width for d={c}")
    side = L * block_param_count(ds, fs)
    return [("side.downsamples", (L + 1) * (c * ds + ds), True, False), ("side.gates", L, True, False),
            ("side.blocks", side, True, False), ("side.upsample", ds * c + c, True, False)]


@dataclass(frozen=True)
class MethodModel:
    """How the calculator models one kind of fine-tuning (an entry of ``METHOD_MODELS``)."""

    adds: Callable  # (GPTConfig, MethodConfig) -> [(name, numel, trainable, quantized)] added to the base
    activations: Callable  # (GPTConfig, MethodConfig) -> activation_bytes keyword arguments
    trains_base: bool = False  # the base's own tensors train (full fine-tuning)
    quantized_base: bool = False  # NF4 base unless MethodConfig.quantize says otherwise (QLoRA)


def _lora_activations(s: GPTConfig, m: MethodConfig) -> dict:
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


CATEGORIES = ("weights_trainable", "weights_frozen", "gradients", "optimizer_state", "activations",
              "quant_constants")


@dataclass(frozen=True)
class Breakdown:
    """One training step's memory in bytes by category, predicted (``estimate_memory``) or measured
    (``memory_measure.measure_training_step``). weights_frozen includes packed 4-bit codes; their
    scales and code tables are quant_constants."""

    weights_trainable: int  # parameters that train
    weights_frozen: int  # frozen parameters and packed quantized codes
    gradients: int  # .grad arrays (trainable parameters only)
    optimizer_state: int  # the optimizer's moments (and master weights)
    activations: int  # bytes saved for backward (peak of the step)
    quant_constants: int  # absmax, nested absmax, offsets and code tables of quantized weights
    n_params: int = 0  # predicted: all parameters (base + added)
    n_trainable: int = 0  # predicted: trainable parameters
    optimizer_paged: bool = False  # paged optimizer: state lives in host memory
    activations_known: bool = True  # False for raw parameter counts (no shape, no activations)
    device_peak: int = 0  # measured on a GPU: peak bytes of the CuPy pool during the step (0 elsewhere)
    step_seconds: float = 0.0  # measured: wall time of the step
    loss: float | None = None  # measured: the step's loss

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
        rows = [(name, getattr(self, name)) for name in CATEGORIES] + [("total", self.total)]
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


def _check(method: MethodConfig, train: StepSetup):
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


def _gpt2_tensors(s: GPTConfig, m: MethodConfig, quantize: bool):
    """[(name, numel, trainable, quantized)] for a GPT-2 shape under a method."""
    c, L, full = s.n_embd, s.n_layer, METHOD_MODELS[m.method].trains_base
    out = [("transformer.wte.weight", s.vocab_size * c, full, False),
           ("transformer.wpe.weight", s.block_size * c, full, False)]
    for i in range(L):
        for mod, (d_in, d_out) in list(linear_shapes(s).items())[:4]:
            out += [(f"h.{i}.{mod}.weight", d_in * d_out, full, quantize), (f"h.{i}.{mod}.bias", d_out, full, False)]
        out += [(f"h.{i}.{ln}.{w}", c, full, False) for ln in ("ln_1", "ln_2") for w in ("weight", "bias")]
    out += [("transformer.ln_f.weight", c, full, False), ("transformer.ln_f.bias", c, full, False)]
    return out + METHOD_MODELS[m.method].adds(s, m)


def estimate_memory(model, method=None, setup: StepSetup | None = None) -> Breakdown:
    """Predicted memory (bytes) of one training step.

    ``model``: a ``GPTConfig``, a size name or a raw parameter count; ``method``: a PEFT config
    (read by ``method_config``), a ``MethodConfig`` or None (full fine-tuning); ``setup``: how the
    step runs (``StepSetup()``: batch 1, full context, float32, AdamW).
    """
    m, t = method_config(method), setup or StepSetup()
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
        s = as_config(model)
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
        T = s.block_size if t.seq_len is None else t.seq_len
        if not isinstance(T, int) or T < 1:
            raise ValueError(f"seq_len must be an integer >= 1, got {T!r}")
        acts = sum(activation_bytes(
            t.batch_size, T, s.n_layer, s.n_embd, s.n_head, s.d_ff, s.vocab_size, ab, lora_dropout=m.lora_dropout,
            save_frozen_linear_inputs=t.save_frozen_linear_inputs, resid_pdrop=t.resid_pdrop,
            embd_pdrop=t.embd_pdrop, ledger_view=t.ledger_view, gradient_checkpointing=t.gradient_checkpointing,
            logits_16bit=ab == 2 and wb == 4,  # amp.autocast: the LM head writes 16-bit logits, the loss keeps them
            **model_of.activations(s, m)).values())
    return Breakdown(w_tr, w_fr, sum(trainable) * gb, o, acts, q_c, sum(k for _, k, _, _ in tensors),
                           sum(trainable), t.optimizer.startswith("paged_"), known)
