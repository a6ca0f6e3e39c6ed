"""The reference math of every differentiable op, one topic per file.

Each op is a :class:`minipeft.engine.Function` with its forward next to its backward,
written in NumPy (``xp = xp_of(array)``, so CuPy runs the same lines). Nothing here knows
about GPUs, kernels or 16-bit arithmetic: those are *fast paths* that
:mod:`minipeft.fast` puts in place of an op when they apply (see ``minipeft/kernels`` and
:mod:`minipeft.amp`).

common       broadcasting rule for gradients, scalars as arrays
elementwise  + - * / where, neg pow exp log tanh sigmoid relu, cast
reduction    sum, mean, max
shape        reshape, transpose, broadcast_to, indexing, concatenate/stack/split, embedding
linalg       matmul, linear (y = x W^T + b)
norm_act     GELU, softmax, log-softmax, layer norm, dropout
attention    scaled dot-product attention with prefixes, causal and padding masks
loss         cross-entropy with ignore_index and label smoothing

:mod:`minipeft.functional` re-exports them all (``F.linear``, ``F.gelu`` ...).
"""
