"""Time one training step of minipeft against PyTorch for the same GPT-2 model and batch.

A step is what every lesson's loop does: ``zero_grad``, forward, cross-entropy loss,
backward, ``AdamW.step`` (no clipping, no accumulation). Both frameworks get the same
``GPTConfig`` (``GPTConfig.preset(--config)``), the same weights (minipeft's GPT-2
initialisation copied into PyTorch), the same batch and the same AdamW hyperparameters,
so they compute the same function: the first steps' losses are compared before timing.

PyTorch side: ``transformers.GPT2LMHeadModel`` (SDPA attention by default, the peer a
user would otherwise pick), or a small hand-written GPT-2 in torch when transformers is
missing. ``--mode lora``: LoRA r=8, alpha=8 on ``c_attn`` in both (``minipeft.peft`` and
``peft.get_peft_model``; a hand-written LoRA layer where either library is unavailable),
everything else frozen; the LoRA A/B weights are copied too. ``--mode qlora`` (QLoRA,
Dettmers et al. 2023): every block's linear layers (``c_attn``, ``attn.c_proj``, ``c_fc``,
``mlp.c_proj``) quantized to NF4 (block size 64, double quantization, float32 compute),
LoRA r=8 on all of them; minipeft's ``quantize_model`` + ``get_peft_model`` against
``bitsandbytes.nn.Linear4bit`` (the layers ``transformers`` would swap in) + peft. Both
quantize the same float32 weights, and minipeft's NF4 codes are bitsandbytes' bit for
bit, so the losses still agree.

Timing (DESIGN.md, "Performance and memory"): ``--warmup`` steps, then ``--steps`` timed
steps per framework, run in alternating blocks of ``--block`` so that a load change on a
shared machine hits both; median and interquartile range; on CUDA the device is
synchronized before each clock read. Reported: seconds per step, tokens/s, the ratio
minipeft/torch of tokens/s, an estimate of the model FLOPs per step (Kaplan et al. 2020,
table 1: forward 2N + 2 n_layer n_ctx d_model per token, backward twice that, no weight
gradients for frozen weights) and the achieved GFLOP/s next to a measured float32 GEMM
rate at the same thread count (the practical ceiling on this machine).

``--threads N`` sets torch's intra-op threads and OMP/OpenBLAS/MKL threads for NumPy. The
BLAS reads its environment variables once, when NumPy is first imported, so this script
sets them before importing NumPy (and re-executes itself if NumPy was already imported).
``--profile`` adds a cProfile of minipeft's step: the top ops by cumulative time.

Examples::

    python benchmarks/train_step.py --config T1 --threads 2 --json out.json
    python benchmarks/train_step.py --config T1 --mode lora --threads 1
    python benchmarks/train_step.py --config gpt2 --batch 8 --seq 1024 --device cuda
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                "NUMEXPR_NUM_THREADS")
_REEXEC_MARK = "MINIPEFT_BENCH_REEXEC"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu: NumPy vs torch CPU; cuda: minipeft on CuPy vs torch CUDA")
    ap.add_argument("--config", default="T1", help="GPTConfig preset: T0, T1, T2, T3, gpt2 (default T1)")
    ap.add_argument("--mode", choices=("full", "lora", "qlora"), default="full",
                    help="full fine-tuning; LoRA r=8 on c_attn with the rest frozen; or QLoRA: NF4 base "
                         "(bitsandbytes on the torch side) + LoRA r=8 on every linear layer of the blocks")
    ap.add_argument("--compute-dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                    help="float16: 16-bit matmuls with float32 master weights and dynamic loss scaling on "
                         "both sides (minipeft.amp.autocast + GradScaler; torch.autocast + torch.amp.GradScaler); "
                         "bfloat16: the same in bfloat16, without loss scaling (float32's exponent range)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the config's block_size)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per framework (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per framework first (default 3)")
    ap.add_argument("--block", type=int, default=5, help="timed steps per framework before switching (default 5)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch and NumPy's BLAS (default: the libraries' own choice)")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    ap.add_argument("--seed", type=int, default=0, help="weights and batch seed (default 0)")
    ap.add_argument("--torch-attn", choices=("sdpa", "eager"), default="sdpa",
                    help="transformers attention implementation (default sdpa)")
    ap.add_argument("--check-steps", type=int, default=3,
                    help="steps whose losses are compared between the frameworks (default 3)")
    ap.add_argument("--profile", action="store_true", help="also cProfile minipeft's step and print the top ops")
    ap.add_argument("--profile-steps", type=int, default=3, help="steps averaged in the profile (default 3)")
    ap.add_argument("--top", type=int, default=10, help="rows of the profile table (default 10)")
    ap.add_argument("--lora-reference", action="store_true",
                    help="run minipeft's LoRA layers as the reference's five ops, the fused LoRA op "
                         "(minipeft/peft/lora_fused.py) off: what that op gains, measured")
    ap.add_argument("--graph", action="store_true",
                    help="minipeft's step recorded once as a CUDA graph and replayed (minipeft.graph_train."
                         "GraphTrainStep; 16-bit on cuda only; torch stays eager)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    for k in ("batch", "steps", "block"):
        if getattr(args, k) <= 0:
            ap.error(f"--{k} must be a positive integer, got {getattr(args, k)}")
    if args.warmup < 0 or args.check_steps < 1:
        ap.error("--warmup must be >= 0 and --check-steps >= 1")
    if args.threads is not None and args.threads <= 0:
        ap.error(f"--threads must be a positive integer, got {args.threads}")
    if args.seq is not None and args.seq <= 0:
        ap.error(f"--seq must be a positive integer, got {args.seq}")
    if args.graph and (args.device != "cuda" or args.compute_dtype == "float32"):
        ap.error("--graph records the step into a CUDA graph: it needs --device cuda and --compute-dtype "
                 "bfloat16 or float16")
    return args


def _set_threads_early(argv) -> None:
    """Put --threads into the BLAS/OpenMP environment before NumPy or torch is imported."""
    args = parse_args(argv)
    if args.threads is None:
        return
    want = str(args.threads)
    if all(os.environ.get(v) == want for v in _THREAD_VARS):
        return
    for v in _THREAD_VARS:
        os.environ[v] = want
    if "numpy" in sys.modules or "torch" in sys.modules:  # too late for this process: start again
        if os.environ.get(_REEXEC_MARK):
            raise RuntimeError("could not set BLAS threads: numpy was imported before the benchmark started")
        os.environ[_REEXEC_MARK] = "1"
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__)] + list(argv))


if __name__ == "__main__":
    _set_threads_early(sys.argv[1:])

import numpy as np  # noqa: E402  (after the thread environment is set)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from minipeft import amp  # noqa: E402
from minipeft import functional as MF  # noqa: E402
from minipeft.backend import to_numpy  # noqa: E402
from minipeft.gpt import GPT, GPTConfig  # noqa: E402
from minipeft.nn import Module, Parameter  # noqa: E402
from minipeft.optim import AdamW  # noqa: E402

LORA_R, LORA_ALPHA = 8, 8  # LoRA rank and alpha for --mode lora/qlora (scaling alpha / r = 1)
QLORA_TARGETS = ["c_attn", "c_proj", "c_fc"]  # --mode qlora: every linear layer of the blocks (not lm_head)
BETAS, EPS, WEIGHT_DECAY = (0.9, 0.999), 1e-8, 0.01  # AdamW hyperparameters (torch's defaults)
_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


# ------------------------------------------------------------------ minipeft side


class _MiniLoRA(Module):
    """Fallback when ``minipeft.peft`` is unusable: ``y = base(x) + (alpha/r) B A x``."""

    def __init__(self, base, r: int, alpha: float, rng: np.random.Generator):
        super().__init__()
        self.base_layer = base
        n_in, n_out = base.weight.shape[1], base.weight.shape[0]
        bound = 1.0 / np.sqrt(n_in)  # kaiming_uniform(a=sqrt(5)), as LoRA's A
        self.lora_A = Parameter(rng.uniform(-bound, bound, (r, n_in)).astype(base.weight.dtype))
        self.lora_B = Parameter(np.zeros((n_out, r), base.weight.dtype))
        self.scaling = alpha / r

    def forward(self, x):
        return self.base_layer(x) + MF.linear(MF.linear(x, self.lora_A), self.lora_B) * self.scaling


def build_minipeft(cfg: GPTConfig, mode: str, seed: int, device: str = "cpu"):
    """``(model, note, float_state)``: the model (GPT, or its LoRA/QLoRA-wrapped form), a note
    on how it was built, and the float weights of the plain GPT (NumPy) for the torch copy."""
    model = GPT(cfg, seed=seed)
    model.train()
    float_state = {k: to_numpy(v).copy() for k, v in model.state_dict().items()}
    if mode == "full":
        return model, "full fine-tuning", float_state
    if mode == "qlora":
        from minipeft.peft import LoraConfig, get_peft_model
        from minipeft.quant.modules import Linear4bit, quantize_model

        model.to(device)  # quantize where the model will run (the CUDA kernel on a GPU)
        if device == "cuda":  # quantize_model's byte report (model_nbytes) calls np.asarray on CuPy arrays:
            for name, lin in [(n, m) for n, m in model.named_modules() if n.startswith("transformer.h.")
                              and type(m).__name__ == "Linear"]:  # ... so swap the layers as it would
                q = Linear4bit(lin, quant_type="nf4", blocksize=64, compress_statistics=True)
                q.train(lin.training)
                model.set_submodule(name, q)
        else:
            quantize_model(model, quant_type="nf4", blocksize=64, compress_statistics=True)
        pm = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                              target_modules=list(QLORA_TARGETS)), rng=np.random.default_rng(seed))
        pm.train()
        return pm, "minipeft quantize_model (NF4, blocksize 64, double quant) + get_peft_model", float_state
    try:
        from minipeft.peft import LoraConfig, get_peft_model

        pm = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                              target_modules=["c_attn"]), rng=np.random.default_rng(seed))
        pm.train()
        return pm, "minipeft.peft.get_peft_model", float_state
    except Exception as e:  # the peft package is still being written: freeze by hand
        print(f"[minipeft] minipeft.peft unusable ({type(e).__name__}: {e}); using a hand-written LoRA layer")
        model = GPT(cfg, seed=seed)
        model.train()
        for p in model.parameters():
            p.requires_grad = False
        rng = np.random.default_rng(seed)
        for block in model.transformer.h:
            block.attn.c_attn = _MiniLoRA(block.attn.c_attn, LORA_R, LORA_ALPHA, rng)
        return model, "hand-written LoRA (minipeft.peft unusable)", float_state


def lora_arrays(named) -> dict:
    """{(layer, module, 'A' | 'B'): array} from (name, array) pairs of LoRA weights of either framework."""
    out = {}
    for name, arr in named:
        m = re.search(r"\.h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\..*lora_([AB])\b", name)
        if m:
            out[(int(m.group(1)), m.group(2), m.group(3))] = arr
    return out


# --------------------------------------------------------------------- torch side


def _hand_gpt2(torch, cfg: GPTConfig):
    """A small GPT-2 in torch with GPT-2's parameter names and nn.Linear (out, in) weights."""
    nn, F = torch.nn, torch.nn.functional

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn, self.c_proj = nn.Linear(cfg.n_embd, 3 * cfg.n_embd), nn.Linear(cfg.n_embd, cfg.n_embd)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = (t.view(B, T, cfg.n_head, -1).transpose(1, 2) for t in self.c_attn(x).split(C, dim=-1))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
            return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.c_proj = nn.Linear(cfg.n_embd, cfg.d_ff), nn.Linear(cfg.d_ff, cfg.n_embd)

        def forward(self, x):
            return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))

    class Blk(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
            self.attn = Attn()
            self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
            self.mlp = Mlp()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class Out:
        def __init__(self, logits):
            self.logits = logits

    class Gpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd), wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                h=nn.ModuleList(Blk() for _ in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)))
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
            self.lm_head.weight = self.transformer.wte.weight

        def forward(self, input_ids):
            t = self.transformer
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            x = t.wte(input_ids) + t.wpe(pos)
            for b in t.h:
                x = b(x)
            return Out(self.lm_head(t.ln_f(x)))

    return Gpt()


class _TorchLoRA:
    """Fallback when peft is missing: wraps a torch Linear/Conv1D as base(x) + (alpha/r) B A x."""

    @staticmethod
    def wrap(torch, base, n_in: int, n_out: int):
        nn = torch.nn

        class LoRA(nn.Module):
            def __init__(self):
                super().__init__()
                self.base_layer = base
                self.lora_A = nn.Linear(n_in, LORA_R, bias=False)
                self.lora_B = nn.Linear(LORA_R, n_out, bias=False)
                nn.init.zeros_(self.lora_B.weight)

            def forward(self, x):
                return self.base_layer(x) + self.lora_B(self.lora_A(x)) * (LORA_ALPHA / LORA_R)

        return LoRA()


def _bnb_4bit(torch, model, device: str, conv1d: bool = True) -> str:
    """Swap every block's Conv1D for ``bitsandbytes.nn.Linear4bit`` (NF4, block size 64, double
    quantization, float32 compute), as ``transformers``' ``replace_with_bnb_linear`` does."""
    import bitsandbytes as bnb

    for blk in model.transformer.h:
        for parent, name in ((blk.attn, "c_attn"), (blk.attn, "c_proj"), (blk.mlp, "c_fc"), (blk.mlp, "c_proj")):
            conv = getattr(parent, name)
            w = (conv.weight.data.t() if conv1d else conv.weight.data).contiguous().cpu()  # (out, in)
            lin = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=conv.bias is not None, compute_dtype=torch.float32,
                                    compress_statistics=True, quant_type="nf4")
            lin.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                           blocksize=64)
            if conv.bias is not None:
                lin.bias = torch.nn.Parameter(conv.bias.data.clone().cpu(), requires_grad=False)
            setattr(parent, name, lin.to(device))  # quantizes on the move to the GPU
    return f"bitsandbytes {bnb.__version__} Linear4bit (nf4, blocksize 64, double quant, float32 compute)"


def build_torch(torch, cfg: GPTConfig, float_state: dict, mini_model, mode: str, attn_impl: str, device: str):
    """The torch model with minipeft's weights, and notes on what it is."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel

        hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                            n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.n_inner,
                            activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            layer_norm_epsilon=cfg.layer_norm_epsilon, tie_word_embeddings=True,
                            bos_token_id=None, eos_token_id=None, use_cache=False)
        model = GPT2LMHeadModel._from_config(hf_cfg, attn_implementation=attn_impl)
        kind, conv1d = f"transformers.GPT2LMHeadModel (attn_implementation={attn_impl})", True
    except ImportError:
        model, kind, conv1d = _hand_gpt2(torch, cfg), "hand-written torch GPT-2 (transformers missing)", False
    if cfg.dropout:
        raise ValueError("the benchmark needs dropout=0 so both frameworks compute the same function")
    state = {}
    for name, arr in float_state.items():
        a = np.asarray(arr)
        state[name] = torch.from_numpy(np.ascontiguousarray(a.T if conv1d and name.endswith(_CONV1D) else a))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise RuntimeError(f"weight copy into torch failed: missing {missing}, unexpected {unexpected}")
    model.train()
    if mode == "qlora":
        import peft

        model.to(device)
        kind += " + " + _bnb_4bit(torch, model, device, conv1d)
        pcfg = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(QLORA_TARGETS))
        model = peft.get_peft_model(model, pcfg)
        kind += f" + peft {peft.__version__} get_peft_model"
    if mode == "lora":
        try:
            import peft

            pcfg = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=["c_attn"],
                                   fan_in_fan_out=conv1d)
            model = peft.get_peft_model(model, pcfg)
            kind += f" + peft {peft.__version__} get_peft_model"
        except ImportError:
            for p in model.parameters():
                p.requires_grad_(False)
            for blk in model.transformer.h:
                blk.attn.c_attn = _TorchLoRA.wrap(torch, blk.attn.c_attn, cfg.n_embd, 3 * cfg.n_embd)
            kind += " + hand-written LoRA (peft missing)"
    if mode in ("lora", "qlora"):
        src = lora_arrays((n, to_numpy(p.data)) for n, p in mini_model.named_parameters() if "lora_" in n)
        dst = lora_arrays((n, p) for n, p in model.named_parameters() if "lora_" in n)
        if set(src) != set(dst):
            raise RuntimeError(f"LoRA layers differ: minipeft {sorted(src)} vs torch {sorted(dst)}")
        with torch.no_grad():
            for key, p in dst.items():
                p.copy_(torch.from_numpy(src[key]))
        model.train()
    return model.to(device), kind


# ----------------------------------------------------------------------- stepping


def minipeft_step(model, optimizer, scaler, idx, tgt, compute_dtype: str = "float32"):
    """One minipeft training step, what ``train()`` does without clipping: forward under
    ``amp.autocast``, backward from the scaled loss, the AdamW step unless a gradient
    overflowed, the next loss scale. Returns the loss Tensor."""
    optimizer.zero_grad()
    with amp.autocast(compute_dtype):
        loss = model(idx, targets=tgt).loss
    scaler.scale_loss(loss).backward()
    found_inf = scaler.unscale_(optimizer.params)
    if not found_inf:
        optimizer.step()
    scaler.update(found_inf)
    return loss


def make_steppers(torch, mini, tmodel, idx_np, tgt_np, device: str, lr: float, compute_dtype: str = "float32",
                  graph: bool = False):
    """Two closures that run one training step each and return the loss (a scalar array/tensor).

    With ``graph`` minipeft's step is a :class:`minipeft.graph_train.GraphTrainStep` (one eager
    step, then the recorded step replayed) fed the host batch, which it copies to the device
    at every step.

    With ``compute_dtype='float16'`` each side runs its own mixed precision: 16-bit matmuls
    under autocast, float32 weights and AdamW state, the loss scaled by a dynamic scaler
    (both start at 2^16) and a step skipped on overflow. ``'bfloat16'`` is the same without
    the scalers (bfloat16 has float32's range; PyTorch's recipe uses no GradScaler with it).
    """
    half = compute_dtype == "float16"  # loss scaling: float16 only
    cast = compute_dtype != "float32"
    torch_dtype = torch.bfloat16 if compute_dtype == "bfloat16" else torch.float16
    if device == "cuda":
        import cupy as cp

        mini.to("cuda")
        idx_m, tgt_m = cp.asarray(idx_np), cp.asarray(tgt_np)
        sync_m = cp.cuda.Device().synchronize
        sync_t = torch.cuda.synchronize
    else:
        idx_m, tgt_m = idx_np, tgt_np
        sync_m = sync_t = (lambda: None)
    opt_m = AdamW(mini, lr=lr, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    params_t = [p for p in tmodel.parameters() if p.requires_grad]
    opt_t = torch.optim.AdamW(params_t, lr=lr, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    idx_t = torch.from_numpy(idx_np).to(device)
    tgt_t = torch.from_numpy(tgt_np).to(device)
    V = mini.config.vocab_size if hasattr(mini, "config") else tmodel.config.vocab_size

    scaler_m = amp.GradScaler(enabled=half)
    scaler_t = torch.amp.GradScaler(device, enabled=half)

    if graph:
        from minipeft.graph_train import GraphTrainStep

        graph_step = GraphTrainStep(mini, opt_m, compute_dtype, scaler=scaler_m)  # float16: the same scaler

        def step_mini():
            return graph_step(idx_np, tgt_np)
    else:
        def step_mini():
            return minipeft_step(mini, opt_m, scaler_m, idx_m, tgt_m, compute_dtype)

    def step_torch():
        opt_t.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch_dtype, enabled=cast):
            logits = tmodel(input_ids=idx_t).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, V), tgt_t.reshape(-1))
        scaler_t.scale(loss).backward()
        scaler_t.step(opt_t)
        scaler_t.update()
        return loss

    n_m = sum(p.size for _, p in opt_m.named_params)
    n_t = sum(p.numel() for p in params_t)
    return step_mini, step_torch, sync_m, sync_t, n_m, n_t


def time_steps(step, sync, n: int) -> list[float]:
    out = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def summarize(ts: list[float], tokens: int) -> dict:
    q1, med, q3 = np.percentile(ts, [25, 50, 75])
    return {"n": len(ts), "median_s": float(med), "q1_s": float(q1), "q3_s": float(q3), "iqr_s": float(q3 - q1),
            "min_s": float(min(ts)), "tokens_per_s": tokens / float(med)}


def model_flops(cfg: GPTConfig, B: int, T: int, mode: str) -> float:  # qlora counts as lora
    """Kaplan et al. 2020 (table 1): forward 2N + 2 L T C flops per token, N the matmul weights.

    Backward costs 2x forward for activation gradients + weight gradients (full) or ~1x
    (LoRA: frozen weights get no gradient, so only activation gradients). Adapter and
    optimizer FLOPs are neglected.
    """
    C, L = cfg.n_embd, cfg.n_layer
    n_matmul = L * (4 * C * C + 2 * C * cfg.d_ff) + cfg.vocab_size * C  # c_attn, c_proj, mlp, lm_head
    fwd = B * T * (2 * n_matmul + 2 * L * T * C)
    return float(fwd * (3 if mode == "full" else 2))


def gemm_gflops(torch, device: str, n: int = 1024, reps: int = 10) -> dict:
    """float32 n x n GEMM rate of NumPy (or CuPy) and torch at the current thread setting."""
    out = {}
    if device == "cuda":
        import cupy as cp

        a = cp.ones((n * 4, n * 4), cp.float32)
        libs = {"minipeft_backend": (lambda: a @ a, cp.cuda.Device().synchronize)}
        ta = torch.ones((n * 4, n * 4), device="cuda")
        libs["torch"] = (lambda: ta @ ta, torch.cuda.synchronize)
        n *= 4
    else:
        a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
        ta = torch.from_numpy(a.copy())
        libs = {"numpy": (lambda: a @ a, lambda: None), "torch": (lambda: ta @ ta, lambda: None)}
    for name, (f, sync) in libs.items():
        f()
        sync()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            sync()
            ts.append(time.perf_counter() - t0)
        out[name] = 2 * n**3 / statistics.median(ts) / 1e9
    return out


# ---------------------------------------------------------------------- profiling


def _op_names() -> dict:
    """(file, first line) -> 'Class.method' for every minipeft Function's forward/backward."""
    import inspect

    from minipeft.engine import Function

    names = {}
    for mod_name in ("minipeft.functional", "minipeft.kernels.functions", "minipeft.amp"):
        mod = sys.modules[mod_name]
        for cname, cls in inspect.getmembers(mod, inspect.isclass):
            if not issubclass(cls, Function) or cls is Function:
                continue
            for meth in ("forward", "backward"):
                f = cls.__dict__.get(meth)
                f = getattr(f, "__func__", f)
                if f is not None and hasattr(f, "__code__"):
                    names[(f.__code__.co_filename, f.__code__.co_firstlineno)] = f"{cname}.{meth}"
    return names


def profile_minipeft(step, n_steps: int, top: int) -> dict:
    """cProfile ``n_steps`` steps; per-step table of the top ops by cumulative time, and phases."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(n_steps):
        step()
    prof.disable()
    wall = (time.perf_counter() - t0) / n_steps
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    names = _op_names()
    pkg = os.path.join("minipeft", "")
    rows, phases, engine_own = [], {}, 0.0
    for (file, line, func), (cc, nc, tt, ct, _) in stats.items():
        label = names.get((file, line))
        in_optim = os.path.join("minipeft", "optim") in file  # optim.py or the optim/ package
        if label is None and in_optim and func == "adamw_update":
            label = "optim.adamw_update"
        if label is None and file.endswith(os.path.join("minipeft", "backend.py")) and func == "scatter_add":
            label = "backend.scatter_add"
        if label is not None:
            rows.append({"op": label, "calls": nc / n_steps, "tottime_ms": 1e3 * tt / n_steps,
                         "cumtime_ms": 1e3 * ct / n_steps})
        if pkg in file and file.endswith(("engine.py", "nn.py", "gpt.py", "tuner.py", "lora.py")):
            engine_own += tt  # Python bookkeeping: graph building, the backward loop, module calls
        if file.endswith("gpt.py") and func == "forward" and ct > phases.get("forward", 0):
            phases["forward"] = ct
        if file.endswith("engine.py") and func == "backward":
            phases["backward"] = ct
        if in_optim and func == "step" and ct > phases.get("optimizer", 0):
            phases["optimizer"] = ct
    rows.sort(key=lambda r: -r["cumtime_ms"])
    total = 1e3 * wall
    for r in rows:
        r["pct_of_step"] = 100.0 * r["cumtime_ms"] / total
    phases = {k: 1e3 * v / n_steps for k, v in phases.items()}
    phases["python_bookkeeping_ms"] = 1e3 * engine_own / n_steps
    return {"profiled_step_ms": total, "steps": n_steps, "top_ops": rows[:top], "phases_ms": phases}


def print_profile(p: dict) -> None:
    print(f"\ncProfile of minipeft's step ({p['steps']} steps averaged; {p['profiled_step_ms']:.1f} ms/step "
          f"under the profiler)")
    print("| # | op | calls/step | self ms | cumulative ms | % of step |")
    print("|---|---|---:|---:|---:|---:|")
    for i, r in enumerate(p["top_ops"], 1):
        print(f"| {i} | `{r['op']}` | {r['calls']:.0f} | {r['tottime_ms']:.1f} | {r['cumtime_ms']:.1f} | "
              f"{r['pct_of_step']:.1f} |")
    ph = p["phases_ms"]
    print("phases (ms/step): " + ", ".join(f"{k} {v:.1f}" for k, v in ph.items()))


# --------------------------------------------------------------------------- main


def _versions(torch) -> dict:
    v = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__}
    for mod in ("transformers", "peft", "cupy"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:
            v[mod] = None
    try:
        import minipeft

        v["minipeft"] = getattr(minipeft, "__version__", "checkout")
    except Exception:  # pragma: no cover
        pass
    return v


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU")
    if args.lora_reference:  # take the fused LoRA op out of the fast-path table for this run
        from minipeft import fast
        from minipeft.peft.lora import lora_forward

        for path in fast.paths(lora_forward):
            fast.unregister(path)
    cfg = GPTConfig.preset(args.config, dropout=0.0)
    T = args.seq or cfg.block_size
    if T > cfg.block_size:
        raise SystemExit(f"--seq {T} is longer than the {args.config} block_size {cfg.block_size}")
    B = args.batch
    tokens = B * T
    if args.device == "cuda":
        device_name = torch.cuda.get_device_name(0)
    else:
        device_name = f"{_cpu_model()}, {os.cpu_count()} logical cores"
    header = {
        "command": " ".join(["python", "benchmarks/train_step.py"] + list(sys.argv[1:] if argv is None else argv)),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": args.device, "device_name": device_name, "host": platform.node(), "versions": _versions(torch),
        "threads": {"torch": torch.get_num_threads(),
                    **{v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}},
        "loadavg_start": _loadavg(),
        "config": args.config, "gpt_config": cfg.to_dict(), "mode": args.mode, "batch": B, "seq": T,
        "tokens_per_step": tokens, "lr": args.lr, "compute_dtype": args.compute_dtype,
        "lora_fused": not args.lora_reference, "minipeft_graph": args.graph,
    }
    print(f"# minipeft vs PyTorch: one training step (fwd + loss + bwd + AdamW), {args.mode}, "
          f"{args.compute_dtype} compute")
    for k in ("command", "date", "device", "device_name", "versions", "threads", "loadavg_start"):
        print(f"{k}: {header[k]}")
    print(f"model: {args.config} {cfg.n_layer} layers, C={cfg.n_embd}, H={cfg.n_head}, V={cfg.vocab_size}; "
          f"batch {B} x {T} = {tokens} tokens/step")

    mini, mini_kind, float_state = build_minipeft(cfg, args.mode, args.seed, args.device)
    tmodel, torch_kind = build_torch(torch, cfg, float_state, mini, args.mode, args.torch_attn, args.device)
    rng = np.random.default_rng(args.seed + 1)
    data = rng.integers(0, cfg.vocab_size, size=(B, T + 1)).astype(np.int64)
    idx, tgt = np.ascontiguousarray(data[:, :-1]), np.ascontiguousarray(data[:, 1:])
    step_m, step_t, sync_m, sync_t, n_m, n_t = make_steppers(torch, mini, tmodel, idx, tgt, args.device, args.lr,
                                                             args.compute_dtype, args.graph)
    if args.graph:
        mini_kind += "; the step recorded as a CUDA graph (minipeft.graph_train.GraphTrainStep), torch eager"
    print(f"minipeft: {mini_kind}; trainable parameters {n_m:,}")
    print(f"torch:    {torch_kind}; trainable parameters {n_t:,}")
    if n_m != n_t:
        raise SystemExit(f"trainable parameter counts differ ({n_m} vs {n_t}): the models are not the same")

    # the same function: losses of the first steps (each after the previous AdamW update)
    check = []
    for _ in range(args.check_steps):
        lm, lt = float(step_m().item()), float(step_t().item())
        check.append({"minipeft": lm, "torch": lt, "abs_diff": abs(lm - lt), "rel_diff": abs(lm - lt) / abs(lt)})
    print("loss check (step: minipeft, torch, |diff|, rel):")
    for i, c in enumerate(check, 1):
        print(f"  {i}: {c['minipeft']:.7f} {c['torch']:.7f} {c['abs_diff']:.2e} {c['rel_diff']:.2e}")
    # float16 products round to 11 bits; bfloat16's to 8, 2^3 times coarser: the tolerance scales with it
    tol = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-3 * 2 ** 3}[args.compute_dtype]
    ok = check[0]["rel_diff"] <= tol
    print(f"first-step losses agree to {check[0]['rel_diff']:.1e} relative: {'OK' if ok else 'MISMATCH'}")

    for _ in range(args.warmup):
        step_m()
        step_t()
    sync_m()
    sync_t()
    tm, tt = [], []
    left = args.steps
    while left > 0:  # alternate blocks, so a change of load on a shared machine hits both
        n = min(args.block, left)
        tm += time_steps(step_m, sync_m, n)
        tt += time_steps(step_t, sync_t, n)
        left -= n
    sm, st = summarize(tm, tokens), summarize(tt, tokens)
    flops = model_flops(cfg, B, T, args.mode)
    gemm = gemm_gflops(torch, args.device)
    ratio = sm["tokens_per_s"] / st["tokens_per_s"]
    print(f"\n{'':10s} {'median s':>10s} {'IQR s':>9s} {'tokens/s':>11s} {'GFLOP/s':>9s}")
    for name, s in (("minipeft", sm), ("torch", st)):
        print(f"{name:10s} {s['median_s']:10.4f} {s['iqr_s']:9.4f} {s['tokens_per_s']:11.0f} "
              f"{flops / s['median_s'] / 1e9:9.2f}")
    print(f"model FLOPs/step (estimate) {flops / 1e9:.2f} G; float32 GEMM {', '.join(f'{k} {v:.1f}' for k, v in gemm.items())} GFLOP/s")
    print(f"ratio minipeft/torch (tokens/s): {ratio:.3f}  (minipeft's step takes {1 / ratio:.2f}x torch's time)")
    res = {**header, "minipeft_impl": mini_kind, "torch_impl": torch_kind, "trainable_params": n_m,
           "loss_check": check, "losses_agree": ok, "warmup": args.warmup, "minipeft": sm, "torch": st,
           "ratio_tokens_per_s": ratio, "model_flops_per_step": flops,
           "achieved_gflops": {"minipeft": flops / sm["median_s"] / 1e9, "torch": flops / st["median_s"] / 1e9},
           "gemm_gflops": gemm, "raw_s": {"minipeft": tm, "torch": tt}}
    if args.profile:
        res["profile"] = profile_minipeft(step_m, args.profile_steps, args.top)
        print_profile(res["profile"])
    res["loadavg_end"] = _loadavg()
    print(f"loadavg_end: {res['loadavg_end']}")
    if args.json_out:
        from minipeft.atomic import write_text_atomic        # a killed run leaves the old file whole
        write_text_atomic(args.json_out, json.dumps(res, indent=2))
        print(f"wrote {args.json_out}")
    return res


if __name__ == "__main__":
    main()
