"""Memory arithmetic, activations: the bytes one training step saves for backward, op by op.

A GPT-2 language model's forward, mirrored op by op from ``minipeft.functional``: an op
saves arrays for backward only when one of its inputs needs a gradient, so what a step
keeps depends on what trains (full fine-tuning, LoRA's ranks, a prompt or prefix, a side
network). ``minipeft.memory.estimate_memory`` calls ``activation_bytes`` with the settings
of the method it models; the measured counterpart is the engine's ledger
(``minipeft.memory_measure``).
"""
from __future__ import annotations


def activation_bytes(B, T, n_layer, n_embd, n_head, n_inner, vocab, act_bytes, *, trainable_linears=(),
                     lora_ranks=None, lora_dropout=0.0, ln_trainable=False, embeddings_trainable=False,
                     n_prompt=0, n_prefix=0, side_width=0, side_inner=0, save_frozen_linear_inputs=False,
                     resid_pdrop=0.0, embd_pdrop=0.0, ledger_view=False, mask_bytes=1, index_bytes=8,
                     gradient_checkpointing=False, logits_16bit=False):
    """Bytes saved for backward by one training step of a GPT-2 LM, per term (summed over layers).

    Mirrors minipeft.functional: an op records (and saves) only when an input needs grad;
    Linear keeps x only when its weight is trained (dL/dx = g W needs W, not x);
    LayerNorm keeps x̂ (if input or weight needs grad) and rstd (if input does); GELU its
    input; Attention q, k, v and probs (B, H, T, Tk); Dropout a bool mask; Embedding its
    indices; CrossEntropy probs (N, V) + int64 targets + bool valid; adds save nothing.
    logits_16bit: a 16-bit ``amp.autocast`` step, whose LM head writes 16-bit logits: the loss keeps
    them (the head's GEMM output, rows of aligned(V) values) and a float32 log-sum-exp per row
    instead of probs (``minipeft.kernels.amp_cross_entropy``).
    A buffer kept by two ops counts once. lora_ranks: {block module: r} (linear_shapes names).
    side_width > 0: LST side network of that width; the backbone runs without a graph.
    ledger_view: skip arrays made outside the graph (the engine's ledger treats them as leaves).
    gradient_checkpointing: each block keeps only its input and is recomputed in backward
    (``minipeft.checkpointing``); the terms then sum to the step's peak (``checkpointed_peak``).
    """
    lora_ranks = dict(lora_ranks or {})
    Tq = T + n_prompt  # prompt tuning lengthens the sequence the model sees
    N = B * Tq  # positions
    terms: dict[str, int] = {}

    def add(key, nbytes):
        terms[key] = terms.get(key, 0) + int(nbytes)

    def keep(x_rg):  # may an input made without a graph be counted?
        return x_rg or not ledger_view

    def linear(name, d_in, x_rg, trained, loras):  # -> whether the output needs grad
        if (trained or (save_frozen_linear_inputs and x_rg)) and keep(x_rg):
            add(f"{name}: input x", N * d_in * act_bytes)  # needed for dL/dW = g^T x
        if loras:
            r_all = sum(loras)  # slices share one input (loralib MergedLinear)
            if lora_dropout > 0 and x_rg:
                add(f"{name}: lora dropout mask", N * d_in * mask_bytes)  # bool (B, T, d_in)
            if (lora_dropout > 0 and x_rg) or not trained:  # else the same buffer as above
                if keep(x_rg):
                    add(f"{name}: lora_A input", N * d_in * act_bytes)  # for dL/dA
            add(f"{name}: lora_B input", N * r_all * act_bytes)  # A x, for dL/dB
        return x_rg or trained or bool(loras)

    def layer_norm(name, C, x_rg, w_rg):
        if x_rg or w_rg:
            add(f"{name}: x_hat", N * C * act_bytes)  # (B, T, C), for dgamma and dx
        if x_rg:
            add(f"{name}: rstd", N * act_bytes)  # (B, T, 1)
        return x_rg or w_rg

    def block(p, C, F, Tk, g, trained, loras, ln_tr):  # one pre-LN block; -> stream needs grad
        lr = lambda m: [r for k, r in loras.items() if k == m or k.startswith(m + ".")]  # noqa: E731
        a = layer_norm(f"{p}ln_1", C, g, ln_tr)
        qkv = linear(f"{p}attn.c_attn", C, a, "attn.c_attn" in trained, lr("attn.c_attn"))
        if qkv or Tk > Tq:  # attention op recorded (prefix vectors are trained)
            if Tk == Tq:  # q, k, v are views of one fused c_attn output: one (B, T, 3C) buffer
                add(f"{p}attn: q, k, v", 3 * N * C * act_bytes)
            else:  # k, v are new concatenations (B, H, Tk, C/H); q still keeps the whole fused buffer
                add(f"{p}attn: k, v (with prefix)", 2 * B * Tk * C * act_bytes)
                if keep(qkv):
                    add(f"{p}attn: q (whole c_attn output)", 3 * N * C * act_bytes)
            add(f"{p}attn: probs", B * n_head * Tq * Tk * act_bytes)  # softmax (B, H, T, Tk)
        y = qkv or Tk > Tq
        y = linear(f"{p}attn.c_proj", C, y, "attn.c_proj" in trained, lr("attn.c_proj"))
        if resid_pdrop > 0 and y:
            add(f"{p}resid dropout masks", N * C * mask_bytes)  # bool (B, T, C), attention branch
        g = g or y  # residual add: saves nothing
        m = layer_norm(f"{p}ln_2", C, g, ln_tr)
        h = linear(f"{p}mlp.c_fc", C, m, "mlp.c_fc" in trained, lr("mlp.c_fc"))
        if h:
            add(f"{p}mlp: gelu input", N * F * act_bytes)  # (B, T, 4C)
        h = linear(f"{p}mlp.c_proj", F, h, "mlp.c_proj" in trained, lr("mlp.c_proj"))
        if resid_pdrop > 0 and h:
            add(f"{p}resid dropout masks", N * C * mask_bytes)  # bool (B, T, C), MLP branch
        return g or h

    C = n_embd
    if embeddings_trainable:
        add("wte: token indices", B * T * index_bytes)  # int64 (B, T), for the scatter-add
        add("wpe: position indices", Tq * index_bytes)  # int64 (T,)
    g = embeddings_trainable or n_prompt > 0  # the stream needs grad from the input on
    if embd_pdrop > 0 and g:
        add("embedding dropout mask", N * C * mask_bytes)  # bool (B, T, C)
    if side_width > 0:  # LST: backbone under no_grad saves nothing; side ladder below
        ds, all_lin = side_width, ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        if not ledger_view:
            add("side: down_i inputs (backbone states)", (n_layer + 1) * N * C * act_bytes)  # embeddings, b_1..b_L
        add("side: gate operands", 2 * n_layer * N * ds * act_bytes)  # s and down_i(b_i) in mu*s + (1-mu)*d
        for i in range(n_layer):
            block(f"side.{i}.", ds, side_inner, Tq, True, all_lin, {}, True)  # fully trained block, width d/rf
        add("side: up input", N * ds * act_bytes)  # up: d/rf -> d
        g = True
    else:
        block_input_needs_grad = []
        for i in range(n_layer):
            block_input_needs_grad.append(g)
            g = block(f"h.{i}.", C, n_inner, Tq + n_prefix, g, set(trainable_linears), lora_ranks, ln_trainable)
    layer_norm("ln_f", C, g, ln_trainable)
    if embeddings_trainable:
        add("lm_head: input", N * C * act_bytes)  # tied head: dL/dwte needs ln_f(x)
    if g or embeddings_trainable:  # logits need grad: the loss op is recorded
        if logits_16bit:  # the logits themselves: the head's (N, V8) output, which the loss reads as a view, unless
            # prompt tuning's token rows are not one view of it (B > 1): then the loss reads a copy (B*T, V)
            rows, cols = (N, -(-vocab // 8) * 8) if n_prompt == 0 or B == 1 else (B * T, vocab)  # V8: amp.aligned
            add("cross_entropy: 16-bit logits", rows * cols * act_bytes)
            add("cross_entropy: log-sum-exp", B * T * 4)  # float32 (B*T,)
        else:
            add("cross_entropy: probs", B * T * vocab * act_bytes)  # (B*T, V): real tokens only, no prompt
        add("cross_entropy: targets, valid", B * T * (index_bytes + 1))  # int64 + bool
    if gradient_checkpointing and side_width == 0:
        input_bytes = [N * C * act_bytes if keep(x_rg) else 0 for x_rg in block_input_needs_grad]
        return checkpointed_peak(terms, input_bytes)
    return terms


def checkpointed_peak(terms: dict, input_bytes: list) -> dict:
    """The saved-bytes peak of a step with gradient checkpointing, as terms that sum to it.

    ``terms``: what the plain step saves (``activation_bytes``), by name (``h.{i}.`` for
    block i; ``ln_f``, ``lm_head``, ``cross_entropy`` for the head; the rest before the
    blocks). ``input_bytes[i]``: what block i's checkpoint keeps (its input (B, T, C)).
    The forward keeps the embeddings' terms, every block's input and the head's terms;
    backward frees the head, then recomputes block L-1, L-2, ... one at a time, releasing
    each block's input after its backward. The peak is therefore

        before + max(sum(inputs) + head,  max_i(inputs[0..i] + block_i))

    (Chen et al. 2016, section 3: O(L) inputs plus one segment's activations).
    """
    L = len(input_bytes)
    is_head = lambda k: k.startswith(("ln_f", "lm_head", "cross_entropy"))  # noqa: E731
    in_block = [{k: v for k, v in terms.items() if k.startswith(f"h.{i}.")} for i in range(L)]
    before = {k: v for k, v in terms.items() if not is_head(k) and not any(k in b for b in in_block)}
    head = {k: v for k, v in terms.items() if is_head(k)}
    phases = [(sum(input_bytes) + sum(head.values()), L, head)]  # end of forward
    phases += [(sum(input_bytes[:i + 1]) + sum(in_block[i].values()), i + 1, in_block[i]) for i in range(L)]
    _, n_inputs, held = max(phases, key=lambda p: p[0])  # the first of equal peaks: the forward's end
    out = dict(before)
    out.update({f"h.{i}.input: kept by the checkpoint": input_bytes[i] for i in range(n_inputs) if input_bytes[i]})
    out.update(held)
    return out


__all__ = ["activation_bytes", "checkpointed_peak"]
