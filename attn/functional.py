"""Pure attention functions (no parameters). `from attn import functional as F`.

Layouts follow `jax.nn.dot_product_attention`: q [batch, q_len, heads, head_dim], k and v
[batch, kv_len, kv_heads, head_dim], heads a multiple of kv_heads (MHA, GQA, MQA); the output is shaped like q.
"""

from __future__ import annotations

import jax

from attn.core.linear_scan import linear_attention
from attn.core.neighborhood import neighborhood_attention
from attn.core.softmax import softmax_attention

Array = jax.Array

__all__ = ["linear_attention", "neighborhood_attention", "softmax_attention"]
