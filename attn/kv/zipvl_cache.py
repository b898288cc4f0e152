"""ZipVL's KV cache [166] (He et al. 2024, "ZipVL: Efficient Large Vision-Language Models with Dynamic Token
Sparsification and KV Cache Compression", arXiv 2410.08584v1 Algorithm 1): a mixed-precision quantized cache whose
share of high-precision ("important") tokens is set per layer and per input by the attention distribution, instead
of ZipCache's fixed ratio.

Each compression acts on a group of m tokens (the prompt at once, then every `gap` generated tokens), per batch row
and layer (one token set for all heads, as the paper's sparse attention). With a_j the attention the token received
so far (summed over the queries and heads) and s_j = a_j / (n - p_j) its normalized score (n tokens seen, p_j its
position; attn.kv.zipcache.normalized_saliency):

    a_(1) >= a_(2) >= ... >= a_(m)                                   accumulated attention, sorted
    p   = min{ p : sum_{r <= p} a_(r) >= tau * sum_j a_j }           the dynamic number of important tokens
    p   = min(p, m - floor(low_ratio m))                             the high store's budget (low_ratio 0: no cap)
    T   = the p tokens of largest s_j                                stored at bits_high (the paper: 4)
    U   = the other m - p tokens                                     stored at bits_low (the paper: 2)

so a layer whose attention concentrates on few tokens keeps few at high precision, one that spreads keeps many.
Storage, quantizer, schedule and attention are ZipCache's (attn.kv.zipcache: channel-separable token-wise codes,
a full-precision window of `gap` generated tokens, dequantized reads); only the split differs. The capacities: the
high store ceil((1 - low_ratio) N) + N // gap + 1 entries (as ZipCache; every group keeps at most
ceil((1 - low_ratio) m) important tokens), the low store N - 1 (every group keeps at least one important token), for
a cache created on N tokens.

Sources: the bit widths 4 / 2 are the ones that reproduce the paper's Table 3 compression ratios (16 / (4 r + 2 (1 -
r)): 4.7x at ZipCache's r = 70 %, 6.2x at ZipVL's 28.6 %); the ratio rule (accumulated scores against tau times
their total) and the selection by normalized scores follow Algorithm 1 and Eqs. (6)-(9). Differences: the paper's
prompt scores come from probe queries (recent + random) for FlashAttention, here from every prompt query; its
generated tokens are recompressed every 100 tokens from the current query's attention alone, here every `gap` from
the attention they accumulated in the window. No official code was found. tau = 1 makes every token that received
attention important (up to float32 rounding of the sums), so the split is ZipCache's cap alone: with one kv head
(ZipCache splits per kv head) the layer decodes bit-identically to `zipcache` with the same low_ratio.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn.core.validation import in_range
from attn.kv.zipcache import ZipCacheAttention, ZipCacheLayout, split_lowest
from attn.registry import register

Array = jax.Array


def important_count(scores: Array, tau: float) -> Array:
    """ZipVL's dynamic count p, int32 [..., 1]: the fewest entries of largest score whose scores sum to at least tau
    times the total, from scores [..., n] >= 0 (entries outside the group hold 0, so p never exceeds the entries
    with a nonzero score; p = 1 when every score is 0)."""
    ranked = -jnp.sort(-scores, axis=-1)
    covered = jnp.cumsum(ranked, axis=-1)
    return (1 + jnp.sum(covered < tau * covered[..., -1:], axis=-1, keepdims=True)).astype(jnp.int32)


class ZipVLLayout(ZipCacheLayout):
    """ZipCache's high store; the low store holds every token but one per compressed group (N - 1)."""

    @property
    def low_capacity(self) -> int:
        return max(self.length - 1, 0)


@register(
    "zipvl_cache",
    family="kv",
    paper=(
        "ZipVL: Efficient Large Vision-Language Models with Dynamic Token Sparsification and KV Cache Compression "
        "(the mixed-precision KV cache)"
    ),
    catalog=166,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="mixed-precision KV cache: a per-layer dynamic share of important tokens (tau of the attention) at "
    "high bits, the rest at low bits",
    option_docs={
        "tau": "share of the group's accumulated attention the important tokens must cover (0.975 in the paper)",
        "low_ratio": "least share of each compressed group at bits_low: caps the important tokens and sizes the "
        "high store (0: no cap, as the paper)",
    },
    validators={"tau": in_range(0.0, 1.0, low_inclusive=False)},
    fidelity="reconstructed",
    reference=(
        "arXiv 2410.08584v1 Algorithm 1 (Quant(K[T], b_h) / Quant(K[U], b_l), recompression of generated tokens), "
        "Eqs. (6)-(9) (p from sorted accumulated attention >= tau * total; T by normalized scores), Table 3 (the "
        "4.69x / 6.18x compression ratios give b_h = 4, b_l = 2); no official code found. Storage and quantizer: "
        "attn.kv.zipcache (official-code)"
    ),
    has_attention_weights=True,
)
class ZipVLCacheAttention(ZipCacheAttention):
    """ZipVL's KV cache: softmax attention whose decode cache stores each group's dynamic share of important tokens
    at `bits_high` and the rest at `bits_low` bits (see the module docstring). x [B, T, E] -> [B, T, E]."""

    tau: float = 0.975
    low_ratio: float = 0.0

    def layout(self, length: int) -> ZipVLLayout:
        return ZipVLLayout(length, self.low_ratio, self.gap)

    def split(self, mass: Array, saliency: Array, chosen: Array) -> tuple[Array, Array]:
        """(low, high) bool [B, KVH, T]: one split per batch row from the mass and saliency [B, KVH, T] summed over
        the kv heads (the module docstring's rule), the same in every head."""
        kv_heads = chosen.shape[1]
        layer_mass = jnp.sum(jnp.where(chosen, mass, 0.0), axis=1, keepdims=True)  # [B, 1, T]
        layer_saliency = jnp.sum(saliency, axis=1, keepdims=True)
        chosen_row = chosen[:, :1]
        m = jnp.sum(chosen_row, axis=-1, keepdims=True)
        important = jnp.minimum(
            important_count(layer_mass, self.tau),
            m - jnp.floor(self.low_ratio * m.astype(jnp.float32) + 1e-6).astype(jnp.int32),
        )
        low, high = split_lowest(layer_saliency, chosen_row, m - important)
        return jnp.repeat(low, kv_heads, axis=1), jnp.repeat(high, kv_heads, axis=1)
