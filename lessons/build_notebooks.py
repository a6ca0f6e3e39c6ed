"""Write the course notebooks ``lessons/NN_<name>.ipynb`` from the cell lists below.

``python lessons/build_notebooks.py`` rewrites them (outputs empty; CI executes them in
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


NOTEBOOKS["09_qlora"] = ("QLoRA — a 4-bit base, LoRA on every linear layer, and where the memory goes", [
    md("QLoRA (Dettmers et al. 2023) makes fine-tuning fit: the frozen base is stored in 4-bit "
       "NormalFloat with double quantization, LoRA adapters train on every linear layer, and "
       "optimizer state can be paged out. This notebook follows `python -m minipeft.lessons.qlora`."),
    md("The frozen 4-bit layer dequantizes its weight on the fly, in forward *and* in backward, "
       "so the dequantized weight is never kept for backward:"),
    code("from minipeft.quant import modules\nshow_source(modules.MatMul4bit)"),
    md("Before training anything: the course's memory arithmetic, each figure computed from its "
       "inputs by `minipeft.memory`:"),
    code("from minipeft.memory import format_course_figures\nprint(format_course_figures())"),
    md("Now the lesson: full fine-tuning, LoRA and QLoRA adapt the English base model to Python "
       "code. For each, one real training step is measured by category and printed beside the "
       "calculator's prediction; then 8-bit and paged AdamW, and what merging a QLoRA adapter does."),
    code("from minipeft.lessons import qlora\nresult = qlora.main(ARGS)"),
    code("for m, r in result['methods'].items():\n"
         "    print(f\"{m:6s} trainable {r['trainable']:>8,}  val loss {r['val_loss']:.3f}  \"\n"
         "          f\"activations {r['measured']['activations']:>10,} B\")\n"
         "display(Image(filename=str(FIGURES / 'qlora_loss.png')))\n"
         "display(Image(filename=str(FIGURES / 'qlora_memory.png')))"),
    md("**Exercise.** Rerun with `--size small --device cuda` on a GPU: which category grows with "
       "the model, which with the batch? Where does QLoRA's saving come from at that size?"),
])


def main() -> None:
    for stem, (title, cells) in NOTEBOOKS.items():
        path = HERE / f"{stem}.ipynb"
        nbformat.write(notebook(title, cells), path)
        print("wrote", path.relative_to(HERE.parent))


if __name__ == "__main__":
    main()
