"""The policy side of the cache protocol with a policy that differs per head: keep the `size` entries with the most
accumulated attention (an H2O-like rule without a recent window, defined here only to exercise the protocol). The
decode equals a numpy loop that tracks, per (batch, kv head), the kept tokens and the attention mass each has
received; the cache holds ragged per-head positions and their masses."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import attn
from attn.core import cache as cache_lib
from attn.kv.policy_layer import PolicyAttention

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


def np_rope(x, pos, base=10000.0):
    inv = base ** (-np.arange(0, x.shape[-1], 2, dtype=np.float64) / x.shape[-1])
    angle = np.asarray(pos, np.float64)[..., None] * inv
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], -1)


def reference(params, x):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(params)["params"])
    x = np.asarray(x, np.float64)
    q = np.einsum("bte,ehd->bthd", x, p["query"]["kernel"])
    k = np.einsum("bte,ehd->bthd", x, p["key"]["kernel"])
    v = np.einsum("bte,ehd->bthd", x, p["value"]["kernel"])
    out = np.zeros((B, T, H, D))
    kept = [[[] for _ in range(KVH)] for _ in range(B)]
    mass = [[{} for _ in range(KVH)] for _ in range(B)]
    for b in range(B):
        for g in range(KVH):
            for t in range(T):
                cands = kept[b][g] + [t]
                mass[b][g][t] = 0.0
                keys = np_rope(k[b, cands, g], np.array(cands))
                for h in range(g * (H // KVH), (g + 1) * (H // KVH)):
                    logits = keys @ np_rope(q[b, t, h], t) / np.sqrt(D)
                    w = np.exp(logits - logits.max())
                    w /= w.sum()
                    out[b, t, h] = w @ v[b, cands, g]
                    for j, wj in zip(cands, w, strict=True):
                        mass[b][g][j] += wj
                ranked = sorted(range(len(cands)), key=lambda i: (-mass[b][g][cands[i]], i))[:SIZE]
                kept[b][g] = [cands[i] for i in sorted(ranked)]
    y = np.einsum("bthd,hde->bte", out, p["out"]["kernel"])
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
