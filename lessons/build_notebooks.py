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


def main() -> None:
    for stem, (title, cells) in NOTEBOOKS.items():
        path = HERE / f"{stem}.ipynb"
        nbformat.write(notebook(title, cells), path)
        print("wrote", path.relative_to(HERE.parent))


if __name__ == "__main__":
    main()
