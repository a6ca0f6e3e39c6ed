"""Tests of minipeft.peft (mirrors minipeft/peft/), with small shared helpers."""
import numpy as np

from minipeft.engine import Tensor
from minipeft.gpt import GPT, GPTConfig
from minipeft.nn import Linear

VOCAB = 23


def tiny_gpt(dtype: str = "float32", seed: int = 0, **kw) -> GPT:
    """A 2-layer, 16-wide GPT-2 in eval mode (no dropout), fast enough for every test."""
    cfg = dict(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=16, dtype=dtype)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg), seed=seed).eval()


def batch(B: int = 2, T: int = 8, seed: int = 0):
    """Random token ids and (shifted) targets of shape (B, T)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, VOCAB, (B, T)), rng.integers(0, VOCAB, (B, T))


def logits(model, idx) -> np.ndarray:
    return model(idx).logits.data.copy()


def train(model, steps: int = 3, lr: float = 0.1) -> list[float]:
    """A few plain SGD steps on the trainable parameters; returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for s in range(steps):
        idx, tg = batch(seed=100)
        model.zero_grad()
        loss = model(idx, tg).loss
        loss.backward()
        losses.append(loss.item())
        for p in params:
            p.data = p.data - lr * p.grad
    return losses


def perturb(model, scale: float = 0.2, seed: int = 0) -> None:
    """Move every trainable parameter off its init (so adapters are no longer the identity)."""
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.data = (p.data + scale * rng.standard_normal(p.shape)).astype(p.dtype)


def linear(n_in: int, n_out: int, dtype=np.float64, seed: int = 0, bias: bool = True) -> Linear:
    """A frozen nn.Linear with random weights, as a base layer for layer-level tests."""
    lin = Linear(n_in, n_out, bias=bias, rng=seed, dtype=dtype)
    return lin.requires_grad_(False)


def x_input(shape, dtype=np.float64, seed: int = 1, requires_grad: bool = True) -> Tensor:
    return Tensor(np.random.default_rng(seed).standard_normal(shape).astype(dtype), requires_grad=requires_grad)


def base_weights(model) -> dict:
    """Copies of every base-layer weight (by name) of a PeftModel or plain model."""
    return {n: p.data.copy() for n, p in model.named_parameters() if not p.requires_grad}
