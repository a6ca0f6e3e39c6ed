"""Side tuning: a small trainable network beside a frozen backbone that never back-propagates into it.

Three methods of one family (methods.md §12), all through ``get_peft_model``:

* **Side-Tuning** (Zhang et al., arXiv 1912.13503, §3): ``R(x) = α·B(x) + (1 − α)·S(x)``.
  B is the frozen base's last hidden state, S a small side network: here a GPT-2 stack of
  width d/r reading the backbone's embedding output through one downsample, then
  upsampled to d. α is learned (``alpha_trainable``), or fixed; anneal it by hand with
  ``set_alpha(model, value)`` for the paper's curriculum from 1 toward 0.
* **LST**, Ladder Side-Tuning (Sung et al., arXiv 2206.06522, §3; ``ylsung/Ladder-Side-Tuning``):
  the backbone's architecture with every width divided by r (= 8), fed from **every**
  backbone layer through downsamples and gated ladder connections::

      s = down_0(h_0)                                  # h_0: embedding output, (B, T, d) -> (B, T, d/r)
      for i in 1..L:
          mu = sigmoid(alpha_i / T)                    # T = 0.1, alpha_i = 0 -> mu = 0.5
          s  = mu * s + (1 - mu) * down_i(h_i)         # ladder from backbone layer i
          s  = SideBlock_i(s)                          # a GPT-2 block of width d/r
      logits = lm_head(ln_f(up(s)))                    # up: d/r -> d; ln_f, lm_head frozen

  h_1..h_{L-1} are block outputs and h_L is ``ln_f`` of block L's output (Hugging Face's
  ``hidden_states``, ``GPT.forward(output_hidden_states=True)``). The head reads the side
  network only, so LST is *not* the base model at step 0. The paper initialises the side
  network by pruning the backbone; minipeft draws GPT-2's init (pruning is not done).
* **QST**, Quantized Side Tuning (Zhang et al., arXiv 2401.07159, §3): the backbone in NF4
  with double quantization (``quantize_model``, done by ``get_peft_model`` unless the base
  is quantized already: the base model is changed **in place**, as ``load_in_4bit``), the
  same ladder at r = 16 with gates β_i = sigmoid(γ_i), γ_i = 0 (T = 1), downsamples that
  are adapters (``Linear(d, 16) -> GELU -> Linear(16, d/r) -> LayerNorm``, the paper's best
  choice) and a learned output mix initialised to **α = 1**::

      h_N = α · h_L + (1 − α) · ln_f(up(s));   logits = lm_head(h_N)

  so step 0 returns the (quantized) base model's logits exactly (1·x + 0·u = x). The
  public code mixes differently and does not start at the base (methods.md §12.3);
  minipeft follows the paper.

Why it saves memory: the backbone runs under ``no_grad`` and records no graph, so it
saves nothing for backward and gets no gradient. What the side network's graph keeps
is its own (narrow) activations plus the backbone hidden states that trainable
downsamples need for their weight gradient (one (B, T, d) per ladder rung). Those are
arrays made outside the graph: the engine's ledger counts them as inputs, not as saved
activations; ``held_leaf_bytes(loss, model)`` measures them from the graph. The
parameter-free ``downsample="avgpool"`` (QST's gradient-free option) keeps only the pooled
(B, T, d/r) states, r times less.

In memory the side network of adapter ``a`` is ``side_network.<a>.*`` on the PeftModel
(``downsample.{i}``, ``gates``, ``h.{i}.attn.c_attn.weight`` ..., ``upsample``, ``alpha``);
on disk, ``side_network.*`` (the adapter name removed). peft has none of these methods:
``peft_type`` "SIDE_TUNING", "LST" and "QST" and every config field below are minipeft's own.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import decoding
from .. import functional as F
from ..backend import xp_of
from ..engine import Tensor, _buffer_key, _Node, no_grad
from ..forward_call import key_mask_of
from ..gpt import GPT, Block, GPTConfig, GPTOutput
from ..nn import LayerNorm, Linear, Module, ModuleDict, ModuleList, Parameter
from .config import PeftConfig
from .layer import derive_rng
from .method import PeftMethod, register

DOWNSAMPLES = ("linear", "adapter", "avgpool")


# ------------------------------------------------------------------------- configs


@dataclass
class SideConfig(PeftConfig):
    """Fields the side-tuning methods share (all minipeft's own: peft has no side tuning)."""

    json_omit = ("target_modules", "exclude_modules", "modules_to_save")  # side tuning wraps no module
    ladder = True  # class attribute: LST/QST read every layer; Side-Tuning only the embeddings
    mix = False  # class attribute: the output is alpha * base + (1 - alpha) * side

    reduction_factor: int = 8  # side width d / r (LST: 8)
    side_num_heads: int | None = None  # heads of the side blocks; None: the backbone's if they divide d/r, else 1
    downsample: str = "linear"  # "linear" (d -> d/r), "adapter" (d -> rank -> d/r, LayerNorm) or "avgpool"
    downsample_rank: int = 16  # bottleneck of the adapter downsample (QST: 16)
    gate_temperature: float = 0.1  # T in mu = sigmoid(gate / T) (LST: 0.1; QST: 1)
    gate_init: float = 0.0  # initial gate logit (0: mu = 0.5, as both papers)
    alpha: float = 1.0  # initial output mix (weight of the base's hidden state), for methods with a mix
    alpha_trainable: bool = True  # learn alpha (False: keep it fixed)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            if getattr(self, name) is not None:
                raise ValueError(f"{type(self).__name__} wraps no module, so {name} must be None "
                                 f"(the side network reads every layer's hidden state)")
        for name in ("reduction_factor", "downsample_rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        h = self.side_num_heads
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h < 1):
            raise ValueError(f"side_num_heads must be a positive integer or None, got {h!r}")
        if self.downsample not in DOWNSAMPLES:
            raise ValueError(f"downsample must be one of {DOWNSAMPLES}, got {self.downsample!r}")
        if not self.gate_temperature > 0:
            raise ValueError(f"gate_temperature must be > 0, got {self.gate_temperature!r}")
        if not isinstance(self.alpha_trainable, bool):
            raise TypeError(f"alpha_trainable must be True or False, got {self.alpha_trainable!r}")


@dataclass
class SideTuningConfig(SideConfig):
    """Side-Tuning: a side stack reading the embeddings, blended with the base as alpha*B + (1-alpha)*S."""

    peft_type = "SIDE_TUNING"
    json_omit = SideConfig.json_omit + ("gate_temperature", "gate_init")  # no ladder, no gates
    ladder = False
    mix = True

    num_side_layers: int | None = None  # blocks of the side network; None: as many as the backbone
    alpha: float = 0.5  # initial blend weight of the base (the paper learns or anneals it)

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.num_side_layers
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"num_side_layers must be a positive integer or None, got {n!r}")


@dataclass
class LSTConfig(SideConfig):
    """Ladder Side-Tuning: r = 8, linear downsamples from every layer, gates sigmoid(alpha / 0.1)."""

    peft_type = "LST"
    json_omit = SideConfig.json_omit + ("alpha", "alpha_trainable")  # the head reads the side network only


@dataclass
class QSTConfig(SideConfig):
    """Quantized Side Tuning: NF4 backbone, r = 16, adapter downsamples (rank 16), output mix alpha = 1."""

    peft_type = "QST"
    mix = True

    reduction_factor: int = 16  # the paper's best r
    downsample: str = "adapter"  # the paper's best downsample
    gate_temperature: float = 1.0  # beta_i = sigmoid(gamma_i)
    alpha: float = 1.0  # output mix; 1 makes step 0 the base model
    quantize_backbone: bool = True  # quantize a float backbone in place at get_peft_model
    quant_type: str = "nf4"  # 4-bit data type of the backbone (NF4 as the paper; fp4 also works)
    blocksize: int = 64  # quantization block size
    compress_statistics: bool = True  # double quantization of the block constants
    compute_dtype: str = "float32"  # backbone matmul dtype (the paper: bfloat16; float32 on the CPU)

    def __post_init__(self) -> None:
        super().__post_init__()
        from ..quant.blockwise import QUANT_TYPES_4BIT
        from ..quant.modules import COMPUTE_DTYPES

        if self.quant_type not in QUANT_TYPES_4BIT:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES_4BIT} (4-bit backbone), got {self.quant_type!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        b = self.blocksize
        if isinstance(b, bool) or not isinstance(b, int) or b < 2 or b & (b - 1):
            raise ValueError(f"blocksize must be a power of two >= 2 (bitsandbytes uses 64), got {b!r}")
        for name in ("quantize_backbone", "compress_statistics"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")


# -------------------------------------------------------------------- side network


class AdapterDownsample(Module):
    """QST's adapter downsample: ``LayerNorm(up(gelu(down(h))))``, d -> rank -> d/r."""

    def __init__(self, d: int, rank: int, width: int, rng, dtype) -> None:
        super().__init__()
        self.down = Linear(d, rank, bias=False, rng=rng, dtype=dtype)  # torch's init, U(+-1/sqrt(d))
        self.up = Linear(rank, width, bias=False, rng=rng, dtype=dtype)
        self.ln = LayerNorm(width, dtype=dtype)

    def forward(self, h: Tensor) -> Tensor:
        return self.ln(self.up(F.gelu(self.down(h))))  # (B, T, d) -> (B, T, rank) -> (B, T, d/r)


class AvgPoolDownsample(Module):
    """Mean of each group of r consecutive channels: no parameters, so it holds nothing for backward."""

    def __init__(self, r: int) -> None:
        super().__init__()
        self.r = r

    def forward(self, h: Tensor) -> Tensor:
        B, T, C = h.shape
        return h.reshape(B, T, C // self.r, self.r).mean(axis=-1)  # (B, T, d/r)


class SideNetwork(Module):
    """Downsamples, ladder gates, side blocks of width d/r and the upsample back to d."""

    def __init__(self, cfg: GPTConfig, config: SideConfig, rng: np.random.Generator, device: str) -> None:
        super().__init__()
        d, r = cfg.n_embd, config.reduction_factor
        width, inner = d // r, cfg.d_ff // r
        dtype = np.float64 if cfg.dtype == "float64" else np.float32
        heads = config.side_num_heads or (cfg.n_head if width % cfg.n_head == 0 else 1)
        n_side = getattr(config, "num_side_layers", None) or cfg.n_layer
        n_down = cfg.n_layer + 1 if config.ladder else 1
        self.ladder, self.temperature = config.ladder, float(config.gate_temperature)
        self.alpha_trainable = config.alpha_trainable
        if config.downsample == "linear":
            downs = [Linear(d, width, rng=rng, dtype=dtype) for _ in range(n_down)]
        elif config.downsample == "adapter":
            downs = [AdapterDownsample(d, config.downsample_rank, width, rng, dtype) for _ in range(n_down)]
        else:
            downs = [AvgPoolDownsample(r) for _ in range(n_down)]
        self.downsample = ModuleList(downs)
        side_cfg = GPTConfig(vocab_size=1, block_size=cfg.block_size, n_layer=n_side, n_head=heads, n_embd=width,
                             n_inner=inner, dropout=cfg.dropout, layer_norm_epsilon=cfg.layer_norm_epsilon,
                             bias=cfg.bias, dtype=str(np.dtype(dtype)))
        self.h = ModuleList(Block(side_cfg, rng) for _ in range(n_side))  # GPT-2 init, width d/r
        self.upsample = Linear(width, d, rng=rng, dtype=dtype)
        if config.ladder:
            self.gates = Parameter(np.full(cfg.n_layer, config.gate_init, dtype))
        if config.mix:
            self.alpha = Parameter(np.full(1, config.alpha, dtype))
        if device != "cpu":
            self.to(device)  # built on the host, moved next to the backbone

    def forward(self, hidden_states: list, key_mask=None) -> Tensor:
        """hidden_states: the backbone's L + 1 states (B, T, d), no grad; returns up(s) (B, T, d)."""
        s = self.downsample[0](hidden_states[0])  # (B, T, d/r)
        for i, block in enumerate(self.h):
            if self.ladder:
                mu = F.sigmoid(self.gates[i] / self.temperature)  # scalar in (0, 1)
                s = mu * s + (1 - mu) * self.downsample[i + 1](hidden_states[i + 1])  # (B, T, d/r)
            s, _ = block(s, key_mask=key_mask)
        return self.upsample(s)  # (B, T, d)

    def set_trainable(self, flag: bool) -> None:
        self.requires_grad_(flag)
        if "alpha" in self._parameters:
            self.alpha.requires_grad = flag and self.alpha_trainable


def _width_check(cfg: GPTConfig, config: SideConfig) -> None:
    d, r = cfg.n_embd, config.reduction_factor
    if d // r < 1 or cfg.d_ff // r < 1:
        raise ValueError(f"reduction_factor {r} leaves no side width for d_model {d}; pick r <= {d}")
    if config.downsample == "avgpool" and d % r:
        raise ValueError(f"downsample='avgpool' averages groups of r channels: d_model {d} must be divisible by "
                         f"reduction_factor {r}")
    h = config.side_num_heads
    if h is not None and (d // r) % h:
        raise ValueError(f"side_num_heads {h} does not divide the side width {d // r} (= {d} // {r})")


# ------------------------------------------------------------------------- method


class SideTuningMethod(PeftMethod):
    """Hooks shared by Side-Tuning, LST and QST: the network lives at ``peft_model.side_network``."""

    mergeable = False

    @classmethod
    def find_targets(cls, model, config):
        if not isinstance(model, GPT):
            raise TypeError(f"{cls.peft_type} needs a minipeft GPT (it reads GPT.forward's hidden states), "
                            f"got {type(model).__name__}")
        return []  # wraps nothing

    @classmethod
    def prepare(cls, peft_model, config, adapter_name, targets) -> None:
        base = peft_model.get_base_model()
        _width_check(base.config, config)
        cls.prepare_backbone(base, config)
        net = SideNetwork(base.config, config, derive_rng(config.seed, "side_network"), base.device)
        if "side_network" not in peft_model._modules:
            peft_model.side_network = ModuleDict()
        peft_model.side_network[adapter_name] = net.train(base.training)

    @classmethod
    def generate(cls, peft_model, *args, **kwargs):
        """No key/value cache runs through the side network: rerun the window each step."""
        return _generate(peft_model, *args, **kwargs)

    @classmethod
    def prepare_backbone(cls, base, config) -> None:
        """Hook: QST quantizes the backbone here."""

    @classmethod
    def mark_trainable(cls, peft_model, config, adapter_name) -> None:
        pass  # nothing of the backbone trains

    @classmethod
    def set_adapter(cls, peft_model, adapter_name, inference_mode) -> None:
        for name, net in peft_model.side_network.items():
            net.set_trainable(name == adapter_name and not inference_mode)

    @classmethod
    def delete_adapter(cls, peft_model, adapter_name) -> None:
        if "side_network" in peft_model._modules and adapter_name in peft_model.side_network:
            del peft_model.side_network[adapter_name]

    @classmethod
    def extra_adapter_state(cls, peft_model, adapter_name):
        if "side_network" not in peft_model._modules or adapter_name not in peft_model.side_network:
            return []
        return [(f"side_network.{adapter_name}.{n}", f"side_network.{n}", p)
                for n, p in peft_model.side_network[adapter_name].named_parameters()]

    @classmethod
    def forward(cls, peft_model, idx, targets=None, *, attention_mask=None, position_ids=None,
                output_hidden_states=False, ignore_index=-100, label_smoothing=0.0, **unsupported):
        bad = sorted(k for k, v in unsupported.items() if v not in (None, False))
        if bad:
            raise ValueError(f"{cls.peft_type} does not take {bad}: the side network has no key/value cache or "
                             "prompt (generate() reruns the window); call the model with idx, targets, "
                             "attention_mask, position_ids")
        base = peft_model.get_base_model()
        with no_grad():  # the backbone records no graph: no saved activations, no gradient
            out = base(idx, attention_mask=attention_mask, position_ids=position_ids, output_hidden_states=True)
        hidden = out.hidden_states  # L + 1 leaf Tensors (B, T, d)
        xp = xp_of(hidden[0].data)
        B, T = hidden[0].shape[:2]
        key_mask = key_mask_of(attention_mask, B, T, xp)  # (B, T) or None
        logits = cls.side_logits(peft_model, hidden, key_mask)  # (B, T, V)
        loss = None
        if targets is not None:
            t = xp.asarray(targets.data if isinstance(targets, Tensor) else targets)
            if t.shape != (B, T):
                raise ValueError(f"targets must have the shape of idx {(B, T)}, got {t.shape}")
            loss = F.cross_entropy(logits, t, ignore_index=ignore_index, label_smoothing=label_smoothing)
        return GPTOutput(logits, loss, hidden if output_hidden_states else None, None)

    @classmethod
    def side_logits(cls, peft_model, hidden: list, key_mask=None) -> Tensor:
        """Logits from the backbone's hidden states through the active side network (the only graph)."""
        base = peft_model.get_base_model()
        net = peft_model.side_network[peft_model.active_adapter]
        u = base.transformer.ln_f(net(hidden, key_mask))  # (B, T, d), frozen ln_f
        if "alpha" in net._parameters:
            u = net.alpha * hidden[-1] + (1 - net.alpha) * u  # alpha * h_L + (1 - alpha) * side
        return base.lm_head(u)  # (B, T, V)


@register
class SideTuning(SideTuningMethod):
    config_class = SideTuningConfig


@register
class LadderSideTuning(SideTuningMethod):
    config_class = LSTConfig


@register
class QuantizedSideTuning(SideTuningMethod):
    config_class = QSTConfig

    @classmethod
    def prepare_backbone(cls, base, config) -> None:
        from ..quant.modules import Linear4bit, quantize_model

        if any(isinstance(m, Linear4bit) for m in base.modules()) or not config.quantize_backbone:
            return
        quantize_model(base, quant_type=config.quant_type, blocksize=config.blocksize,
                       compress_statistics=config.compress_statistics, compute_dtype=config.compute_dtype)


def set_alpha(peft_model, value: float, adapter: str | None = None) -> None:
    """Set the blend weight alpha of a Side-Tuning or QST adapter (for a curriculum from 1 toward 0)."""
    a = peft_model.active_adapter if adapter is None else adapter
    net = peft_model.side_network[a] if "side_network" in peft_model._modules else None
    if net is None or "alpha" not in net._parameters:
        raise ValueError(f"adapter {a!r} has no output mix alpha (only SIDE_TUNING and QST have one)")
    net.alpha.data[...] = value


# ------------------------------------------------------------------ generate, memory


def _generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
              greedy: bool = False, seed=None, eos_token_id: int | None = None, attention_mask=None):
    """Continue ``idx`` (B, T) by ``max_new_tokens`` tokens, rerunning the last ``block_size`` window each step.

    The side network keeps no key/value cache, so each step of the one decoding loop
    (``minipeft.decoding``) runs backbone and side network on the whole window (greedy, or
    sampling at ``temperature`` among the ``top_k`` best).
    """
    return decoding.generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k, greedy=greedy,
                             seed=seed, eos_token_id=eos_token_id, attention_mask=attention_mask)


def held_leaf_bytes(root: Tensor, model: Module | None = None) -> int:
    """Bytes the graph of ``root`` keeps for backward that the engine's ledger does not count.

    The ledger (``engine.saved_bytes``) counts what ops save from inside the graph; arrays
    that were already leaves (inputs, or a backbone's hidden states computed under
    ``no_grad``) are kept all the same when an op saves them, e.g. a trainable downsample
    keeps its input for the weight gradient. This walks the graph and sums those arrays,
    each buffer once, leaving out the parameters of ``model`` (weights, not activations).
    """
    if root._ctx is None:
        return 0
    params = set()
    if model is not None:
        params = {_buffer_key(p.data)[0] for p in model.parameters()}
    nodes, seen, stack = [], set(), [root._ctx]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        stack += [p for p in node.parents if isinstance(p, _Node)]
    counted = {k for node in nodes for k in node.ctx._keys}
    held: dict[int, int] = {}
    for node in nodes:
        for a in node.ctx.saved_tensors:
            if a is None or not hasattr(a, "nbytes") or not getattr(a, "ndim", 0):
                continue
            key, nbytes = _buffer_key(a)
            if key not in counted and key not in params:
                held[key] = nbytes
    return sum(held.values())


__all__ = ["SideConfig", "SideTuningConfig", "LSTConfig", "QSTConfig", "SideNetwork", "AdapterDownsample",
           "AvgPoolDownsample", "SideTuningMethod", "SideTuning", "LadderSideTuning", "QuantizedSideTuning",
           "set_alpha", "held_leaf_bytes", "DOWNSAMPLES"]
