"""H2O [174] (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models"): the cache keeps the `recent` latest tokens and the `budget - recent` older tokens with the most
accumulated attention ("heavy hitters"), per (batch, kv head); memory stays at `budget` entries.

After each decode call (queries at positions n-L..n-1, n = tokens seen), per (batch, kv head):

    s_j   <-  s_j + sum_{i in chunk} sum_{h in group} a_{h,i,j}        accumulated attention (s_j = 0 on arrival)
    keep  =   {j : j >= n - R}  union  top_{B-R} {s_j : j < n - R}       B = budget, R = recent

a_{h,i,j} is the attention query i of query head h pays entry j (what it sees: the kept entries and the chunk up to
itself); the entries of a kv head are scored by the summed attention of its query heads (GQA). Query t attends to the
cache after step t-1 plus itself, at original positions. Time per decoded token O(B H D); memory B entries per head.

This is the official real-drop cache (FMInference/H2O h2o_hf/utils_real_drop/modify_llama.py, H2OKVCache_LayerWise:
`_update_hh_score` adds the step's attention column sums, then top-`hh_size` of the scores outside the last
`recent_size` tokens plus those tokens are kept, in order). Differences: scores are per sequence (the official code
sums them over the batch, which it runs at batch size 1); a chunk of several tokens (a prompt) attends causally to
the cache and to itself and is compressed once after it, as the official prompt step. budget >= the generated length
keeps everything: decoding is causal softmax attention. The forward (decode=False) is causal softmax attention: the
eviction depends on the decode history and has no mask form.
"""

from __future__ import annotations

import jax

from attn.core.layer import AttentionCall
from attn.kv.policy_layer import PolicyAttention
from attn.kv.score_eviction import PER_HEAD_VALIDATORS, SCORE_OPTION_DOCS, HeavyRecentPolicy, say_if_never_evicting
from attn.registry import register

Array = jax.Array


@register(
    "h2o",
    family="kv",
    paper="H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
    catalog=174,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="KV cache of heavy hitters (accumulated attention, per kv head) + a recent window at a fixed budget",
    option_docs={
        **SCORE_OPTION_DOCS,
        "recent": "latest tokens always kept (recent_size); the other budget - recent slots hold heavy hitters",
    },
    validators=PER_HEAD_VALIDATORS,
    fidelity="official-code",
    reference=(
        "arXiv 2306.14048 Sec. 4 (Algorithm 1); github.com/FMInference/H2O "
        "h2o_hf/utils_real_drop/modify_llama.py (H2OKVCache_LayerWise)"
    ),
    has_attention_weights=True,
)
class H2OAttention(PolicyAttention):
    """H2O: softmax attention whose decode cache holds `recent` latest + `budget - recent` heavy-hitter entries per
    (batch, kv head). x [B, T, E] -> [B, T, E]."""

    budget: int = 256
    recent: int = 128

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        self.cache_policy()  # recent <= budget
        say_if_never_evicting(self, call, self.budget)

    def cache_policy(self) -> HeavyRecentPolicy:
        return HeavyRecentPolicy(budget=self.budget, recent=self.recent)
