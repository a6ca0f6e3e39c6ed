"""Write the course notebooks ``notebooks/NN_<name>.ipynb`` from the cell lists below.

``python notebooks/build_notebooks.py`` rewrites them (outputs empty; CI executes them in
quick mode with nbclient). A notebook tells the story around ``minipeft.lessons.<name>``:
it shows the library's source with ``inspect`` instead of copying it, runs the lesson,
and looks at its numbers and figures. Notebooks define no library code.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """\
import os, inspect
from pathlib import Path
from IPython.display import Image, Markdown, display
QUICK = os.environ.get("MINIPEFT_QUICK", "0") == "1"   # CI sets this: seconds-long runs
FIGURES = Path(os.environ.get("MINIPEFT_FIGURES", "figures_nb"))
ARGS = (["--quick"] if QUICK else []) + ["--figures", str(FIGURES)]
def show_source(obj):
    display(Markdown("```python\\n" + inspect.getsource(obj) + "\\n```"))"""


def notebook(title: str, cells: list) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [new_markdown_cell(f"# {title}"), new_code_cell(SETUP)]
    for kind, text in cells:
        nb.cells.append(new_markdown_cell(text) if kind == "md" else new_code_cell(text))
    for i, cell in enumerate(nb.cells):  # stable ids: rebuilding an unchanged notebook changes nothing
        cell.id = f"cell-{i:02d}"
    return nb


def md(text: str):
    return ("md", text)


def code(text: str):
    return ("code", text)


NOTEBOOKS: dict[str, tuple[str, list]] = {}

NOTEBOOKS["01_pretraining"] = ("Lesson 1 — Pretraining the base model", [
    md("Every fine-tuning method in this course starts from a model that already learned "
       "something. minipeft downloads nothing: it trains its own base model, a GPT-2-shaped "
       "transformer, on the English text that ships with Python (docstrings and the pydoc "
       "topics), one byte per token."),
    md("The model is GPT-2's architecture with GPT-2's parameter names, so a PEFT method's "
       "`target_modules=['c_attn']` means the same thing here as in Hugging Face peft:"),
    code("from minipeft.gpt import GPT, GPTConfig\n"
         "model = GPT(GPTConfig.preset('T0'))\n"
         "[name for name, _ in model.named_parameters()][:8]"),
    md("Each op of the autograd engine keeps its forward next to its backward. Layer norm, "
       "for instance, saves exactly what its backward needs — and the engine counts those bytes:"),
    code("import minipeft.functional as F\nshow_source(F.LayerNorm)"),
    md("Training uses the one loop every lesson shares (progress bar, evaluation, checkpoints). "
       "Run the lesson: it trains the `tiny` model and compares its validation loss with a "
       "unigram model that knows only byte frequencies."),
    code("from minipeft.lessons import pretraining\nresult = pretraining.main(ARGS)"),
    code("print(f\"unigram baseline {result['unigram_val_loss']:.3f} nats/token, \"\n"
         "      f\"pretrained {result['val_loss']:.3f} nats/token\")\n"
         "display(Image(filename=str(FIGURES / 'pretraining_loss.png')))"),
    md("**Exercise.** Pretrain on a text file of your own: "
       "`python -m minipeft.pretrain --size tiny --corpus my_text.txt`. How far below the unigram "
       "baseline does it get, and how does the number of training bytes matter?"),
])


NOTEBOOKS["02_quantization"] = ("Lesson 2 — Quantization: absmax, blocks, NF4, bfloat16, LLM.int8()", [
    md("Quantization stores numbers in fewer bits: an index into a small table of values (a *code*) "
       "and a scale. This lesson builds every idea of the course from minipeft's own quantizers, "
       "which agree with bitsandbytes bit for bit, and measures each claim."),
    md("**Absmax and zero-point.** Absmax scales by the largest |x| into [-127, 127]; zero-point "
       "scales by the range and shifts, so skewed data (ReLU outputs) uses all 256 codes:"),
    code("from minipeft.quant import zeropoint_quantize\nshow_source(zeropoint_quantize)"),
    md("**Blocks.** One scale per block of 64 values keeps an outlier from ruining the precision of "
       "the whole tensor. `quantize_4bit` finds each block's absmax, scales by its reciprocal and "
       "picks the nearest code (NF4: quantiles of a normal distribution):"),
    code("from minipeft.quant import NF4, FP4, INT4, quantize_4bit\n"
         "print('NF4 ', NF4.round(4))\nprint('FP4 ', FP4.round(4))\nprint('Int4', INT4.round(4))\n"
         "show_source(quantize_4bit)"),
    md("**Double quantization** quantizes the float32 block scales again (8 bits, blocks of 256), "
       "which takes their cost from 0.5 to 0.127 bits per parameter:"),
    code("from minipeft.quant import bits_per_parameter\nshow_source(bits_per_parameter)"),
    md("**A quantized layer.** `Linear4bit` keeps only the packed codes and their `QuantState`. Its "
       "autograd Function dequantizes the weight in forward and *again* in backward, so it saves "
       "nothing for backward: QLoRA's memory goes to the adapters, not to a float copy of the base."),
    code("from minipeft.quant.modules import MatMul4bit, quantize_model\nshow_source(MatMul4bit)"),
    md("Run the lesson: each section prints the course's number next to minipeft's."),
    code("from minipeft.lessons import quantization\nresult = quantization.main(ARGS)"),
    code("c = result['codes_4bit']\n"
         "print(f\"mean |error| at block 64: NF4 {c['nf4']['abs']:.4f} (bnb 0.0728), \"\n"
         "      f\"FP4 {c['fp4']['abs']:.4f} (bnb 0.0965), Int4 {c['int4']['abs']:.4f}\")\n"
         "print(f\"scale overhead: {result['overhead']['plain']} -> {result['overhead']['double_quant']:.3f} \"\n"
         "      \"bits per parameter\")\n"
         "for name in ['quant_absmax_vs_zeropoint', 'quant_blockwise_outlier', 'quant_4bit_codes',\n"
         "             'quant_scale_overhead']:\n"
         "    display(Image(filename=str(FIGURES / f'{name}.png')))"),
    md("**bfloat16 vs float16.** Same 16 bits: bfloat16 keeps float32's 8 exponent bits (range), "
       "float16 keeps 10 fraction bits (precision). Values float16 cannot hold become inf or 0:"),
    code("display(Image(filename=str(FIGURES / 'quant_bf16_vs_fp16.png')))"),
    md("**LLM.int8().** In large models a few hidden dimensions hold huge values (outlier features). "
       "They stretch every row's int8 scale; the mixed-precision decomposition sends those columns "
       "through a float matmul and the rest through int8. minipeft's tiny model has no such features "
       "(they emerge at billions of parameters), so the lesson also plants them, without changing the "
       "model's function, to show what int8 does with them:"),
    code("from minipeft.quant import matmul_8bit\nshow_source(matmul_8bit)"),
    code("for name in ['quant_outlier_features', 'quant_llm_int8_errors', 'quant_tiny_model']:\n"
         "    display(Image(filename=str(FIGURES / f'{name}.png')))"),
    md("**Exercises.** (1) Change the outlier in section 2 from 40 to 400: which block sizes still "
       "keep the other values? (2) `quantize_model(model, quant_type='nf4', blocksize=4096)`: how much "
       "does the validation loss move, and how many bytes do you save? (3) Plant outliers with a "
       "larger gain (`_planted(..., s=100)`): when does LLM.int8() stop recovering the fp32 loss, "
       "and why do the int8-dequantized outlier *weights* matter then?"),
])


NOTEBOOKS["09_qlora"] = ("QLoRA — a 4-bit base, LoRA on every linear layer: what it learns, forgets and saves", [
    md("QLoRA (Dettmers et al. 2023) makes fine-tuning fit: the frozen base is stored in 4-bit "
       "NormalFloat with double quantization, LoRA adapters train on every linear layer, and "
       "optimizer state can be paged out. The course claims it matches 16-bit LoRA and full fine-tuning, "
       "and that PEFT forgets less of what the base knew. This notebook follows "
       "`python -m minipeft.lessons.qlora`."),
    md("The frozen 4-bit layer dequantizes its weight on the fly, in forward *and* in backward, "
       "so the dequantized weight is never kept for backward:"),
    code("from minipeft.quant import modules\nshow_source(modules.MatMul4bit)"),
    md("Before training anything: the course's memory arithmetic, each figure computed from its "
       "inputs by `minipeft.memory`, with the relation that must hold (≈ within a tolerance, or a bound):"),
    code("from minipeft.memory_course import format_course_figures\nprint(format_course_figures())"),
    md("A fair comparison gives each method its own learning rate: LoRA's update starts at zero and is "
       "scaled by alpha / r, so it usually wants a larger rate than full fine-tuning. Each method is trained "
       "at every rate of its grid; the Python validation text is cut in two halves, the first (the *stopping* "
       "slice) chooses the rate, and only the chosen run is scored on the second (the *reported* slice), which "
       "nothing was chosen on:"),
    code("from minipeft.lessons import qlora, side_tuning_sweep\n"
         "print('grids:', qlora.GRIDS)\n"
         "show_source(side_tuning_sweep.split_validation)\n"
         "show_source(qlora.choose)"),
    md("Now the lesson: full fine-tuning, LoRA and QLoRA adapt the English base model to Python code. "
       "Besides the Python loss (what each method learned) it measures the loss on the English validation "
       "text the base was pretrained on (what each method forgot). Then one real training step's memory by "
       "category beside the calculator's prediction, 8-bit and paged AdamW, and what merging a QLoRA adapter does."),
    code("result = qlora.main(ARGS)"),
    md("The sweep, one row per run; the chosen rate of each method has the lowest stopping-slice loss:"),
    code("for m, r in result['methods'].items():\n"
         "    for s in r['sweep']:\n"
         "        mark = '<- chosen' + (' (grid edge)' if s['at_grid_edge'] else '') if s['chosen'] else ''\n"
         "        print(f\"{m:6s} lr {s['lr']:<7g} stopping-slice loss {s['val_select']:.3f}  {mark}\")"),
    md("What each method learned (Python, reported slice) and forgot (English), from the base's losses:"),
    code("b, bs = result['base_val_loss'], result['base_source_val_loss']\n"
         "print(f\"{'base':6s} Python {b:.3f}          English {bs:.3f}\")\n"
         "for m, r in result['methods'].items():\n"
         "    print(f\"{m:6s} Python {r['val_loss']:.3f} ({r['val_loss'] - b:+.3f})  \"\n"
         "          f\"English {r['source_val_loss']:.3f} ({r['source_val_loss'] - bs:+.3f})  \"\n"
         "          f\"trainable {r['trainable']:>8,}  lr {r['lr']:g}\")\n"
         "display(Image(filename=str(FIGURES / 'qlora_loss.png')))"),
    md("The course's claims, judged from these numbers by the claims table's rules (`minipeft.claims`): "
       "the relation measured, the verdict, and a note with the numbers behind it:"),
    code("for c in result['claims']:\n"
         "    print(f\"{c['label']}: {c['relation']} -> {c['verdict'].upper()}\\n  rule: {c['rule']}\\n  {c['note']}\\n\")"),
    md("Memory of one training step, measured by category:"),
    code("for m, r in result['methods'].items():\n"
         "    print(f\"{m:6s} activations {r['measured']['activations']:>10,} B  \"\n"
         "          f\"frozen weights {r['measured']['weights_frozen']:>8,} B\")\n"
         "display(Image(filename=str(FIGURES / 'qlora_memory.png')))"),
    md("**Exercises.** (1) Rerun with `--device cuda` (the 'small' base, 600 steps per run): does LoRA close "
       "its gap to full fine-tuning, and does it still forget less? (2) If a chosen rate sits at the edge of "
       "its grid, extend `qlora.GRIDS` past it: does the verdict change? (3) Which memory category grows "
       "with the model, which with the batch? Where does QLoRA's saving come from at that size?"),
])


NOTEBOOKS["06_side_tuning"] = ("Lesson 6 — Side tuning: QST against QLoRA, and where the activations go", [
    md("LoRA and QLoRA train few parameters, so gradients and optimizer state shrink. But they "
       "still back-propagate through the whole base model, and backward needs the activations "
       "every layer saved. **Side tuning** trains a small network *beside* the frozen backbone: "
       "information flows from the base to the side network and never back, so the backbone runs "
       "without a graph and keeps nothing for backward. QST (Quantized Side Tuning) also stores the "
       "backbone in 4-bit NF4. This notebook follows `python -m minipeft.lessons.side_tuning`."),
    md("The whole method is one forward: the backbone under `no_grad`, returning every layer's "
       "hidden state, then the side network's graph alone:"),
    code("from minipeft.peft import side_tuning\n"
         "show_source(side_tuning.SideTuningMethod.forward)\n"
         "show_source(side_tuning.SideTuningMethod.side_logits)"),
    md("The side network: a downsample from every backbone layer, gated ladder connections "
       "`mu = sigmoid(gate / T)` that start at 0.5, GPT-2 blocks of width d/r, and an upsample back "
       "to d. QST's output mix `alpha * h_L + (1 - alpha) * side` starts at alpha = 1, so step 0 *is* "
       "the base model:"),
    code("show_source(side_tuning.SideNetwork.forward)"),
    code("import copy, numpy as np\n"
         "from minipeft.gpt import GPT, GPTConfig\n"
         "from minipeft.peft import QSTConfig, get_peft_model\n"
         "from minipeft.quant.modules import quantize_model\n"
         "base = GPT(GPTConfig.preset('T0')).eval()\n"
         "nf4 = copy.deepcopy(base); quantize_model(nf4)               # what QST does to the backbone\n"
         "qst = get_peft_model(copy.deepcopy(base), QSTConfig())\n"
         "idx = np.random.default_rng(0).integers(0, 256, (2, 16))\n"
         "print('QST at step 0 == the NF4 base:', np.array_equal(qst(idx).logits.data, nf4(idx).logits.data))\n"
         "qst.print_trainable_parameters()"),
    md("The backbone's hidden states are made without a graph, so the engine's ledger does not "
       "count them as saved activations; but a trainable downsample keeps its input for its weight "
       "gradient, so they still sit in memory. `held_leaf_bytes` walks the graph and measures them:"),
    code("from minipeft import engine\nfrom minipeft.peft import held_leaf_bytes\n"
         "s0 = engine.saved_bytes()\nloss = qst(idx, targets=idx).loss\n"
         "print(f'saved for backward (ledger): {engine.saved_bytes() - s0:,} B; '\n"
         "      f'backbone states held: {held_leaf_bytes(loss, qst):,} B')\nloss.backward()\n"
         "print('backbone parameters with a gradient:', "
         "sum(p.grad is not None for p in qst.get_base_model().parameters()))"),
    md("Now the lesson. QST is compared with QLoRA as the QST paper did, *at matched accuracy*, and both are "
       "tuned alike: QLoRA as its paper ran it (NF4 base, LoRA on every linear layer of the blocks) over a grid of "
       "learning rates; QST over a grid of side-network widths d/r and learning rates. The validation text is "
       "cut in two: one half chooses each learning rate, the other half, which nothing was chosen on, gives the "
       "reported loss. The selection protocol:"),
    code("from minipeft.lessons import side_tuning_sweep\n"
         "show_source(side_tuning_sweep.split_validation)\n"
         "show_source(side_tuning_sweep.run_sweep)"),
    code("from minipeft.lessons import side_tuning as lesson\nresult = lesson.main(ARGS)"),
    md("The sweep, one row per run; the chosen learning rate of each setting is the lowest loss on the stopping "
       "slice, and only that run is scored on the reported slice:"),
    code("for r in result['sweep']['rows']:\n"
         "    rep = f\"reported {r['val_report']:.3f}\" if r['chosen'] else ''\n"
         "    print(f\"{r['setting']:<9} lr {r['lr']:<7g} stopping {r['val_select']:.3f} \"\n"
         "          f\"{'<- chosen' if r['chosen'] else '':<10}{rep}\")"),
    md("At matched accuracy: the least-memory QST whose reported loss is within the tolerance of QLoRA's (or the "
       "best QST and its gap), memory of one training step measured beside the calculator's prediction. The "
       "verdict is computed from these numbers by the rule printed with it:"),
    code("m, q = result['matched_accuracy'], result['qlora']\n"
         "def row(name, e):\n"
         "    gap = e['val_report'] - q['val_report']\n"
         "    print(f\"{name:<9} lr {e['lr']:<7g} loss {e['val_report']:.3f} ({gap:+.3f})  \"\n"
         "          f\"{e['memory']['total'] / 1e6:.3f} MB measured, {e['predicted']['total'] / 1e6:.3f} predicted\")\n"
         "row('QLoRA', q)\n"
         "for r, e in result['qst']['by_reduction_factor'].items():\n"
         "    row(f'QST r={r}', e)\n"
         "print(f\"\\n{m['verdict']}: {m['sentence']}\")\n"
         "print(f\"course: {result['course']['avg_memory_ratio']:.2f}x less memory for \"\n"
         "      f\"{result['course']['avg_accuracy_gap']:+.1f} MMLU points (QST paper, Table 2)\")"),
    md("Where the memory goes as the batch and the sequence grow (QST at the paper's r = 16), and the loss "
       "curves of the chosen QLoRA and QST runs on the stopping slice:"),
    code("q = result['qst_vs_qlora']\n"
         "print(f\"at batch {q['batch']}: QLoRA/QST activations {q['activation_ratio']:.2f}x, total \"\n"
         "      f\"{q['total_ratio']:.2f}x (course: {result['course']['avg_memory_ratio']:.2f}x)\")\n"
         "display(Image(filename=str(FIGURES / 'side_tuning_memory.png')))"),
    md("**Exercises.** (1) At this tiny width the side network's attention probabilities "
       "(heads x T per position, independent of the width) and the loss's softmax dominate its "
       "activations: rerun with `QSTConfig(side_num_heads=1)` and see what changes. (2) Try "
       "`downsample='avgpool'`: no downsample weights, so which backbone states are still held? "
       "(3) On a GPU, `--device cuda` (the 'small' base, d = 128, 512 positions) or `--size medium`: "
       "at which width does QST match QLoRA now, and what is the memory ratio?"),
])


NOTEBOOKS["04_peft_methods"] = ("Lesson 4 — Every PEFT method on one task, and when adapters beat full fine-tuning", [
    md("The course sorts PEFT methods into families (Lialin et al. 2023): **selective** methods "
       "train a subset of the base's own weights (BitFit, the top blocks), **reparameterization** "
       "methods train a low-rank or structured update of the weights (LoRA, rsLoRA, DoRA, LoHa, "
       "LoKr, VeRA), and **additive** methods add new modules or inputs (Houlsby and Pfeiffer "
       "adapters, (IA)³, prefix and prompt tuning). This notebook follows "
       "`python -m minipeft.lessons.peft_methods`: every method adapts the same English base model "
       "to Python code, with the same budget, through one API."),
    md("Each method is one config for `get_peft_model`; these are the ones the lesson uses:"),
    code("from minipeft.lessons import peft_methods\nshow_source(peft_methods.method_config)"),
    md("Applied to the tiny base, each trains a very different number of parameters "
       "(peft's own `print_trainable_parameters` format):"),
    code("from minipeft import pretrained\n"
         "base = pretrained.load('tiny', 'english', quick=QUICK, progress=False)\n"
         "for name in peft_methods.METHODS:\n"
         "    print(f'{name:9s}', end=' ')\n"
         "    peft_methods.build(name, base).print_trainable_parameters()"),
    md("Prefix tuning trains its prefix through a small MLP (Li & Liang §4.3: optimizing the prefix "
       "directly is unstable) and then keeps only the prefix the MLP computes:"),
    code("from minipeft.peft import prefix_tuning\nshow_source(prefix_tuning.remove_reparameterization)"),
    md("Memory is measured on one real training step, by category: the weights, the gradients, "
       "AdamW's two moments, and the activations the engine saved for backward:"),
    code("from minipeft import memory_measure\nshow_source(memory_measure.measure_training_step)"),
    md("Now the lesson. Part 1 trains every method with the same steps and batches, each at its own "
       "peak learning rate (`peft_methods.LR`), and checks that each one lowers the base's loss. Part 2 "
       "compares Houlsby adapters with full fine-tuning as the training set shrinks and across "
       "learning rates; part 3 compares prompt tuning with full fine-tuning on bases of two sizes."),
    code("result = peft_methods.main(ARGS)"),
    code("base = result['base_val_loss']\n"
         "for name, r in sorted(result['methods'].items(), key=lambda kv: kv[1]['val_loss']):\n"
         "    print(f\"{r['label']:20s} {r['trainable']:>8,} trainable  val {r['val_loss']:.3f} \"\n"
         "          f\"({r['val_loss'] - base:+.3f})  {r['ms_per_step']:5.0f} ms/step  \"\n"
         "          f\"activations {r['memory']['activations'] / 1e3:7.0f} kB\")\n"
         "print('did not lower the base loss:', result['not_lowered'] or 'none')\n"
         "display(Image(filename=str(FIGURES / 'peft_methods.png')))"),
    md("Loss against trainable parameters is not a straight line: methods with a thousand parameters "
       "can beat methods with ten thousand, and the memory panel shows why few trainable parameters "
       "do not mean little memory: every method except full fine-tuning keeps activations for "
       "backward through the frozen model, and at this size they dominate."),
    code("display(Image(filename=str(FIGURES / 'peft_methods_adapters.png')))\n"
         "print(result['adapters_vs_full']['sensitivity'])"),
    code("for r in result['scale']:\n"
         "    print(f\"{r['size']:6s} N={r['params']:>9,}  prompt - full = {r['gap']:+.3f} nats, \"\n"
         "          f\"prompt tuning recovers {100 * r['recovered']:.0f}% of full FT's gain\")\n"
         "display(Image(filename=str(FIGURES / 'peft_methods_scale.png')))"),
    md("**Exercises.** (1) The learning rates in `peft_methods.LR` were picked by a small sweep: "
       "rerun with `--lr prompt=0.3` (the prompt-tuning paper's constant LR) or `--lr vera=3e-2` and "
       "see how far each method moves. (2) Give LoRA a rank of 1 and Houlsby a bottleneck of 2: which "
       "loses more? (3) On a GPU, `--device cuda` adds a third, larger base to part 3: does prompt "
       "tuning's share of full fine-tuning's gain keep growing?"),
])


NOTEBOOKS["08_serving"] = ("Lesson 8 — One base model, many adapters: serving LoRA in mixed batches", [
    md("A LoRA adapter is a few megabytes next to a base model of gigabytes. The course's point: fine-tune "
       "many adapters on one base model and, at inference, use the $A, B$ of each task with the shared "
       "base weights — *much cheaper than serving $n$ full fine-tuned models*. LoRAX, Punica and S-LoRA "
       "serve hundreds to thousands of adapters on one GPU this way. The trick: in a batch where every "
       "request names its own adapter, the base GEMM $xW_0^T$ is still one GEMM for the whole batch; only "
       "the small LoRA part is gathered per row."),
    md("**BGMV** (batched gather matrix-vector, for decoding: one token per request) gathers each row's "
       "$A_i, B_i$ and adds $s_i (x A_i^T) B_i^T$. **SGMV** (segmented, for the prefill) sorts the batch "
       "by adapter so each adapter's rows are contiguous and runs one small GEMM pair per segment. Ranks "
       "differ between adapters, so every adapter is padded with zeros to a common rank $r_{max}$: zero "
       "rows of $A$ and zero columns of $B$ change nothing. The NumPy twins:"),
    code("from minipeft import serve\nshow_source(serve.bgmv_reference)\nshow_source(serve.sgmv_reference)"),
    md("On a GPU the same two operations are CUDA RawKernels (`minipeft/kernels/bgmv.cu`): BGMV fuses "
       "shrink and expand in one block per row; SGMV reads a tile of an adapter's weights into shared "
       "memory once for up to 32 rows. `tests/kernels/test_bgmv.py` checks them against the twins."),
    code("from minipeft.kernels import bgmv\nshow_source(bgmv.bgmv_cuda)"),
    md("The server wraps every served Linear in a `MultiLoraLinear`: base output first, then BGMV or SGMV "
       "with the slot of each row:"),
    code("show_source(serve.MultiLoraLinear.forward)"),
    md("Adapters live in *slots* on the device, as many as a memory budget allows; the rest wait in host "
       "memory (S-LoRA's design). A batch that needs an adapter not on the device evicts the least "
       "recently used one. Requests naming an unknown adapter, or an adapter made for another base, get "
       "their own error; the rest of the batch runs."),
    code("show_source(serve.LoraServer._make_resident)"),
    md("The same mixed batch exists inside the model, as peft has it: `peft_model(idx, adapter_names=[...])` "
       "and `peft_model.generate(..., adapter_names=[...])` run row $m$ with adapter `adapter_names[m]` "
       "(`'__base__'`: the base alone). Each LoRA layer runs its base once, then adds each adapter's "
       "$s_i B_i A_i x$ to that adapter's rows. Unknown names, merged layers, DoRA and training mode are "
       "errors, as in peft; the server gives the same logits (`tests/peft/test_mixed_batch.py`)."),
    code("from minipeft.peft import mixed_batch\nshow_source(mixed_batch.mixed_batch_forward)"),
    md("Requests do not arrive together. *Continuous batching* (Orca's iteration-level scheduling, used by "
       "S-LoRA and LoRAX) lets a request join the running batch at the next decode step — its prompt is "
       "prefilled and its key/value cache appended, left-padded, to the batch's — and leave as soon as it "
       "is done. Adapters of different ranks sit in *rank classes* (stacks of rank 4, 8, 16 ...), so an "
       "adapter costs its own rank, not the largest. Each request samples with its own settings and its "
       "own random stream, so it gets exactly the tokens `generate` gives it alone:"),
    code("from minipeft import serve_scheduler\nfrom minipeft.decoding import Session\n"
         "show_source(Session.join)\nshow_source(serve_scheduler.choose_tokens)"),
    md("Run the lesson. It checks that each request of a mixed batch gets exactly the tokens of its "
       "adapter merged into the base and decoded alone, then measures throughput and latency as the "
       "number of adapters $N$ grows, against (a) the base alone, (b) one merged model per adapter served "
       "one at a time, (c) a loop over adapters in sub-batches (peft's mixed-batch path):"),
    code("from minipeft.lessons import serving\nresult = serving.main(ARGS)"),
    code("for n, r in zip(result['ns'], result['ratio_mixed_vs_base']):\n"
         "    print(f'N = {n:4d}: mixed batch decodes at {r:.2f}x the base model alone')\n"
         "display(Image(filename=str(FIGURES / 'serving_throughput.png')))"),
    md("Requests arriving as a Poisson process: continuous batching against static batching (take what "
       "has arrived, run it until its longest request ends), throughput and latency against the rate:"),
    code("c = result['continuous']\n"
         "print(f\"{c['check']['identical']}/{c['check']['total']} requests identical to generate alone \"\n"
         "      f\"(shuffled arrivals, {c['check']['sampled']} sampled)\")\n"
         "display(Image(filename=str(FIGURES / 'serving_arrivals.png')))"),
    md("Memory: the base once plus $N$ adapters, against $N$ merged copies of the model:"),
    code("m = result['memory']\n"
         "print(f\"one adapter: {m['adapter_bytes'] / 2**20:.2f} MiB, the base: {m['base_fp32'] / 2**20:.2f} MiB \"\n"
         "      f\"(NF4: {m['base_nf4'] / 2**20:.2f} MiB)\")\n"
         "display(Image(filename=str(FIGURES / 'serving_memory.png')))"),
    md("**Exercises.** (1) Run `python -m minipeft.lessons.serving --device cuda --base gpt2 --ns 1,10,100 "
       "--batch 128` on a GPU: where does the mixed batch stand against the base alone, and why does "
       "(b) fall behind as $N$ grows? (2) Build a server with `ServeConfig(max_rank=64)`: how many slots "
       "does the same budget hold, and what does padding every adapter to rank 64 cost in memory and "
       "time? (3) Send Zipf-distributed traffic through a pool with 4 slots (section 4 of the lesson): "
       "how does the hit rate change with the Zipf exponent? (4) Rerun section 5 with a larger "
       "`max_batch_size`: at which arrival rate does static batching's latency take off, and why does "
       "continuous batching hold out longer?"),
])

NOTEBOOKS["07_transfer"] = ("Lesson 7 — Scaling laws for transfer: what pretraining on English is worth in Python", [
    md("Why fine-tune at all? Hernandez et al. (2021), *Scaling Laws for Transfer*, put a number on "
       "it: the **effective data transferred** $D_T$ — how many *more* bytes of Python a model "
       "trained from scratch would need to match a model of the same size pretrained on English "
       "and fine-tuned on $D_F$ bytes. In the low-data regime it is a power law in the "
       "fine-tuning data and the non-embedding parameters $N$:\n\n"
       "$$D_T = k\\,(D_F)^{\\alpha}\\,(N)^{\\beta},$$\n\n"
       "with $k = 1.9\\times10^4$, $\\alpha = 0.18$, $\\beta = 0.38$ for text → Python in the paper. "
       "This notebook follows `python -m minipeft.lessons.transfer`, which measures all three on "
       "models minipeft trains itself."),
    md("$D_T$ is read off a curve: train from scratch on Python sets of many sizes $D$ (each run "
       "stopped early at its best validation loss), then ask where that loss-versus-data curve "
       "reaches the fine-tuned model's loss. minipeft makes the curve monotone, interpolates "
       "$\\log L$ linearly in $\\log D$ and flags losses outside the curve's range:"),
    code("from minipeft.lessons import transfer_fits, transfer_runs\nshow_source(transfer_fits.data_for_loss)"),
    md("On a made-up scratch curve $L(D) = (10^8/D)^{0.3}$, a fine-tuned model that reaches the "
       "loss of $10^5$ bytes with only $10^3$ has $D_T = 99{,}000$ — a multiplier of 100:"),
    code("curve = {D: (1e8 / D) ** 0.3 for D in (1e3, 1e4, 1e5, 1e6)}\n"
         "transfer_fits.effective_data_transferred(curve, {1e3: (1e8 / 1e5) ** 0.3})"),
    md("The fit is least squares of $\\log D_T = \\log k + \\alpha\\log D_F + \\beta\\log N$ "
       "(scipy's `curve_fit`), with standard errors from its covariance:"),
    code("show_source(transfer_fits.fit_transfer)"),
    md("The grids. Small models cost little per step, so they get more steps: every run of a grid "
       "gets roughly the same compute. `--quick` is for CI; the default is the CPU grid (about ten "
       "minutes on 2 cores); `--device cuda` runs the GPU grid, up to T2 (4.7M parameters) and "
       "the whole 7 MB of Python. Every run is cached on disk, so running again redoes nothing."),
    code("for name, g in transfer_runs.GRIDS.items():\n"
         "    Ns = [transfer_runs.non_embedding_params(s) for s in g.sizes]\n"
         "    print(f\"{name:5s} sizes {', '.join(g.sizes)} (N {min(Ns):,}..{max(Ns):,}); \"\n"
         "          f\"scratch D {min(g.scratch_D):,}..{max(g.scratch_D):,}; D_F {min(g.finetune_D):,}..\"\n"
         "          f\"{max(g.finetune_D):,}; steps per size {g.steps or g.config.max_steps}\")"),
    md("Run the lesson. For each size it pretrains two bases — on English, and on English mixed "
       "50/50 with C headers (code, but not Python) — then trains from scratch and fine-tunes."),
    code("from minipeft.lessons import transfer as lesson\nresult = lesson.main(ARGS)"),
    code("for src, f in result['fits'].items():\n"
         "    p = f['paper']\n"
         "    print(f\"{src:9s} minipeft: k {f['k']:.3g}, alpha {f['alpha']:.3f} ± {f['alpha_err']:.3f}, \"\n"
         "          f\"beta {f['beta']:.3f} ± {f['beta_err']:.3f}   paper: k {p['k']:.2g}, alpha {p['alpha']}, \"\n"
         "          f\"beta {p['beta']}\")\n"
         "display(Image(filename=str(FIGURES / 'transfer_loss_vs_data.png')))"),
    md("Each panel is one model size. The fine-tuned models start ahead; the red arrow is $D_T$ "
       "at the smallest $D_F$: the extra data the scratch model needs to reach the same loss. "
       "Next, $D_T$ against $D_F$ with the fitted lines (filled markers were fitted; open "
       "triangles are lower bounds, where the fine-tuned model beat every scratch run):"),
    code("display(Image(filename=str(FIGURES / 'transfer_dt_vs_df.png')))\n"
         "display(Image(filename=str(FIGURES / 'transfer_multiplier.png')))"),
    md("The effective data multiplier $(D_F + D_T)/D_F \\approx k N^{\\beta} / D_F^{1-\\alpha}$ falls "
       "as $D_F$ grows: pretraining matters most when fine-tuning data is scarce. The lesson also "
       "checks **ossification** (does a small pretrained model end *worse* than scratch at the "
       "largest $D_F$?) and whether the source closer to Python transfers more at low data:"),
    code("for o in result['ossification']:\n"
         "    print(o)\n"
         "for k, v in result['targets'].items():\n"
         "    print(('yes ' if v else 'NO  ') + k)"),
    md("**What differs from the paper, and why.** Tokens are bytes (a 259-symbol vocabulary, so no "
       "tokenizer favours English or code), so losses are nats per byte and $D$ counts bytes. The "
       "models are tiny (N from 888 to 4.7M against the paper's millions to billions) and so is the "
       "data: under 2 MB of English and 7 MB of Python against the paper's 24B and 22B characters. "
       "Every run has a step cap, so at large $D$ the scratch models run out of compute before data "
       "and their curve flattens; there a fine-tuned model often beats every scratch run and gets "
       "only a lower bound. The \"English\" is the docstrings of the very library whose code is "
       "the target, far closer to Python than the paper's web text: the bases predict Python well "
       "before any fine-tuning, and at the smallest $D_F$ fine-tuning adds little to that zero-shot "
       "transfer, so $D_T$ is nearly flat there and $\\alpha$ comes out near zero on small grids "
       "(the paper's law has no zero-shot term). For the same reason English + C, with half as much "
       "of that English, need not beat English alone. The fit is one least-squares fit on the "
       "low-data points, not the paper's fit of the logit of $D_T/D_E$. Compare signs, orders of "
       "magnitude and the shape of the curves, not the paper's digits."),
    md("**The full grid on a GPU.** `--device cuda` runs the `gpu` grid (N 12.8K..4.7M, 80 runs; "
       "`--jobs 8` shares them among worker processes). The repository keeps the data of one such "
       "run on an H100, behind the figures in `figures/`; its fits and checks, read from that file:"),
    code("import json, minipeft\n"
         "saved = Path(minipeft.__file__).resolve().parents[1] / 'figures' / 'transfer_data.json'\n"
         "if saved.is_file():\n"
         "    gpu = json.loads(saved.read_text())\n"
         "    print(gpu['command'], '|', gpu['device'], gpu['date'])\n"
         "    for src, f in gpu['analysis']['fits'].items():\n"
         "        print(f\"{src:9s} alpha {f['alpha']:.3f} ± {f['alpha_err']:.3f}, beta {f['beta']:.3f} ± \"\n"
         "              f\"{f['beta_err']:.3f} (paper {f['paper']['alpha']}, {f['paper']['beta']})\")\n"
         "    for k, v in gpu['targets'].items():\n"
         "        print(('yes ' if v else 'NO  ') + k)\n"
         "else:\n"
         "    print('no saved GPU run here (minipeft installed without its repository)')"),
    md("On that run both fits give $\\alpha$ and $\\beta$ positive and of the paper's order, "
       "$\\alpha$ smaller than the paper's (the large zero-shot transfer of this close source), the "
       "multiplier falling with $D_F$ and rising with $N$, and the smallest model ossifying when fine-tuned "
       "from English + C. English + "
       "C beats English alone only for the largest model."),
    md("**Exercises.** (1) `transfer_fits.analyze(results, low_data_fraction=1.0)` fits every in-range point: "
       "how do $\\alpha$ and $\\beta$ move once the high-data points come in? (2) Raise a size's "
       "step cap in a grid of your own (`dataclasses.replace(transfer_runs.GRIDS['cpu'], steps=...)`): where "
       "does the scratch curve stop flattening, and what happens to the lower bounds? (3) Compare "
       "the zero-shot Python loss of the two bases in the report: which source is closer to "
       "Python, and how does that show in $k$ and $\\alpha$?"),
])


NOTEBOOKS["03_lora"] = ("Lesson 3 — LoRA: what it trains, which rank suffices, and why merging is free", [
    md("LoRA (Hu et al. 2021) freezes a pretrained weight $W_0 \\in \\mathbb{R}^{d \\times k}$ and learns its "
       "update as the product of two thin matrices: $h = W_0 x + \\frac{\\alpha}{r} B A x$ with "
       "$B \\in \\mathbb{R}^{d \\times r}$ zero and $A \\in \\mathbb{R}^{r \\times k}$ random at the start, so "
       "training starts from the base model. This notebook follows `python -m minipeft.lessons.lora`, "
       "which adapts minipeft's tiny English base model to Python code."),
    md("The LoRA layer adds a scaled low-rank branch to the frozen layer's output; "
       "`get_delta_weight` is the weight change that branch stands for:"),
    code("from minipeft.peft import LoraLayer\n"
         "show_source(LoraLayer.adapter_forward)\n"
         "show_source(LoraLayer.get_delta_weight)"),
    md("**What LoRA trains.** A $d \\times k$ weight has $dk$ entries; LoRA trains $r(d + k)$. "
       "The course's example (a $512 \\times 64$ weight with $r = 8$), counted on a real `LoraLayer`:"),
    code("from minipeft.lessons import lora\n"
         "ex = lora.course_example(d=512, k=64, r=8)\n"
         "print(f\"W: {ex['full']:,}  A: {ex['A']:,}  B: {ex['B']:,}  -> {100 * ex['reduction']:.1f}% fewer\")"),
    md("**Merging.** $W = W_0 + \\frac{\\alpha}{r} B A$ is an ordinary weight. After `merge_and_unload()` "
       "the model is a plain GPT that runs exactly the base model's operations:"),
    code("from minipeft.peft.layer import BaseTunerLayer\nshow_source(BaseTunerLayer.merge)"),
    md("Now the lesson. It prints the parameter counts, sweeps the rank next to full fine-tuning, "
       "times forward passes, and looks at the singular values of the full fine-tuning update."),
    code("result = lora.main(ARGS)"),
    md("**The rank sweep.** On the left, validation loss against $r$, with full fine-tuning and the "
       "untrained base as lines. On the right, the shape of the curve (the loss above the sweep's best) "
       "beside the paper's GPT-2 M on E2E. In the paper the curve is flat by $r = 16$. Does it flatten "
       "here, where $r = 32$ is already half of each matrix's full rank?"),
    code("for r in result['ranks']:\n"
         "    v = result['rank_sweep'][str(r)]\n"
         "    print(f\"r={r:3d}  trainable {v['trainable']:>7,}  val loss {v['val_loss']:.3f}\")\n"
         "print(f\"full fine-tuning {result['full_ft']['val_loss']:.3f}, base {result['base_val_loss']:.3f}\")\n"
         "display(Image(filename=str(FIGURES / 'lora_rank_sweep.png')))"),
    md("**Latency.** The merged model takes as long as the base. Unmerged, every adapted layer runs "
       "two extra thin matmuls, and a bottleneck adapter adds layers in sequence. Both cost the most, "
       "relative to the work, at batch size 1:"),
    code("display(Image(filename=str(FIGURES / 'lora_latency.png')))"),
    md("**Why can a low rank be enough?** Take the update that *full* fine-tuning makes, "
       "$\\Delta W = W_{ft} - W_0$, and look at its singular values. Compare them with a random matrix "
       "of the same shape and norm: how much of $\\|\\Delta W\\|_F^2$ do the top $r$ directions hold? "
       "The paper's subspace similarity "
       "$\\phi(i, j) = \\|U_1^{(i)\\top} U_2^{(j)}\\|_F^2 / \\min(i, j)$ then asks whether LoRA's "
       "$\\Delta W = \\frac{\\alpha}{r} B A$ points along the same directions as the full update:"),
    code("show_source(lora.subspace_similarity)\n"
         "display(Image(filename=str(FIGURES / 'lora_spectra.png')))"),
    md("**Exercises.** (1) Adapt attention only, as the paper does: set "
       "`lora.TARGETS = ('attn.c_attn',)` and rerun. Does a small $r$ suffice more often there? "
       "(2) Set `lora.LR['lora'] = 3e-3` and rerun. Which ranks lose the most? With "
       "$\\alpha = 2r$, how does the size of the update depend on $r$? (3) Time the models at batch 64 "
       "with `lora.time_forward`. What happens to the unmerged layer's overhead, and why?"),
])


NOTEBOOKS["05_e2e"] = ("Lesson 5 — E2E table-to-text: six ways to fine-tune, scored as the challenge scores them", [
    md("The course's table compares full fine-tuning, fine-tuning the top two blocks, adapters, prefix tuning "
       "and LoRA on GPT-2 Medium and the E2E NLG data: a meaning representation (MR) such as "
       "`name[The Eagle], eatType[pub], area[riverside]` goes in, a sentence about the restaurant comes out. "
       "This notebook follows `python -m minipeft.lessons.e2e`, which runs them all from one pretrained base, "
       "with LoRA twice: on $W_q, W_v$ only (the paper) and on every linear layer (QLoRA's placement)."),
    md("**A base that covers the task.** Prompt and text take up to ~550 bytes, so the base is pretrained "
       "with 512 positions (`tiny-512` here, `medium` on a GPU). An earlier version stretched a 256-position "
       "table by copying rows and kept it frozen: every frozen-base method then broke down at byte 256. "
       "One table names every base and its context:"),
    code("from minipeft import sizes\n"
         "for name, b in sizes.BASES.items():\n"
         "    print(f\"{name:<9} shape {b.shape:<7} positions {b.block_size:>5}  pretrained on {b.tokens:>11,} \"\n"
         "          f\"tokens ({b.device})\")"),
    md("**The data.** Without a file the lesson uses a synthetic set with the E2E attributes and varied "
       "phrasings; `--data ../shared/data/e2e/devset.csv` uses the real dev set. Either way the split is by "
       "MR, so no MR is seen in training and in testing. Each example is written as microsoft/LoRA writes it, "
       "and the loss covers the text only:"),
    code("from minipeft.data.e2e import synthetic_e2e, format_prompt\n"
         "data = synthetic_e2e(3, seed=0)\n"
         "for mr, refs in zip(data.mrs, data.refs):\n"
         "    print(format_prompt(mr) + refs[0])"),
    md("**Decoding.** Beam search keeps the $K$ best partial outputs by summed log-probability; a finished "
       "output is ranked by $\\log P(Y) / |Y|^{\\alpha}$ (the length penalty). The key/value cache is computed "
       "once for the prompts and then *indexed* by the beam each survivor came from:"),
    code("from minipeft import decoding\nshow_source(decoding.beam_search)"),
    md("Greedy decoding is beam search with $K = 1$. Beam search can find outputs greedy decoding misses: "
       "a first token that looks worse may lead to a much better continuation. On the same model, the beam's "
       "outputs never score lower than greedy's:"),
    code("import numpy as np\n"
         "from minipeft.gpt import GPT, GPTConfig\n"
         "m = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=12), seed=3)\n"
         "x = np.random.default_rng(3).integers(1, 12, (4, 5))\n"
         "g = decoding.greedy_search(m, x, 6, eos_token_id=0)[:, 5:]\n"
         "beams, scores = decoding.beam_search(m, x, 4, 6, eos_token_id=0, length_penalty=0.0, return_scores=True)\n"
         "for row, gr, b, s in zip(x, g, beams, scores):\n"
         "    cut = list(gr[:list(gr).index(0) + 1]) if 0 in gr else list(gr)\n"
         "    print(f\"greedy {decoding.sequence_log_prob(m, row, cut):7.3f}   beam {s:7.3f}\")"),
    md("**The metrics** are those of the E2E challenge's scorer: BLEU and NIST on mteval's tokenization, "
       "ROUGE-L ($\\beta = 1.2$) and CIDEr-D on the COCO tokenization:"),
    code("from minipeft import metrics\nshow_source(metrics.e2e_scores)"),
    md("**LoRA on slices of one layer.** GPT-2 computes $q, k, v$ with one fused layer `c_attn`. The paper "
       "adapts $W_q$ and $W_v$ only, so the update must touch two of its three row blocks: "
       "$\\Delta W = \\frac{\\alpha}{r}[B_q A_q;\\ 0;\\ B_v A_v]$ (loralib's `enable_lora`):"),
    code("from minipeft.peft import lora_slices\nshow_source(lora_slices.sliced_lora_forward)"),
    md("Now the lesson. Every method uses the papers' recipe (label smoothing 0.1, LoRA dropout 0.1, "
       "alpha 32, beam 10, length penalty 0.9), and its learning rate is chosen on the validation MRs; "
       "the test MRs are decoded and reported. Then LoRA on every linear layer is trained at ranks 1 to 64. "
       "On a laptop the base is tiny and the budget short, so compare the *ranking* with the course's, not "
       "the absolute numbers; the report says which verdicts the numbers support."),
    code("from minipeft.lessons import e2e\nresult = e2e.main(ARGS)"),
    code("for k, r in result['methods'].items():\n"
         "    print(f\"{r['label']:<22} {r['trainable']:>8,} params  BLEU {100 * r['BLEU']:6.2f}  \"\n"
         "          f\"ROUGE-L {100 * r['ROUGE_L']:6.2f}  CIDEr {r['CIDEr']:.3f}\")\n"
         "display(Image(filename=str(FIGURES / 'e2e_methods.png')))"),
    md("**Training curves.** Which methods are still improving when the budget ends?"),
    code("display(Image(filename=str(FIGURES / 'e2e_train_loss.png')))"),
    md("**The LoRA rank.** In the course, validation loss stops improving near $r = 16$ and BLEU peaks at "
       "$r = 4$. Here $\\alpha$ is fixed at 32, so the update's scale $\\alpha / r$ shrinks as $r$ grows:"),
    code("print(result['relations'])"),
    code("display(Image(filename=str(FIGURES / 'e2e_lora_rank.png')))"),
    md("**Score any model on any E2E file.** With `--save DIR` the lesson writes the base, every adapter and "
       "the test MRs; the evaluation command decodes every MR of a CSV and prints the metric table:\n\n"
       "```\npython -m minipeft.lessons.e2e --save runs/e2e\n"
       "python -m minipeft.lessons.e2e_eval --adapter runs/e2e/lora_all_lr0.01 --data runs/e2e/test.csv --beam 10\n"
       "python -m minipeft.lessons.e2e_eval --adapter runs/e2e/lora_all_lr0.01 --data ../shared/data/e2e/devset.csv\n```"),
    md("**Exercises.** (1) Rerun with `--data ../shared/data/e2e/devset.csv`: do the real references rank the "
       "methods the same way? (2) Evaluate one adapter with `--beam 1`, `--beam 5` and `--beam 10`: how much "
       "does the beam add, and at what cost in time? (3) Set the length penalty to 0 and to 2: what happens to "
       "the outputs' length and to BLEU's brevity penalty?"),
])


NOTEBOOKS["10_zero"] = ("Lesson 10 — Past one GPU: ZeRO beside PEFT, predicted and measured per rank", [
    md("PEFT and quantization answer the memory question by training and storing less. The other answer "
       "is to spread the training over many devices. Plain data parallelism (DP) does not help memory: "
       "every rank holds the whole model, its gradients and the optimizer state. ZeRO (Rajbhandari et al. "
       "2020) removes that redundancy one kind of state at a time: stage 1 partitions the optimizer state, "
       "stage 2 the gradients too, stage 3 the weights too. With $\\Psi$ parameters, $N_d$ devices and "
       "$K = 12$ bytes of mixed-precision Adam state per parameter, a device holds $(2+2+K)\\Psi$, "
       "$4\\Psi + K\\Psi/N_d$, $2\\Psi + (2+K)\\Psi/N_d$ and $(2+2+K)\\Psi/N_d$ bytes:"),
    code("from minipeft import memory_zero\nshow_source(memory_zero.zero_model_states)"),
    md("Run the lesson in this process (a world of one rank, where every stage holds everything). It prints "
       "the paper's Fig. 1 recomputed, the course's cases (GPT-2 1.5B, GPT-3 175B) with full fine-tuning, "
       "LoRA and QLoRA at each stage, and a tiny GPT trained at stages 0-3:"),
    code("from minipeft.lessons import zero\nresult = zero.main(ARGS)"),
    md("**On two ranks.** `python -m minipeft.launch --nproc 2 -m minipeft.lessons.zero --quick` starts two "
       "MPI ranks (`pip install mpi4py mpich`); `train()` sees them and shards every batch. The report then "
       "gives each rank's bytes, measured next to the prediction, and checks the losses:"),
    code("import importlib.util, subprocess, sys\n"
         "if importlib.util.find_spec('mpi4py'):\n"
         "    run = subprocess.run([sys.executable, '-m', 'minipeft.launch', '--nproc', '2', '-m',\n"
         "                          'minipeft.lessons.zero', *ARGS], capture_output=True, text=True)\n"
         "    print(run.stdout[run.stdout.find('-- Tiny GPT'):] or run.stderr[-3000:])\n"
         "else:\n"
         "    print('mpi4py is not installed here: pip install mpi4py mpich, then rerun this cell')"),
    md("**Where the bytes go.** Stages 0-1 all-reduce every gradient; stages 2-3 reduce each bucket to the "
       "rank that owns it and free the rest; stages 1-3 send each owner's updated weights to all; stage 3 "
       "frees the weights it does not own after the step and gathers them before the next forward:"),
    code("from minipeft.distributed import DataParallel\n"
         "show_source(DataParallel.reduce_gradients)\nshow_source(DataParallel.finish_step)"),
    md("**Exact on the CPU.** Floating-point addition is not associative, so a sum over ranks depends on its "
       "order. On MPI minipeft gathers the ranks' buffers and adds them in rank order, the order in which "
       "one process accumulates the same shards: the losses agree bit for bit, not just approximately."),
    code("from minipeft.distributed.world import MPIWorld\nshow_source(MPIWorld.allreduce_sum_)"),
    md("**Exercises.** (1) Run the lesson on 4 ranks with `--kind lora`: which stage saves what, and why does "
       "the frozen base not shrink? (2) With `--optimizer adamw8bit`, what is $K$ now, and how far does "
       "stage 1 alone take you? (3) From the course table: how many A100-40GB does GPT-3 175B need at "
       "stage 3 with LoRA instead of full fine-tuning, counting only model states?"),
])


def main() -> None:
    for stem, (title, cells) in NOTEBOOKS.items():
        path = HERE / f"{stem}.ipynb"
        nbformat.write(notebook(title, cells), path)
        print("wrote", path.relative_to(HERE.parent))


if __name__ == "__main__":
    main()
