"""A2SF [157] (Jo and Shin 2024, "A2SF: Accumulative Attention Scoring with Forgetting Factor for Token Pruning in
Transformer Decoder"): H2O's heavy-hitter cache with a forgetting factor in the accumulated score, so that old tokens,
which causal masking lets collect attention for longer, compete fairly with recent ones.

After each decode call (queries at positions n-L..n-1, n = tokens seen), per (batch, kv head):

    A_{n,j} =  sum_{q <= n-1} f^(n-1-q) sum_{h in group} a_{h,q,j}      (the paper's A_{n,k} = sum_q f^(n-q) S_{q,k})
            =  f^L A_{n-L,j} + sum_{i in chunk} f^(n-1-p_i) sum_h a_{h,i,j}
    keep    =  {j : j >= n - R}  union  top_{B-R} {A_{n,j} : j < n - R}    B = budget, R = recent

f = `forgetting` in [0, 1]: f = 1 is H2O exactly; f = 0 ranks by the last query's attention alone. A chunk of several
tokens (a prompt) weighs its queries by f^(age), the paper's sum, then is compressed once. The official cache
(A2SFCache.update) keeps half the budget as the recent window and takes the top-k of the score among the older
entries, as here; its decode step scales the score by f after adding the step's attention, a constant factor f that
leaves the ranking unchanged. Scores are per sequence and per kv head (the query heads of a group summed, as the
official cache). Time per decoded token O(B H D); memory B entries per head. budget >= the generated length keeps
everything: decoding is causal softmax attention; the forward (decode=False) is causal softmax attention.
"""

from __future__ import annotations

import jax

from attn.core.layer import AttentionCall
from attn.core.validation import in_range
from attn.kv.policy_layer import PolicyAttention
from attn.kv.score_eviction import PER_HEAD_VALIDATORS, SCORE_OPTION_DOCS, HeavyRecentPolicy, say_if_never_evicting
from attn.registry import register

Array = jax.Array


@register(
    "a2sf",
    family="kv",
    paper="A2SF: Accumulative Attention Scoring with Forgetting Factor for Token Pruning in Transformer Decoder",
    catalog=157,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="H2O's heavy hitters + recent window, the accumulated attention decayed by a forgetting factor per step",
    option_docs={
        **SCORE_OPTION_DOCS,
        "recent": "latest tokens always kept; the other budget - recent slots hold the highest-scored tokens",
        "forgetting": "forgetting factor f in [0, 1] applied to the accumulated score per query (1 = H2O)",
    },
    validators={**PER_HEAD_VALIDATORS, "forgetting": in_range(0.0, 1.0)},
    fidelity="paper",
    reference=(
        "arXiv 2407.20485 Sec. 3 (A_{n,k} = sum_q f^(n-q) S_{q,k}); selection as github.com/Dirac-Notation/A2SF "
        "A2SFCache.update (recent window, top-k of the forgotten score among older entries; decode step checked)"
    ),
    has_attention_weights=True,
)
class A2SFAttention(PolicyAttention):
    """A2SF: softmax attention whose decode cache holds `recent` latest + `budget - recent` entries with the highest
    forgotten accumulated attention per (batch, kv head). x [B, T, E] -> [B, T, E]."""

    budget: int = 256
    recent: int = 128
    forgetting: float = 0.9

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        self.cache_policy()  # recent <= budget
        say_if_never_evicting(self, call, self.budget)

    def cache_policy(self) -> HeavyRecentPolicy:
        return HeavyRecentPolicy(budget=self.budget, recent=self.recent, forgetting=self.forgetting)
