"""Data for minipeft: a byte-level tokenizer, a corpus built from the local Python
installation (or any UTF-8 file), and batches for language modeling and for
(prompt, target) fine-tuning. Nothing here downloads anything."""
from .batches import (
    IGNORE_INDEX,
    PromptTargetBatches,
    eval_batches,
    iter_lm_batches,
    lm_batches,
    pack_prompt_target,
    split_validation,
    unigram_cross_entropy,
)
from .corpus import (
    Corpus,
    cache_dir,
    corpus_stats,
    load_corpus,
    load_mixture,
    load_text_and_other_code,
    load_text_file,
)
from .tokenizer import ByteTokenizer

__all__ = [
    "ByteTokenizer",
    "Corpus",
    "IGNORE_INDEX",
    "PromptTargetBatches",
    "cache_dir",
    "corpus_stats",
    "eval_batches",
    "iter_lm_batches",
    "lm_batches",
    "load_corpus",
    "load_mixture",
    "load_text_and_other_code",
    "load_text_file",
    "pack_prompt_target",
    "split_validation",
    "unigram_cross_entropy",
]
