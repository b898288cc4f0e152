"""TOVA (Oren et al. 2024, "Transformers are Multi-State RNNs", arXiv 2401.06104: Token Omission Via Attention): when
the cache is over its budget, drop the entries the last query attends to least, its attention averaged over all the
layer's heads; every head keeps the same entries.

After each decode call (the last query at position n-1, n = tokens seen), per sequence:

    s_j   =  (1 / H) sum_h a_{h, n-1, j}              over the kept entries and the chunk (the query itself included)
    keep  =  top_B {s_j}                               B = budget (everything while at most B entries)

a_{h,i,j} is the attention query i of head h pays entry j. With one token per call this evicts the single argmin
entry, as the paper's policy; a chunk of several tokens (a prompt) attends causally to the cache and to itself and
is compressed once by its last query's attention, as the official cache's `reduce` after the prompt. The incoming
token may be evicted itself (the official code; kvpress's TOVAPress instead always keeps it). Time per decoded token
O(B H D); memory B entries per head, plus the last query's scores (float32 [B, KVH, B]). budget >= the generated
length keeps everything: decoding is causal softmax attention; the forward (decode=False) is causal softmax attention.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attn.core import cache as cache_lib
from attn.core.layer import AttentionCall
from attn.core.softmax_layer import POSITIONS
from attn.core.validation import choice
from attn.kv.policy_layer import PolicyAttention
from attn.kv.score_eviction import (
    SCORE_OPTION_DOCS,
    SCORE_VALIDATORS,
    BudgetPolicy,
    say_if_never_evicting,
    top_k_mask,
)
from attn.registry import register

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TovaPolicy(BudgetPolicy):
    """Keep the `budget` entries with the highest head-averaged attention of the last query (the same in every kv
    head). `key_mass` holds that attention, not an accumulation."""

    budget: int
    stats = ("key_mass",)

    def observe(self, cands: cache_lib.Candidates, weights: Array) -> cache_lib.Candidates:
        """key_mass = the last query's weights [B, H, Tq, E] averaged over every query head, in every kv head."""
        last = jnp.mean(weights[:, :, -1, :].astype(jnp.float32), axis=1)  # [B, E]
        return cands.replace(key_mass=jnp.broadcast_to(last[:, None, :], cands.key_mass.shape))

    def keep(self, cands: cache_lib.Candidates) -> tuple[Array, Array]:
        return cache_lib.ordered_keep(top_k_mask(cands.key_mass, cands.valid, self.budget), self.capacity)


@register(
    "tova",
    family="kv",
    paper="Transformers are Multi-State RNNs (TOVA: Token Omission Via Attention)",
    catalog=None,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="KV cache at a fixed budget: evict the entries the last query attends to least (averaged over heads)",
    option_docs=SCORE_OPTION_DOCS,
    validators={**SCORE_VALIDATORS, "position": choice(*POSITIONS)},
    fidelity="official-code",
    reference=(
        "arXiv 2401.06104 Sec. 3.3 (TOVA); github.com/schwartz-lab-NLP/TOVA src/tova_cache.py (TOVACache.reduce: "
        "mean over heads of the last row, top cache_size, sorted); kvpress presses/tova_press.py (TOVAPress)"
    ),
    has_attention_weights=True,
)
class TovaAttention(PolicyAttention):
    """TOVA: softmax attention whose decode cache holds the `budget` entries the last query attends to most
    (averaged over heads; the same entries in every kv head). x [B, T, E] -> [B, T, E]."""

    budget: int = 256

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        self.cache_policy()
        say_if_never_evicting(self, call, self.budget)

    def cache_policy(self) -> TovaPolicy:
        return TovaPolicy(budget=self.budget)
