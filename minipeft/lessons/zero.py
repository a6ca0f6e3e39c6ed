"""ZeRO beside PEFT: what data parallelism stores per device, predicted and measured per rank.

Run it on several ranks: ``python -m minipeft.launch --nproc 2 -m minipeft.lessons.zero --quick``
(alone it is a world of one, where every stage holds everything). It

1. prints the ZeRO paper's per-device model states (Rajbhandari et al. 2020, Fig. 1) for the
   course's cases — GPT-2 1.5B and GPT-3 175B — stage by stage, next to LoRA and QLoRA
   (``minipeft.memory``), and the devices each needs (A100-40GB);
2. trains a tiny GPT data-parallel at ZeRO stages 0-3 on these ranks and prints, for every
   rank, the bytes it holds (weights, gradients, optimizer state) measured next to
   ``memory_zero.per_rank_bytes``'s prediction, and the bytes the paper says each stage moves;
3. checks that every stage gives bit for bit the losses of plain data parallelism, and that
   those equal one process running the same shards one after another (``DataParallel(World(),
   num_shards=N)``), and shows how far one process with the whole batch in one forward is.
"""
from __future__ import annotations

import os

import numpy as np

from .. import engine
from ..backend import to_device, to_numpy
from ..distributed import DataParallel, World, get_world
from ..gpt import GPT, GPTConfig
from ..memory import GB, MethodConfig, StepSetup, estimate_memory, gpt2_param_count
from ..memory_zero import (PAPER_FIG1, STAGE_NAMES, STAGES, communication_bytes, devices_needed,
                           per_rank_bytes, zero_breakdown, zero_model_states)
from ..optim import AdamW, AdamW8bit, PagedAdamW
from ..train import TrainConfig, train
from ._common import Report, finish, parse_args

KINDS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw")
QUICK = dict(n_layer=2, n_embd=32, block_size=16, steps=3, batch=8)
BUCKET_BYTES = 32 * 1024  # gradient buckets far smaller than DDP's 25 MiB, so a tiny model's gradients fill several
FULL = dict(n_layer=4, n_embd=64, block_size=32, steps=10, batch=16)


def _add_arguments(p) -> None:
    p.add_argument("--kind", choices=KINDS, default="full", help="what trains: all weights, LoRA, or QLoRA")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="AdamW, 8-bit AdamW or paged AdamW")
    p.add_argument("--dropout", type=float, default=0.0, help="GPT dropout and LoRA dropout (default 0)")
    p.add_argument("--checkpoint-dir", default=None, help="write checkpoints of the stage-2 run here (tests)")


def make_model(kind: str, sizes: dict, seed: int, dropout: float = 0.0, device: str = "cpu"):
    """A tiny GPT on ``device``: every weight trainable (``full``), LoRA on every block linear, or QLoRA."""
    from ..peft import LoraConfig, get_peft_model, get_qlora_model

    cfg = GPTConfig(vocab_size=64, block_size=sizes["block_size"], n_layer=sizes["n_layer"], n_head=2,
                    n_embd=sizes["n_embd"], dropout=dropout)
    model = GPT(cfg, seed=seed)
    if kind == "full":
        return model.to(device)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights="gaussian",
                      lora_dropout=dropout)
    if kind == "lora":
        return get_peft_model(model, lora).to(device)
    return get_qlora_model(model, lora, compute_dtype="float32").to(device)


def make_optimizer(name: str, model, lr: float):
    if name == "adamw8bit":
        return AdamW8bit(model, lr=lr)
    if name == "paged_adamw":
        return PagedAdamW(model, lr=lr, page_size=1024)
    return AdamW(model, lr=lr)


def batches(vocab: int, T: int, device: str = "cpu"):
    """``get_batch(rng)``: random token rows whose next token is a fixed function of the current one."""
    def get_batch(rng, batch_size):
        x = rng.integers(0, vocab, size=(batch_size, T))  # (B, T)
        return to_device(x, device), to_device((3 * x + 1) % vocab, device)
    return get_batch


def run_case(kind: str, optimizer: str, parallel: DataParallel | bool, sizes: dict, seed: int = 0,
             checkpoint_dir: str | None = None, resume: bool = False, steps: int | None = None,
             dropout: float = 0.0, device: str = "cpu") -> dict:
    """Train one tiny model for ``sizes['steps']`` steps under ``parallel``; losses, weights, memory."""
    model = make_model(kind, sizes, seed, dropout, device)
    opt = make_optimizer(optimizer, model, lr=1e-2)
    get = batches(64, sizes["block_size"], device)
    cfg = TrainConfig(max_steps=steps or sizes["steps"], batch_size=sizes["batch"], lr=1e-2, schedule="constant",
                      grad_clip=1.0, seed=seed, progress=False, checkpoint_dir=checkpoint_dir,
                      checkpoint_every=1 if checkpoint_dir else 0)
    engine.reset_peak_saved_bytes()
    res = train(model, lambda rng: get(rng, sizes["batch"]), opt, cfg, parallel=parallel, resume=resume)
    out = {"losses": res.losses, "grad_norms": res.grad_norms, "activations_peak": engine.peak_saved_bytes()}
    if isinstance(parallel, DataParallel):
        sizes_t = {n: int(np.prod(parallel._shapes[n])) for n, _ in parallel.named_params}
        out["measured"] = parallel.memory(model, opt)
        out["predicted"] = per_rank_bytes(sizes_t, parallel.owner, parallel.rank, parallel.stage, 4, 4, optimizer)
        out["trainable_params"] = sum(sizes_t.values())
        out["traffic_per_step"] = {k: v / cfg.max_steps for k, v in parallel.traffic.items()}
        out["launches_per_step"] = {k: v / cfg.max_steps for k, v in parallel.launches.items()}
        with parallel.full_parameters():
            out["weights"] = {n: to_numpy(p.data).copy() for n, p in parallel.named_params}
    return out


def course_rows(n_d: int = 64) -> list:
    """Per-device GB of model states, stages 0-3 at ``n_d`` devices, for the course's models, full FT and PEFT."""
    mixed = StepSetup(seq_len=1, weight_dtype="float16", state_dtype="float32", master_weights=True)
    rows = []
    for name, label in (("gpt2-xl", "GPT-2 1.5B"), ("gpt3-175b", "GPT-3 175B")):
        psi = gpt2_param_count(name)
        for method, mc in (("full FT", MethodConfig("full")),
                           ("LoRA r=4 (Wq, Wv)", MethodConfig("lora", targets=("c_attn.q", "c_attn.v"), r=4)),
                           ("QLoRA r=4 (Wq, Wv)", MethodConfig("qlora", targets=("c_attn.q", "c_attn.v"), r=4))):
            b = estimate_memory(name, mc, mixed)
            per = [zero_breakdown(b, n_d, s, partition_frozen=True)["total"] / GB for s in STAGES]
            rows.append((f"{label} {method}", f"{psi / 1e9:.2f}B", *[f"{v:,.2f}" for v in per]))
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv, __doc__.split("\n")[0], _add_arguments)
    ex, sizes = args.extra, dict(QUICK if args.quick else FULL)
    world = get_world()
    if sizes["batch"] % world.size:
        sizes["batch"] = world.size * max(1, sizes["batch"] // world.size)
    quiet = open(os.devnull, "w") if world.rank else None  # only rank 0 prints
    rep = Report("ZeRO beside PEFT: model states per device, predicted and measured" +
                 (" (quick mode)" if args.quick else ""), stream=quiet)
    result: dict = {"world_size": world.size, "backend": world.backend, "kind": ex.kind, "optimizer": ex.optimizer,
                    "dropout": ex.dropout}

    rep.section("The paper's Fig. 1: Ψ = 7.5B, N_d = 64, mixed-precision Adam (K = 12)")
    fig1 = [(f"stage {s} {STAGE_NAMES[s]}", PAPER_FIG1["gb"][s],
             round(zero_model_states(PAPER_FIG1["psi"], PAPER_FIG1["n_d"], s)["total"] / 1e9, 2)) for s in STAGES]
    rep.compare(fig1, ("", "paper GB", "minipeft GB"))
    result["fig1_gb"] = {s: r[2] for s, r in zip(STAGES, fig1)}

    rep.section("Course cases: GB per device at N_d = 64 (model states; frozen weights partitioned at stage 3)")
    rep.table(course_rows(64), ("", "Ψ", *[f"stage {s}" for s in STAGES]))
    g3 = gpt2_param_count("gpt3-175b")
    need = {s: devices_needed(g3, s, 40e9) for s in STAGES}
    rep.text("  A100-40GB devices for GPT-3 175B full FT, states only: " +
             ", ".join(f"stage {s}: {need[s] if need[s] else 'never'}" for s in STAGES) +
             "  (course: 80, leaving room for activations)")
    result["gpt3_devices_40gb"] = need

    rep.section(f"Tiny GPT, {ex.kind}, {ex.optimizer}: {world.size} rank(s) ({world.backend or 'one process'}), "
                f"batch {sizes['batch']}, {sizes['steps']} steps")
    runs = {s: run_case(ex.kind, ex.optimizer, DataParallel(world, stage=s, bucket_bytes=BUCKET_BYTES), sizes,
                        args.seed, checkpoint_dir=ex.checkpoint_dir if s == 2 else None, dropout=ex.dropout,
                        device=args.device)
            for s in STAGES}
    keys = ("weights", "gradients", "optimizer_state")
    rows, per_rank = [], {}
    for s in STAGES:
        mine = [runs[s]["measured"][k] for k in keys] + [runs[s]["predicted"][k] for k in keys]
        everyone = np.asarray(world.sum_floats([float(v) for v in mine])).reshape(world.size, 2, 3)
        per_rank[s] = everyone.astype(int).tolist()
        for r in range(world.size):
            meas, pred = everyone[r]
            rows.append((f"stage {s} {STAGE_NAMES[s]}", r, *[f"{int(m):,} / {int(p):,}" for m, p in zip(meas, pred)],
                         "yes" if (meas == pred).all() else "NO"))
    rep.table(rows, ("", "rank", "weights meas/pred", "grads meas/pred", "optimizer meas/pred", "equal"))
    psi = runs[0]["trainable_params"]
    rep.text(f"  Ψ = {psi:,} trainable parameters (fp32: {4 * psi:,} bytes); activations saved for backward, peak "
             f"on this rank: {runs[0]['activations_peak']:,} bytes (its shard of {sizes['batch'] // world.size} rows)")
    traffic = [(f"stage {s} {STAGE_NAMES[s]}", f"{communication_bytes(psi, s, world.size, 4):,.0f}",
                *[f"{runs[s]['traffic_per_step'][k]:,.0f}" for k in ("all-reduce", "reduce", "broadcast")])
               for s in STAGES]
    rep.text("  bytes per step and rank: the paper's ring count, and the buffers this code hands to each collective")
    rep.table(traffic, ("", "paper (sent)", "all-reduce", "reduce", "broadcast"))
    rep.text("  (a ring all-reduce sends 2(N-1)/N of its buffer, a reduce or broadcast (N-1)/N; stage 3 here gathers the "
             "weights once a step and keeps them through backward, where the paper gathers them again: 3Ψ)")
    launches = {s: runs[s]["launches_per_step"] for s in STAGES}
    rep.text(f"  gradient buckets ({BUCKET_BYTES // 1024} KiB) per step, started during backward (as soon as their "
             "last gradient is ready, last layer first) / after it: " + "; ".join(
                 f"stage {s} {launches[s]['during backward']:g} / {launches[s]['after backward']:g}" for s in STAGES))
    result["traffic_per_step"] = {s: runs[s]["traffic_per_step"] for s in STAGES}
    result["bucket_launches_per_step"] = launches
    result["per_rank"] = per_rank
    result["memory_equal"] = all(all(np.array_equal(m, p) for m, p in v) for v in per_rank.values())

    rep.section("Losses: every stage against plain data parallelism and one process")
    same = {s: runs[s]["losses"] == runs[0]["losses"] and all(
        np.array_equal(runs[s]["weights"][n], runs[0]["weights"][n]) for n in runs[0]["weights"]) for s in STAGES}
    result["losses"] = runs[0]["losses"]
    result["stages_equal_dp"] = all(same.values())
    result["stages_max_rel_diff"] = max(float(np.max(np.abs(np.subtract(runs[s]["losses"], runs[0]["losses"]))
                                                     / np.abs(runs[0]["losses"]))) for s in STAGES)
    if world.rank == 0:
        alone = run_case(ex.kind, ex.optimizer, DataParallel(World(), stage=0, num_shards=world.size), sizes, args.seed,
                         dropout=ex.dropout, device=args.device)
        whole = run_case(ex.kind, ex.optimizer, False, sizes, args.seed, dropout=ex.dropout, device=args.device)
        result["one_process_losses"] = alone["losses"]
        result["equal_one_process"] = alone["losses"] == runs[0]["losses"]  # exact on the CPU (MPI)
        result["one_process_max_rel_diff"] = float(np.max(np.abs(np.subtract(alone["losses"], runs[0]["losses"]))
                                                          / np.abs(alone["losses"])))  # NCCL: within rounding
        result["whole_batch_max_rel_diff"] = float(np.max(np.abs(np.subtract(whole["losses"], runs[0]["losses"]))
                                                          / np.abs(whole["losses"])))
        rep.table([(f"step {i + 1}", f"{a:.9f}", f"{b:.9f}", f"{c:.9f}")
                   for i, (a, b, c) in enumerate(zip(runs[0]["losses"], alone["losses"], whole["losses"]))],
                  ("", f"DP, {world.size} rank(s)", f"1 process, {world.size} shards", "1 process, whole batch"))
        rep.text(f"  stages 1-3 equal DP bit for bit (losses and weights): {'yes' if result['stages_equal_dp'] else 'NO'}"
                 f"; DP equals one process over the same shards: {'yes' if result['equal_one_process'] else 'NO'}"
                 f"; whole batch in one forward: max relative difference {result['whole_batch_max_rel_diff']:.1e}"
                 + (" (with dropout it also draws other masks)" if ex.dropout else " (float32 rounding)"))
        rep.done()
        finish(result, args, lesson="zero")
    world.barrier()
    return result


if __name__ == "__main__":
    main()
