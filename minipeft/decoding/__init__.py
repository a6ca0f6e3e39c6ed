"""Decoding: the one loop that turns a model's logits into text, and its choosers.

* ``loop.py``: :class:`Session` (the token history, its padding mask and the model's
  :class:`~minipeft.kv_cache.KVCache`) and :func:`run`, the one decoding loop;
* ``greedy.py``: greedy decoding and sampling (``GPT.generate``, ``greedy_search``),
  eos handling and no-repeat n-gram bans;
* ``beam.py``: beam search with length penalties;
* ``batch.py``: many prompts of any lengths (``decode``, ``DecodeConfig``), left padding,
  and ``sequence_log_prob``, a full-recompute check on decoders;
* ``graph.py`` (with ``graph_step.py``): ``generate_graph``, greedy decoding on the GPU with
  the whole step captured once in a CUDA graph and replayed per token (plain GPTs and LoRA,
  through merged weights; ``graph_decodable`` says why another model is refused).

``model`` is a ``GPT`` or a ``PeftModel``: LoRA, adapters and selective fine-tuning live
inside the wrapped GPT; prompt and prefix tuning add their ``inputs_embeds_prefix`` /
``prefix_key_values`` to the first call (``generation_kwargs``), after which the cache
holds them; side tuning, whose forward keeps no cache, reruns the window every step.
"""
from .batch import DecodeConfig, decode, left_pad, sequence_log_prob
from .beam import LENGTH_PENALTY_STYLES, BeamChooser, beam_search, length_norm, log_softmax
from .greedy import PickTokens, banned_ngram_tokens, check_sampling, generate, greedy_search, sample_next, sample_rows
from .graph import GraphDecoder, generate_graph, graph_decodable
from .loop import Decodable, Session, inference, resolve_model, run

__all__ = ["DecodeConfig", "decode", "greedy_search", "beam_search", "generate", "banned_ngram_tokens",
           "length_norm", "log_softmax", "resolve_model", "sequence_log_prob", "LENGTH_PENALTY_STYLES", "left_pad",
           "Session", "run", "PickTokens", "BeamChooser", "Decodable", "inference", "sample_next", "sample_rows",
           "check_sampling", "GraphDecoder", "generate_graph", "graph_decodable"]
