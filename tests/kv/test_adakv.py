"""Ada-KV (`adakv`): the head-wise budgets, the selection and the decode after it equal the numpy loop of SnapKV's
rule (tests/kv/prompt_selection_reference.py) with the head budgets of the official joint top-k written out here;
heads keep ragged lengths; layout="padded" allocates the cache at the largest head budget the rule allows (the
packed layout, the default: tests/kv/test_adakv_packed.py)."""

import jax
import numpy as np
import pytest

import attn
from attn.core import cache as cache_lib
from attn.kv.adakv import AdaKVPolicy
from tests.kv.test_snapkv import BUDGET, DECODE, KERNEL, WINDOW, B, D, check_against_reference, inputs

ALPHA = 0.5  # floor_alpha: b_g = round(m_g / 2 + 2) is exact in float32 and float64 alike


def official_head_budgets(scores):
    """AdaptiveSnapKVCluster.update_kv_gqa's head capacities from the pooled scores of every kv head: sort each
    head's scores, concatenate the heads, top n b of them, count per head, then the floor_alpha mix."""
    heads, base = len(scores), BUDGET - WINDOW
    flat = np.concatenate([sorted(s, reverse=True) for s in scores])
    chosen = sorted(range(len(flat)), key=lambda i: (-flat[i], i))[: heads * base]
    counts = np.bincount(np.array(chosen) // len(scores[0]), minlength=heads)
    return [int(np.round(m * (1 - ALPHA) + int(base * ALPHA))) for m in counts]


def build(**options):
    defaults = {"budget": BUDGET, "observation_window": WINDOW, "kernel_size": KERNEL, "decode_budget": DECODE}
    return attn.build("adakv", num_heads=4, head_dim=D, **{**defaults, "floor_alpha": ALPHA, **options})


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_head_budgets_selection_and_decode_equal_reference(kv_heads):
    capacity = round(kv_heads * (BUDGET - WINDOW) * (1 - ALPHA)) + int((BUDGET - WINDOW) * ALPHA) + WINDOW + DECODE
    x = inputs(19, seed=2)  # a 16-token prompt, then 3 tokens
    cache, kept = check_against_reference(
        build(num_kv_heads=kv_heads, layout="padded"), x, 16, kv_heads=kv_heads, pooling="max", capacity=capacity,
        counts=lambda b, g, scores: official_head_budgets(scores)[g], compress_from=BUDGET,
    )  # fmt: skip
    assert cache["cached_key"].shape == (B, capacity, kv_heads, D)
    lengths = np.asarray(cache["cache_lengths"])
    assert any(len(set(lengths[b])) > 1 for b in range(B)), "heads with different scores should keep different counts"


def test_uniform_scores_give_uniform_budgets():
    policy = AdaKVPolicy(budget=6, window=2, kernel_size=3, pooling="max", decode_budget=0, kv_heads=3, floor_alpha=0.2)
    scores = np.tile(np.linspace(1.0, 0.1, 10, dtype=np.float32), (1, 3, 1))  # every head scores keys alike
    budgets = policy.prefix_budget(np.int32(12), scores, np.ones_like(scores, bool))
    # each head wins 4 of the joint 12 (ties go to the lower head but every head has the same 4 best)
    np.testing.assert_array_equal(budgets, [[round(4 * 0.8 + 0)] * 3])


def test_padded_bytes_follow_the_largest_head():
    x = inputs(8)
    small, large = build(num_kv_heads=2, layout="padded"), build(num_kv_heads=2, budget=2 * BUDGET, layout="padded")
    params = small.init(jax.random.key(1), x)
    sizes = [
        cache_lib.nbytes(jax.eval_shape(lambda m=m: m.apply(params, x, decode=True, mutable=["cache"])[1]["cache"]))
        for m in (small, large)
    ]
    # budget 6 -> 2 * 4 * 0.5 + 2 = 6 prompt slots, budget 12 -> 2 * 10 * 0.5 + 5 = 15: 9 more slots per head
    assert sizes[1] - sizes[0] == B * 9 * 2 * (2 * D * 4 + 4 + 4)


def test_bad_floor_alpha_raises():
    with pytest.raises(ValueError, match="floor_alpha=1.5"):
        build(floor_alpha=1.5).init(jax.random.key(0), inputs(8))
