"""Prefix tuning (Li & Liang, arXiv 2101.00190, §4): learned keys and values at every layer.

Every layer's attention reads ``K' = [P_K; K]``, ``V' = [P_V; V]`` with P learned
positions per layer and head, the model frozen (methods.md §10). The prefix is one
matrix of shape (P, L·2·C), turned into per-layer keys and values exactly as peft does
(peft-format.md §4.7)::

    (P, L*2*C) -> (1, P, L*2, H, D) -> permute [2, 0, 3, 1, 4] -> (L*2, 1, H, P, D)
    layer i: key = entry 2i, value = entry 2i + 1, each (1, H, P, D)

and given to ``GPT.forward(prefix_key_values=...)``: as when Hugging Face GPT-2 gets
them as ``past_key_values``, the real tokens' positions start at P and every query sees
all P prefix positions (the attention mask gets P leading ones).

**Reparameterization (§4.3).** Optimizing the prefix directly is unstable, so the paper
trains ``P = MLP(P')``: ``Embedding(P, C) -> Linear(C, hidden) -> tanh ->
Linear(hidden, L*2*C)`` (``prefix_projection=True``, ``encoder_hidden_size`` = hidden;
peft's ``PrefixEncoder``, in memory ``prompt_encoder.<adapter>.embedding.weight``,
``.transform.0.weight``, ``.transform.2.weight``...). After training only P is kept:
``remove_reparameterization(model)`` replaces the MLP by a plain ``Embedding(P, L*2*C)``
holding its output (same outputs, no MLP). Without projection the plain embedding is
trained directly. Init as peft: embeddings N(0, 1), Linears ``torch.nn.Linear``'s
default; ``init_weights="zero"`` zeroes the plain embedding or the last Linear.

**Files.** peft saves one tensor, ``prompt_embeddings`` (P, L*2*C): the MLP's **output**
when trained with projection; on load it builds the plain embedding, and training cannot
resume through the MLP. minipeft does the same through the framework:
``peft_state_dict()`` is ``{"prompt_embeddings": prefix}`` in both cases (for an encoder
with an MLP the entry is a ``PrefixOutputView``: reading it runs the MLP, writing it --
``load_peft_state_dict`` -- replaces the MLP by a plain prefix holding the array), and a
config with ``inference_mode=True`` builds the plain encoder directly, as peft.
``prefix_prompt_embeddings(model)`` / ``load_prefix_prompt_embeddings(model, array)`` do
the same by hand.

GPT-2 small, P = 20, no projection: 20 x 12 x 2 x 768 = 368,640 trainable parameters.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import functional as F
from ..backend import to_device, to_numpy, xp_of
from ..engine import Tensor, no_grad
from ..nn import Embedding, Linear, Module, ModuleList, Parameter
from .method import Recipe, register
from .prompt_learning import PromptLearningConfig, PromptLearningMethod, encoder_dtype

PREFIX_TOKENS = 10  # the course's prefix length (Li & Liang's table-to-text setting)


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """peft's ``PrefixTuningConfig`` (peft 0.21 fields and defaults)."""

    peft_type = "PREFIX_TUNING"

    encoder_hidden_size: int | None = None  # the MLP's hidden width; None: token_dim (as peft)
    prefix_projection: bool = False  # True: train through the MLP reparameterization
    init_weights: str | None = None  # None: random (peft's); "zero": the prefix starts at 0

    def __post_init__(self) -> None:
        super().__post_init__()
        h = self.encoder_hidden_size
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h <= 0):
            raise ValueError(f"encoder_hidden_size must be a positive int or None (= token_dim), got {h!r}")
        if not isinstance(self.prefix_projection, bool):
            raise TypeError(f"prefix_projection must be True or False, got {self.prefix_projection!r}")
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None (random) or 'zero', got {self.init_weights!r}")

    def fill_from_model(self, model) -> None:
        super().fill_from_model(model)
        if self.encoder_hidden_size is None:
            self.encoder_hidden_size = self.token_dim


class Tanh(Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.tanh(x)


class PrefixEncoder(Module):
    """peft's ``PrefixEncoder``: ``embedding`` (P, L*2*C), or ``embedding`` (P, C) + ``transform`` MLP."""

    def __init__(self, config: PrefixTuningConfig, rng: np.random.Generator, dtype=np.float32, xp=np) -> None:
        super().__init__()
        P, C, L = config.num_virtual_tokens, config.token_dim, config.num_layers
        zero = config.init_weights == "zero"
        self.prefix_projection = config.prefix_projection and not config.inference_mode  # peft's rule
        if self.prefix_projection:
            H = config.encoder_hidden_size
            self.embedding = _embedding(rng.standard_normal((P, C)), dtype, xp)
            first = Linear(C, H, rng=rng, dtype=dtype, device=_device(xp))  # torch.nn.Linear's init
            last = Linear(H, L * 2 * C, rng=rng, dtype=dtype, device=_device(xp))
            if zero:
                last.weight.data[...] = 0
                last.bias.data[...] = 0
            self.transform = ModuleList([first, Tanh(), last])
        else:
            w = np.zeros((P, L * 2 * C)) if zero else rng.standard_normal((P, L * 2 * C))
            self.embedding = _embedding(w, dtype, xp)

    def forward(self) -> Tensor:
        """The prefix as one matrix (P, L*2*C)."""
        x = self.embedding.weight  # (P, C) or (P, L*2*C)
        if self.prefix_projection:
            for layer in self.transform:
                x = layer(x)  # (P, hidden) then (P, L*2*C)
        return x


def _device(xp) -> str:
    return "cpu" if xp is np else "cuda"


def _embedding(weight: np.ndarray, dtype, xp) -> Embedding:
    return Embedding.from_weight(Parameter.from_numpy(weight, dtype, xp))


def split_key_values(flat: Tensor, num_layers: int, num_heads: int) -> list[tuple[Tensor, Tensor]]:
    """(P, L*2*C) -> per layer (key, value), each (1, H, P, D), in peft's order (§4.7)."""
    P, width = flat.shape
    D = width // (2 * num_layers * num_heads)
    kv = flat.reshape(1, P, 2 * num_layers, num_heads, D).transpose(2, 0, 3, 1, 4)  # (L*2, 1, H, P, D)
    return [(kv[2 * i], kv[2 * i + 1]) for i in range(num_layers)]  # entry 2i key, 2i + 1 value


def _adapter(peft_model, adapter):
    a = peft_model.active_adapter if adapter is None else adapter
    if a not in peft_model.peft_config or peft_model.peft_type != "PREFIX_TUNING":
        raise ValueError(f"no prefix-tuning adapter {a!r}; adapters: {list(peft_model.peft_config)} "
                         f"({peft_model.peft_type})")
    return a


def prefix_prompt_embeddings(peft_model, adapter: str | None = None):
    """What peft saves as ``prompt_embeddings``: the prefix matrix (P, L*2*C), the MLP's output if any."""
    a = _adapter(peft_model, adapter)
    with no_grad():
        return peft_model.prompt_encoder[a]().data.copy()


def load_prefix_prompt_embeddings(peft_model, array, adapter: str | None = None) -> None:
    """Make ``adapter`` a plain prefix holding ``array`` (P, L*2*C), e.g. peft's ``prompt_embeddings``.

    An encoder with an MLP loses it (its parameters cannot be recovered from the output).
    Checks the shape first; on error nothing changes.
    """
    a = _adapter(peft_model, adapter)
    cfg = peft_model.peft_config[a]
    want = (cfg.num_virtual_tokens, cfg.num_layers * 2 * cfg.token_dim)
    if tuple(np.shape(array)) != want:
        raise ValueError(f"prefix tensor has shape {tuple(np.shape(array))}, adapter {a!r} needs {want} "
                         "(num_virtual_tokens, num_layers * 2 * token_dim); is it for another model or length?")
    if not np.isfinite(to_numpy(array)).all():
        raise ValueError("prefix tensor has NaN or inf entries; the file is damaged")
    enc = peft_model.prompt_encoder[a]
    w = enc.embedding.weight
    trainable = bool(w.requires_grad)
    if enc.prefix_projection:
        del enc.transform
        enc.prefix_projection = False
        enc.embedding = _embedding(np.zeros(want), w.dtype, xp_of(w.data))
        w = enc.embedding.weight
    w.data = to_device(array, w.device).astype(w.dtype, copy=True)
    w.requires_grad = trainable


def remove_reparameterization(peft_model, adapter: str | None = None) -> None:
    """Replace ``adapter``'s MLP by the plain prefix it computes (what peft keeps after training)."""
    a = _adapter(peft_model, adapter)
    if peft_model.prompt_encoder[a].prefix_projection:
        load_prefix_prompt_embeddings(peft_model, prefix_prompt_embeddings(peft_model, a), a)


class PrefixOutputView(Tensor):
    """The prefix of a still-reparameterized adapter, as peft saves it (not a parameter).

    ``.data`` runs the MLP (no gradient) and gives (P, L*2*C); assigning ``.data`` is
    ``load_prefix_prompt_embeddings``: the MLP is replaced by a plain prefix holding the
    array. This lets ``peft_state_dict``/``load_peft_state_dict`` treat both encoders alike.
    """

    def __init__(self, peft_model, adapter: str) -> None:  # no Tensor.__init__: there is no stored array
        self._owner = (peft_model, adapter)
        self.grad, self.requires_grad, self._ctx = None, False, None

    @property
    def data(self):
        return prefix_prompt_embeddings(*self._owner)

    @data.setter
    def data(self, array) -> None:
        load_prefix_prompt_embeddings(self._owner[0], array, self._owner[1])


@register
class PrefixTuningMethod(PromptLearningMethod):
    config_class = PrefixTuningConfig
    # trained through the MLP (hidden = d); its last Linear starts at 0, so the prefix starts at 0
    recipes = (Recipe("prefix", f"prefix tuning P={PREFIX_TOKENS}", "additive: soft prompts",
                      lambda n_layer, n_embd: PrefixTuningConfig(num_virtual_tokens=PREFIX_TOKENS,
                                                                 prefix_projection=True, init_weights="zero"), lr=3e-2,
                      memory=lambda n_layer, n_embd: dict(method="prefix", n_virtual_tokens=PREFIX_TOKENS,
                                                          prefix_projection=True, encoder_hidden_size=n_embd)),)

    @classmethod
    def build_encoder(cls, peft_model, config, rng) -> Module:
        wte = peft_model.get_base_model().transformer.wte.weight
        return PrefixEncoder(config, rng, encoder_dtype(wte), xp_of(wte.data))

    @classmethod
    def key_values(cls, peft_model) -> list[tuple[Tensor, Tensor]]:
        """The active adapter's per-layer (key, value), each (1, H, P, D)."""
        a = peft_model.active_adapter
        cfg = peft_model.peft_config[a]
        return split_key_values(peft_model.prompt_encoder[a](), cfg.num_layers, cfg.num_attention_heads)

    @classmethod
    def forward(cls, peft_model, *args, **kwargs):
        if cls.check_prefix_arg("prefix_key_values", kwargs):
            kwargs["prefix_key_values"] = cls.key_values(peft_model)
        return peft_model.base_model(*args, **kwargs)

    @classmethod
    def generation_kwargs(cls, peft_model) -> dict:
        with no_grad():
            return {"prefix_key_values": [(k.data, v.data) for k, v in cls.key_values(peft_model)]}

    @classmethod
    def extra_adapter_state(cls, peft_model, adapter_name):
        if "prompt_encoder" not in peft_model._modules or adapter_name not in peft_model.prompt_encoder:
            return []
        enc = peft_model.prompt_encoder[adapter_name]
        if not enc.prefix_projection:
            return [(f"prompt_encoder.{adapter_name}.embedding.weight", "prompt_embeddings", enc.embedding.weight)]
        return [(f"prompt_encoder.{adapter_name}", "prompt_embeddings", PrefixOutputView(peft_model, adapter_name))]


__all__ = ["PrefixTuningConfig", "PrefixEncoder", "PrefixTuningMethod", "PrefixOutputView", "split_key_values",
           "PREFIX_TOKENS", "prefix_prompt_embeddings", "load_prefix_prompt_embeddings", "remove_reparameterization"]
