"""QLoRA (Dettmers et al., arXiv 2305.14314): LoRA on a frozen base stored in 4 bits.

QLoRA is a recipe, not a new adapter: the trained part is a plain LoRA (``peft_type``
"LORA", saved like any LoRA). The recipe (§3 of the paper):

* the base's Linear layers are stored as 4-bit **NormalFloat** (NF4) codes in blocks of 64
  weights, each block with its absmax, and **double quantization** stores those absmax
  constants in 8 bits too (``quantize_model``, in place, as ``load_in_4bit`` does; the head
  stays in 16 bits);
* every forward dequantizes a block to the 16-bit **compute dtype** (bfloat16 in the paper;
  minipeft's CPU runs use float32) and the gradient flows through the frozen 4-bit weight
  to the LoRA weights only;
* LoRA goes on **every linear layer** of every block (§4: with LoRA on the attention
  projections only, QLoRA does not match 16-bit full fine-tuning);
* a **paged optimizer** (``minipeft.optim``'s paged AdamW) absorbs memory spikes.

``get_qlora_model`` is the first three steps in one call; choose the optimizer as usual.
"""
from __future__ import annotations

from ..nn import Module
from ..quant.modules import quantize_model
from .lora import LoraConfig, LoraMethod
from .model import PeftModel, get_peft_model


def get_qlora_model(model: Module, config: LoraConfig, compute_dtype: str = "bfloat16", quant_type: str = "nf4",
                    blocksize: int = 64, double_quant: bool = True, adapter_name: str = "default") -> PeftModel:
    """Quantize ``model``'s Linear layers in place (NF4, block 64, double quantization), then add LoRA.

    ``config`` should target every block linear, e.g.
    ``LoraConfig(r=64, lora_alpha=16, target_modules=list(BLOCK_LINEARS))`` (the paper's
    r and alpha); ``compute_dtype`` is the dtype each dequantized block is used in.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"QLoRA trains a LoRA adapter: config must be a LoraConfig, got {type(config).__name__}")
    LoraMethod.find_targets(model, LoraMethod.prepare_config(config))  # bad targets fail before quantizing
    quantize_model(model, quant_type=quant_type, blocksize=blocksize, compress_statistics=double_quant,
                   compute_dtype=compute_dtype, verbose=False)
    return get_peft_model(model, config, adapter_name)


__all__ = ["get_qlora_model"]
