"""GPT-2 in one file: config, model, Hugging Face checkpoints.

The architecture of GPT-2 (Radford et al. 2019, section 2.3): GPT's decoder-only
transformer (Radford et al. 2018) with LayerNorm moved to the input of each sub-block
("pre-LN"), a final LayerNorm ``ln_f``, learned positions, GELU (tanh form), a head tied
to the token embedding, and residual projections initialised with std 0.02 / sqrt(2 L).
One block, with the names of the GPT-2 checkpoint (methods.md section 0.1)::

    a = ln_1(x);  q, k, v = split(attn.c_attn(a))     # (B, T, C) -> 3 x (B, T, C)
    x = x + attn.c_proj(softmax(q k^T / sqrt(D) + causal mask) v)
    x = x + mlp.c_proj(gelu(mlp.c_fc(ln_2(x))))       # C -> 4C -> C

Parameter names are GPT-2's exactly (``transformer.h.0.attn.c_attn.weight`` ...), so
peft ``target_modules`` and adapter keys match Hugging Face's. ``Linear.weight`` is
``(out, in)``; the checkpoint's Conv1D layout ``(in, out)`` is transposed at load/save.

The forward reads as nanoGPT's (embeddings -> blocks -> ln_f -> lm_head); the extension
points PEFT methods and decoding need are named steps of it, kept in ``minipeft.forward_call``,
so methods never patch it: ``inputs_embeds_prefix`` (prompt tuning), ``prefix_key_values``
(prefix tuning), ``past_key_values`` (the ``KVCache`` of ``minipeft.kv_cache``),
``output_hidden_states`` (side tuning). LoRA, adapters and (IA)^3 swap a submodule
(``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``) with ``set_submodule``.
``generate`` runs the one decoding loop of ``minipeft.decoding``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np

from . import decoding
from . import functional as F
from .checkpointing import checkpoint
from .atomic import atomic_directory, recover
from .backend import to_numpy, xp_of
from .capture import capturing  # recorded into a CUDA graph: the caller checks the ids
from .engine import Tensor, is_grad_enabled
from .forward_call import ForwardCall
from .kv_cache import KVCache
from .integrity import DamagedFileError, json_digest, load_tensors, read_json, save_tensors
from .nn import Dropout, Embedding, LayerNorm, Linear, Module, ModuleList, Parameter

from .sizes import BYTE_VOCAB_SIZE, GPT2_VOCAB_SIZE, SHAPES, shape_of  # the one table of sizes

_DTYPES = ("float32", "float64", "float16")


@dataclass
class GPTConfig:
    """Shape of a GPT-2-style model. Defaults are the tiny CPU model (``T0``)."""

    vocab_size: int = BYTE_VOCAB_SIZE  # minipeft's byte tokenizer; GPT-2 uses 50257
    block_size: int = 128  # longest sequence = number of learned positions (HF n_positions)
    n_layer: int = 2  # transformer blocks
    n_head: int = 2  # attention heads; n_embd must be a multiple of it
    n_embd: int = 64  # model width C
    n_inner: int | None = None  # MLP width; None means 4 * n_embd, as GPT-2
    dropout: float = 0.0  # on the embeddings and after each c_proj (GPT-2 used 0.1); none in attention
    layer_norm_epsilon: float = 1e-5  # GPT-2's LayerNorm epsilon
    bias: bool = True  # biases in the Linear layers (GPT-2 has them; LayerNorms always do)
    tie_word_embeddings: bool = True  # lm_head shares transformer.wte's weight, as GPT-2
    dtype: str = "float32"  # parameter dtype: float32, float64 (gradient checks) or float16

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"pick n_head among {[h for h in range(1, self.n_embd + 1) if self.n_embd % h == 0][:12]}"
            )
        if self.n_inner is not None and (not isinstance(self.n_inner, (int, np.integer))
                                         or isinstance(self.n_inner, bool) or self.n_inner <= 0):
            raise ValueError(f"GPTConfig.n_inner must be None (4 * n_embd) or a positive integer, got {self.n_inner!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if not (self.layer_norm_epsilon > 0 and math.isfinite(self.layer_norm_epsilon)):
            raise ValueError(f"GPTConfig.layer_norm_epsilon must be a finite number > 0 (GPT-2: 1e-5), "
                             f"got {self.layer_norm_epsilon}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"GPTConfig.dtype must be one of {_DTYPES}, got {self.dtype!r}")

    @property
    def d_ff(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """Build from a dict; unknown keys are an error (a typo must not pass silently)."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown GPTConfig keys {unknown}; known keys are {known}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        """A named shape (``'T1'``, ``'gpt2'``) or base size (``'small'``) of ``minipeft.sizes``, with overrides."""
        return cls.from_dict({**shape_of(name), **overrides})


# Shapes by name: a view of minipeft.sizes.SHAPES (kept for ``from minipeft.gpt import CONFIGS``).
CONFIGS: dict[str, dict] = SHAPES


@dataclass
class GPTOutput:
    logits: Tensor  # (B, P + T, V): P prompt-embedding positions, then the T tokens; 16-bit under a 16-bit autocast
    loss: Tensor | None = None  # mean cross-entropy over the T token positions (scalar)
    hidden_states: list | None = None  # L + 1 Tensors (B, P + T, C), Hugging Face's convention
    past_key_values: KVCache | None = None  # with use_cache: per layer (k, v) (B, H, S, D) and the mask (B, S)


# ------------------------------------------------------------------------- modules


def _block_hidden(block, key_mask):
    """A block as a function of Tensors (x, k, v) -> x, for ``checkpoint`` (keys/values dropped)."""
    def run(x, k, v):
        return block(x, None if k is None else (k, v), key_mask)[0]
    return run


def _param(rng, shape, std: float, dtype: str) -> Parameter:
    """N(0, std^2) drawn in float64 then cast (so float32 and float64 models agree); zeros without rng."""
    return Parameter(np.zeros(shape, dtype) if rng is None else (rng.standard_normal(shape) * std).astype(dtype))


def _linear(n_in: int, n_out: int, bias: bool, std: float, rng, dtype: str) -> Linear:
    """An ``nn.Linear`` with GPT-2's init: weight (out, in) ~ N(0, std^2), bias 0."""
    lin = Linear(1, 1, bias=bias, rng=0)  # a cheap shell: its PyTorch-style init is replaced below
    lin.in_features, lin.out_features = n_in, n_out
    lin.weight = _param(rng, (n_out, n_in), std, dtype)
    lin.bias = Parameter(np.zeros(n_out, dtype)) if bias else None
    return lin


def _embedding(n: int, dim: int, std: float, rng, dtype: str) -> Embedding:
    emb = Embedding(1, 1, rng=0)  # a cheap shell, as above
    emb.num_embeddings, emb.embedding_dim = n, dim
    emb.weight = _param(rng, (n, dim), std, dtype)
    return emb


class CausalSelfAttention(Module):
    def __init__(self, cfg: GPTConfig, rng) -> None:
        super().__init__()
        proj_std = 0.02 / math.sqrt(2 * cfg.n_layer)  # GPT-2's scaled residual init
        self.c_attn = _linear(cfg.n_embd, 3 * cfg.n_embd, cfg.bias, 0.02, rng, cfg.dtype)
        self.c_proj = _linear(cfg.n_embd, cfg.n_embd, cfg.bias, proj_std, rng, cfg.dtype)
        self.resid_dropout = Dropout(cfg.dropout)
        self.n_head = cfg.n_head

    def forward(self, x, front=None, key_mask=None):
        """Causal self-attention of x (B, T, C); ``front``: keys/values (B, H, S, D) in front of x's own.

        Returns the output (B, T, C) and the keys and values (B, H, S + T, D) it attended to.
        """
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        qkv = self.c_attn(x)  # (B, T, 3C)
        q, k, v = (t.reshape(B, T, H, D).transpose(0, 2, 1, 3) for t in F.split(qkv, C, axis=-1))  # (B, H, T, D)
        if front is not None:  # prefix tuning's keys/values and the cache of earlier positions
            k = F.concatenate([F.cast(front[0], k.dtype), k], axis=2)  # (B, H, S + T, D)
            v = F.concatenate([F.cast(front[1], v.dtype), v], axis=2)
        y = F.scaled_dot_product_attention(q, k, v, causal=True, key_mask=key_mask)  # (B, H, T, D)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(Module):
    def __init__(self, cfg: GPTConfig, rng) -> None:
        super().__init__()
        proj_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        self.c_fc = _linear(cfg.n_embd, cfg.d_ff, cfg.bias, 0.02, rng, cfg.dtype)
        self.c_proj = _linear(cfg.d_ff, cfg.n_embd, cfg.bias, proj_std, rng, cfg.dtype)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x):
        h = F.gelu(self.c_fc(x))  # (B, T, 4C)
        return self.dropout(self.c_proj(h))  # (B, T, C)


def reads_16bit(module) -> bool:
    """True for a module that reads its input in 16 bits under autocast and does nothing else with it: a
    plain ``nn.Linear`` (its GEMM operand), or a layer that says so itself (``reads_16bit_input()``: a
    LoRA layer whose fused op takes the input). Other PEFT layers, which also add, scale or drop the
    input in float32, are not."""
    if type(module) is Linear:
        return True
    ask = getattr(module, "reads_16bit_input", None)
    return bool(ask()) if callable(ask) else False


def _norm(ln, x, reader):
    """``ln(x)``; under a 16-bit autocast written in 16 bits when ``ln`` is the plain LayerNorm and its one
    reader, ``reader``, reads 16 bits anyway (:func:`reads_16bit`, :mod:`minipeft.amp_layernorm`). ``reader`` None:
    someone else reads the output too (a hidden state kept, a wrapped sub-layer): float32, as always."""
    if reader is not None and type(ln) is LayerNorm and reads_16bit(reader):
        return ln(x, output_16bit=True)
    return ln(x)


class Block(Module):
    def __init__(self, cfg: GPTConfig, rng) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, dtype=cfg.dtype)
        self.attn = CausalSelfAttention(cfg, rng)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, dtype=cfg.dtype)
        self.mlp = MLP(cfg, rng)

    def forward(self, x, front=None, key_mask=None):
        """x (B, T, C) -> (B, T, C), and the keys/values of its attention (see ``CausalSelfAttention``)."""
        attn_in = _norm(self.ln_1, x, self.attn.c_attn if type(self.attn) is CausalSelfAttention else None)
        a, kv = self.attn(attn_in, front, key_mask)
        x = x + a  # (B, T, C)
        x = x + self.mlp(_norm(self.ln_2, x, self.mlp.c_fc if type(self.mlp) is MLP else None))
        return x, kv


class Transformer(Module):
    """``transformer.*`` of the checkpoint: wte, wpe, h.{i}, ln_f."""

    def __init__(self, cfg: GPTConfig, rng) -> None:
        super().__init__()
        self.wte = _embedding(cfg.vocab_size, cfg.n_embd, 0.02, rng, cfg.dtype)
        self.wpe = _embedding(cfg.block_size, cfg.n_embd, 0.02, rng, cfg.dtype)  # HF: 0.02 as well
        self.drop = Dropout(cfg.dropout)
        self.h = ModuleList(Block(cfg, rng) for _ in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, dtype=cfg.dtype)


class GPT(Module):
    """GPT-2 language model. ``GPT(config, seed=0)`` draws GPT-2's initialisation."""

    def __init__(self, config: GPTConfig | None = None, seed=0, init_weights: bool = True) -> None:
        super().__init__()
        cfg = config if config is not None else GPTConfig()
        if isinstance(cfg, dict):
            cfg = GPTConfig.from_dict(cfg)
        if not isinstance(cfg, GPTConfig):
            raise TypeError(f"GPT needs a GPTConfig (or a dict of its fields), got {type(cfg).__name__}")
        self.config = cfg
        rng = (seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)) if init_weights else None
        self.transformer = Transformer(cfg, rng)
        if cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg.n_embd, cfg.vocab_size, False, 0.0, None, cfg.dtype)
            self.lm_head.weight = self.transformer.wte.weight  # the same Parameter: tied
        else:
            self.lm_head = _linear(cfg.n_embd, cfg.vocab_size, False, 0.02, rng, cfg.dtype)
        # under a 16-bit autocast the logits are written in 16 bits, as torch.autocast's: the loss, their
        # one reader, widens them itself (minipeft.kernels.amp_cross_entropy), and they are the step's
        # largest activation (B T V: 823 MB at 8 x 512 tokens of GPT-2 in float32)
        self.lm_head.output_16bit = True

    # ---------------------------------------------------------------- gradient checkpointing
    is_gradient_checkpointing = False  # transformers' name; set by the two methods below

    def gradient_checkpointing_enable(self) -> None:
        """Keep only each block's input in training; recompute the block in backward
        (Chen et al. 2016; ``minipeft.checkpointing``). Same gradients, fewer saved bytes."""
        self.is_gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.is_gradient_checkpointing = False

    def num_parameters(self, trainable_only: bool = False, non_embedding: bool = False) -> int:
        """Parameter count; ``non_embedding`` leaves out wte, wpe and lm_head (Kaplan et al.'s N)."""
        skip = {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"} if non_embedding else set()
        return sum(p.size for n, p in self.named_parameters()
                   if n not in skip and (p.requires_grad or not trainable_only))

    # ---------------------------------------------------------------- forward
    def forward(self, idx, targets=None, **extensions) -> GPTOutput:
        """Logits for token ids ``idx`` (B, T); the loss when ``targets`` (B, T) are given.

        ``targets`` are already shifted (nanoGPT's convention: ``targets[:, t]`` is the token
        after ``idx[:, t]``); ``ignore_index`` entries count for nothing. ``extensions`` are
        the named extension points of ``minipeft.forward_call`` (prompt and prefix tuning,
        the key/value cache, padding, positions, hidden states, loss options); each step
        below that uses one says so.
        """
        idx = self._check_idx(idx)  # (B, T)
        call = ForwardCall(self.config, idx, **extensions)  # checked against the model and the batch
        x = self.transformer.wte(idx)  # (B, T, C) token embeddings
        x = call.prepend_prompt(x)  # (B, P' + T, C): prompt tuning's rows first
        x = self.transformer.drop(x + self.transformer.wpe(call.positions))  # + learned positions
        recompute = self.is_gradient_checkpointing and self.training and is_grad_enabled()
        if recompute and extensions.get("use_cache"):
            raise ValueError("use_cache=True with gradient checkpointing in training: checkpointed blocks keep "
                             "no keys/values; pass use_cache=False, or call model.eval() to decode")
        for i, block in enumerate(self.transformer.h):
            call.keep_hidden(x)  # side tuning reads every block's input
            if recompute:  # keep only x; the block runs again in backward (minipeft.checkpointing)
                front = call.front_kv(i) or (None, None)  # (k, v) Tensors (B, H, P + S, D), or none
                x = checkpoint(_block_hidden(block, call.key_mask), x, *front, params=block.parameters())
                continue
            x, kv = block(x, call.front_kv(i), call.key_mask)  # prefix and cached keys/values in front
            call.keep_kv(kv)  # the cache for the next call
        x = _norm(self.transformer.ln_f, x, self.lm_head if call.hidden_states is None else None)  # (B, P' + T, C)
        call.keep_hidden(x)
        logits = self.lm_head(x)  # (B, P' + T, V): float16/bfloat16 under a 16-bit autocast
        return GPTOutput(logits, call.loss(logits, targets), call.hidden_states, call.new_cache())

    def _check_idx(self, idx, xp=None):
        xp = xp or xp_of(self.transformer.wte.weight.data)
        idx = xp.asarray(idx.data if isinstance(idx, Tensor) else idx)
        if idx.ndim != 2 or idx.dtype.kind not in "iu":
            raise ValueError(f"idx must be integer token ids of shape (B, T), got a {idx.dtype} array of "
                             f"shape {idx.shape} (one sequence: pass idx[None])")
        if idx.size and capturing() is None and (int(idx.min()) < 0 or int(idx.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}) (vocab_size), got ids in "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        return idx

    # ---------------------------------------------------------------- generate
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 greedy: bool = False, seed=None, eos_token_id: int | None = None, attention_mask=None,
                 prefix_key_values=None, inputs_embeds_prefix=None, use_cache: bool = True, top_p: float | None = None):
        """Continue ``idx`` (B, T) by ``max_new_tokens`` tokens; returns (B, T + n) ids.

        Greedy (argmax), or sampling at ``temperature`` from the ``top_k`` most likely
        tokens (then the nucleus of ``top_p``) with ``seed`` (int or numpy Generator). A
        row that emitted ``eos_token_id`` keeps emitting it; generation stops when every row has. ``attention_mask`` (B, T)
        marks left padding (positions then count only kept tokens, as HF's generate).
        The key/value cache is used until the sequence fills ``block_size``; after that
        each step reruns the last window that fits (nanoGPT's crop). The loop is
        ``minipeft.decoding``'s, shared with beam search, the server and side tuning.
        On a GPU, greedy decoding of up to 8 rows runs several times faster with the
        whole step in a CUDA graph: ``minipeft.decoding.generate_graph(model, idx, n)``.
        """
        extra = {k: v for k, v in (("prefix_key_values", prefix_key_values),
                                   ("inputs_embeds_prefix", inputs_embeds_prefix)) if v is not None}
        return decoding.generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k, greedy=greedy,
                                 seed=seed, eos_token_id=eos_token_id, attention_mask=attention_mask,
                                 use_cache=use_cache, extra=extra, top_p=top_p)

    # ---------------------------------------------------------------- Hugging Face files
    @classmethod
    def from_hf(cls, path, dtype: str = "float32", dropout: float | None = None) -> "GPT":
        """Load a Hugging Face GPT-2 directory (``config.json`` + ``model.safetensors``).

        Keys may carry the ``transformer.`` prefix or not; Conv1D weights (in, out) are
        transposed to (out, in); the ``attn.bias`` causal buffers are skipped; a stored
        ``lm_head.weight`` must equal ``wte`` when the embeddings are tied. ``dropout``
        defaults to the checkpoint's ``resid_pdrop``. The model is returned in eval mode,
        as ``from_pretrained`` does (call ``.train()`` before fine-tuning).
        """
        path = os.fspath(path)
        recover(path)  # a save killed between its two renames left the previous version aside
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"{cfg_file} not found: from_hf needs a Hugging Face GPT-2 directory "
                                    f"(config.json + model.safetensors)")
        hf = read_json(cfg_file, _hf_remedy(path))
        if hf.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"{cfg_file}: model_type is {hf.get('model_type')!r}, only 'gpt2' is supported")
        for key, want in (("activation_function", "gelu_new"), ("scale_attn_weights", True),
                          ("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False)):
            if hf.get(key, want) != want:
                raise ValueError(f"{cfg_file}: {key}={hf[key]!r} is not GPT-2's ({want!r}); "
                                 f"minipeft's GPT cannot run it")
        try:
            config = GPTConfig(
                vocab_size=hf.get("vocab_size", GPT2_VOCAB_SIZE),
                block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
                n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=hf.get("n_embd", 768),
                n_inner=hf.get("n_inner"), layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
                dropout=hf.get("resid_pdrop", 0.1) if dropout is None else dropout,
                tie_word_embeddings=hf.get("tie_word_embeddings", True), dtype=dtype)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{cfg_file}: {e}") from e
        raw, meta = _read_safetensors(path)
        saved = meta.get(_CONFIG_DIGEST_KEY)
        if saved is not None and saved != json_digest(hf):
            warnings.warn(f"{cfg_file} is not the config saved with its model.safetensors (changed after "
                          f"save_hf wrote them: edited by hand, or damaged); loading it as it is now", stacklevel=2)
        _check_size(raw, config, cfg_file)
        model = cls(config, init_weights=False)
        try:
            model.load_state_dict(_from_hf_state(raw, config))
        except ValueError as e:
            raise ValueError(f"{path}: config.json and model.safetensors do not belong together: {e}") from e
        return model.eval()

    def save_hf(self, path) -> None:
        """Write a directory ``transformers.GPT2LMHeadModel.from_pretrained`` can load.

        The directory is written whole beside ``path`` and swapped in (``minipeft.atomic``), so
        a kill leaves the previous model or the new one; other files in it are kept.
        ``model.safetensors`` carries digests of its tensors and of ``config.json``.
        """
        cfg = self.config
        if not cfg.bias:
            raise ValueError("save_hf: Hugging Face GPT-2 always has biases; this model has bias=False")
        eos = GPT2_VOCAB_SIZE - 1 if cfg.vocab_size == GPT2_VOCAB_SIZE else None  # GPT-2's <|endoftext|>
        hf = {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_inner": cfg.n_inner, "layer_norm_epsilon": cfg.layer_norm_epsilon,
            "activation_function": "gelu_new", "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
            "attn_pdrop": 0.0,  # minipeft has no dropout on attention probabilities
            "initializer_range": 0.02, "tie_word_embeddings": cfg.tie_word_embeddings,
            "bos_token_id": eos, "eos_token_id": eos, "use_cache": True, "dtype": cfg.dtype,
        }
        tensors = {}
        for name, arr in self.state_dict().items():
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            a = to_numpy(arr)
            tensors[name] = np.ascontiguousarray(a.T if _is_conv1d(name) else a)  # Conv1D is (in, out)
        with atomic_directory(path, owned=_HF_FILES) as tmp:
            with open(tmp / "config.json", "w") as f:
                json.dump(hf, f, indent=2, sort_keys=True)
            save_tensors(tensors, tmp / "model.safetensors", {"format": "pt"},
                         **{_CONFIG_DIGEST_KEY: json_digest(hf)})


_HF_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")  # what save_hf replaces
_CONFIG_DIGEST_KEY = "minipeft_config_sha256"  # digest of the config.json saved beside model.safetensors


def _hf_remedy(path) -> str:
    return (f"Save the model again (GPT.save_hf), or delete {os.fspath(path)} and rerun (a cached base model "
            f"is then pretrained again)")


def _check_size(raw: dict, cfg: "GPTConfig", cfg_file: str) -> None:
    """Refuse a config.json that describes a model far larger than the tensors beside it (before allocating it)."""
    C, F_, V = cfg.n_embd, cfg.d_ff, cfg.vocab_size
    want = V * C + cfg.block_size * C + 2 * C + cfg.n_layer * (4 * C + 3 * C * C + 3 * C + C * C + C
                                                               + 2 * C * F_ + F_ + C)
    have = sum(int(np.prod(a.shape)) for a in raw.values())
    if want > 2 * have + 1_000_000:
        raise ValueError(f"{cfg_file} does not describe the tensors beside it: it asks for a model of {want:,} "
                         f"parameters, model.safetensors holds {have:,} numbers. "
                         f"{_hf_remedy(os.path.dirname(cfg_file))}")


_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def _is_conv1d(name: str) -> bool:
    return name.endswith(_CONV1D)


def _read_safetensors(path: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a Hugging Face directory: ``model.safetensors`` or its shards."""
    remedy = _hf_remedy(path)
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_tensors(single, remedy)
    if os.path.isfile(index):  # sharded checkpoint
        weight_map = read_json(index, remedy).get("weight_map")
        if not isinstance(weight_map, dict):
            raise DamagedFileError(index, "no 'weight_map' object", remedy)
        out = {}
        for s in sorted(set(map(str, weight_map.values()))):
            out.update(load_tensors(os.path.join(path, s), remedy)[0])
        return out, {}
    hint = " (found a pickle checkpoint, which minipeft never reads: convert it to safetensors)" if any(
        os.path.isfile(os.path.join(path, n)) for n in ("pytorch_model.bin", "model.bin")) else ""
    raise FileNotFoundError(f"no model.safetensors in {path}{hint}")


def _from_hf_state(raw: dict, cfg: GPTConfig) -> dict:
    """HF GPT-2 tensors -> minipeft state dict names, (out, in) layout, config dtype."""
    state, lm_head = {}, None
    for key, arr in raw.items():
        name = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of older checkpoints, not parameters
        if name == "lm_head.weight":
            lm_head = arr
            continue
        arr = arr.astype(cfg.dtype)
        state[name] = np.ascontiguousarray(arr.T) if _is_conv1d(name) and arr.ndim == 2 else arr
    if lm_head is not None:
        if not cfg.tie_word_embeddings:
            state["lm_head.weight"] = lm_head.astype(cfg.dtype)
        elif "transformer.wte.weight" in state and not np.array_equal(
                lm_head.astype(cfg.dtype), state["transformer.wte.weight"]):
            raise ValueError("checkpoint has tie_word_embeddings=true but lm_head.weight differs from wte.weight; "
                             "set tie_word_embeddings=false in config.json to load an untied head")
    return state
