"""Pure attention functions (no parameters). `from attn import functional as F`.

Layouts follow `jax.nn.dot_product_attention`: q [batch, q_len, heads, head_dim], k and v
[batch, kv_len, kv_heads, head_dim], heads a multiple of kv_heads (MHA, GQA, MQA); the output is shaped like q.

block_sparse_attention: exact softmax over the selected key blocks of each query block (index lists or a block
mask; the cost follows the kept blocks), the core of the dynamic sparse selectors in attn/sparse/.
ring_attention / ulysses_attention: the same softmax attention with the sequence split over a mesh axis
(attn.core.context_parallel).
"""

from __future__ import annotations

import jax

from attn.core.block_sparse import block_sparse_attention
from attn.core.context_parallel import ring_attention, ulysses_attention
from attn.core.linear_scan import linear_attention
from attn.core.neighborhood import neighborhood_attention
from attn.core.softmax import softmax_attention

Array = jax.Array

__all__ = [
    "block_sparse_attention",
    "linear_attention",
    "neighborhood_attention",
    "ring_attention",
    "softmax_attention",
    "ulysses_attention",
]
