"""The policy side of the cache protocol with a policy that differs per head: keep the `size` entries with the most
accumulated attention (an H2O-like rule without a recent window, defined here only to exercise the protocol). The
decode equals a numpy loop that tracks, per (batch, kv head), the kept tokens and the attention mass each has
received; the cache holds ragged per-head positions and their masses."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import attn
from attn.core import cache as cache_lib
from attn.kv.policy_layer import PolicyAttention
from tests.kv.decoding import np_mass_policy_decode
from tests.kv.score_reference import projections

B, T, E, H, KVH, D, SIZE = 2, 9, 16, 4, 2, 8, 3


@dataclasses.dataclass(frozen=True)
class KeepHeaviest(cache_lib.CachePolicy):
    size: int
    stats = ("key_mass",)

    @property
    def capacity(self) -> int:
        return self.size

    def visible(self, cands, q_positions):
        return cands.valid[:, :, None, :] & (cands.positions[:, :, None, :] <= q_positions[:, None, :, None])

    def keep(self, cands):
        score = jnp.where(cands.valid, cands.key_mass, -jnp.inf)
        top = jax.lax.top_k(score, self.size)[1]  # [B, KVH, size]
        chosen = jnp.any(jnp.arange(score.shape[-1]) == top[..., None], axis=-2)
        return cache_lib.ordered_keep(chosen & cands.valid, self.size)


class HeaviestAttention(PolicyAttention):
    size: int = SIZE

    def cache_policy(self):
        return KeepHeaviest(self.size)


def reference(params, x):
    q, k, v, out_kernel = projections(params, x)

    def keep(cands, mass, t):  # the SIZE heaviest entries
        ranked = sorted(range(len(cands)), key=lambda i: (-mass[cands[i]], i))[:SIZE]
        return [cands[i] for i in sorted(ranked)]

    out, kept, mass = np_mass_policy_decode(q, k, v, keep)
    y = np.einsum("bthd,hde->bte", out, out_kernel)
    return y, kept, mass


def test_per_head_policy_with_key_mass_equals_reference():
    layer = HeaviestAttention(num_heads=H, head_dim=D, num_kv_heads=KVH)
    x = 3.0 * jax.random.normal(jax.random.key(0), (B, T, E))  # sharp enough that the heads keep different tokens
    params = layer.init(jax.random.key(1), x, mask=attn.Mask(causal=True))
    _, state = layer.apply(params, x, decode=True, mutable=["cache"])
    cache, outs = state["cache"], []
    assert cache["cached_key"].shape == (B, SIZE, KVH, D) and cache["cache_key_mass"].shape == (B, KVH, SIZE)
    for t in range(T):
        y, state = layer.apply({**params, "cache": cache}, x[:, t : t + 1], decode=True, mutable=["cache"])
        cache = state["cache"]
        outs.append(y)
    expected, kept, mass = reference(params, x)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), expected, atol=2e-5, rtol=1e-5)
    positions = np.asarray(cache["cache_positions"])
    assert any(kept[b][0] != kept[b][1] for b in range(B)), "the heads should keep different tokens"
    for b in range(B):
        for g in range(KVH):
            np.testing.assert_array_equal(positions[b, g], kept[b][g])
            np.testing.assert_allclose(cache["cache_key_mass"][b, g], [mass[b][g][j] for j in kept[b][g]], rtol=1e-5)
    np.testing.assert_array_equal(cache["cache_lengths"], np.full((B, KVH), SIZE))
