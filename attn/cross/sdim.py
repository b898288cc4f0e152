"""`sdim`: SDIM, sampling-based target attention over long user-behaviour sequences by SimHash collisions.

Paper: "Sampling Is All You Need on Modeling Long-Term User Behaviors for CTR Prediction" (Cao et al., CIKM 2022,
arXiv 2205.10249; Meituan, no official code). Instead of softmax(q k^T) over a long behaviour sequence, SDIM hashes
the target item and every behaviour with m SimHash functions of tau bits each and gathers the behaviours whose
signature equals the target's: the expected weight of behaviour j is the collision probability
(1 - theta_tj / pi)^tau of the angle between them, a kernel that plays the attention's role at O(L m tau D) cost.

Per head (x and the context split into H heads of D = head_dim channels; no q/k/v projections, SDIM hashes and
gathers the embeddings themselves), with R [D, m, tau] fixed Gaussian rotations drawn from `seed`:

    sig_i(u) = sum_b [ (u R)_{i,b} > 0 ] 2^b                        signature of u under hash i (tau bits)
    c_tj     = sum_{i < m} [ sig_i(q_t) == sig_i(k_j) ]             collisions of target t and behaviour j, masked -> 0
    w_tj     = c_tj / ||c_t.||_2   (weighting="l2", the paper)      0 when nothing collides
             = c_tj / m            (weighting="hashes": the mean over hashes of the per-hash sums, FuxiCTR)
    o_t      = sum_j w_tj v_j,   q = x, k = v = context (x itself for self-attention)
    y_t      = concat_h(o_t) W_o                                    the layer template's output projection

The signatures are discrete, so no gradient reaches q or k through the weights (as in the paper: the hashing is a
sampling step); the behaviour embeddings train through the values, W_o through the output.

Exact reductions (tests/sparse/test_sdim.py): hash_bits = 0 gives one bucket, so every visible behaviour collides in
every hash: weighting="hashes" is the plain sum over behaviours and "l2" the sum divided by sqrt(number of visible
behaviours). Behaviours identical to the target always collide (c = m).

Deviations (fidelity "peer"): no official code; checked against the paper's text (Sec. 3: multi-round hashing,
signatures of width tau, gathering the colliding behaviours, l2 normalisation) and the FuxiCTR re-implementation
(github.com/reczoo/FuxiCTR model_zoo/SDIM/src/SDIM.py: rotations [d, num_hashes, hash_bits] fixed, bits
relu(sign(.)), bucket = bits . powers of two, per-hash sums averaged over the hashes, weighting="hashes" here). With
H > 1 each head hashes its own D channels (the paper hashes the whole embedding: num_heads=1). BSE (the serving-time
precomputation of the behaviour signatures) is a deployment detail, not a different function.

Shapes: x [B, Tq, H D] (targets), context [B, L, H D] (behaviours) -> [B, Tq, E]; captures attention_weights
[B, H, Tq, L] = w. Cost O(B (Tq + L) H D m tau) to hash plus O(B H Tq L m) to compare.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from attn.core.layer import AttentionCall
from attn.core.softmax_layer import SOFTMAX_OPTION_DOCS, SOFTMAX_VALIDATORS, SoftmaxAttentionLayer
from attn.core.validation import choice, non_negative_int, positive_int
from attn.cross.context import NO_KV_PROJECTIONS
from attn.registry import register

Array = jax.Array

WEIGHTINGS = ("l2", "hashes")


def simhash_rotations(seed: int, head_dim: int, num_hashes: int, hash_bits: int) -> Array:
    """The fixed Gaussian rotations R float32 [head_dim, num_hashes, hash_bits] drawn from `seed`."""
    return jax.random.normal(jax.random.key(seed), (head_dim, num_hashes, hash_bits), jnp.float32)


def simhash_signatures(u: Array, rotations: Array) -> Array:
    """u [..., D] -> int32 [..., num_hashes]: sum_b [(u R)_{i,b} > 0] 2^b per hash i (rotations [D, m, tau])."""
    dtype = jnp.promote_types(u.dtype, jnp.float32)  # float64 inputs hash in float64
    projected = jnp.einsum("...d,dmt->...mt", u.astype(dtype), rotations.astype(dtype))
    powers = 2 ** jnp.arange(rotations.shape[-1], dtype=jnp.int32)
    return jnp.sum((projected > 0).astype(jnp.int32) * powers, axis=-1)


def sdim_collisions(q: Array, k: Array, rotations: Array) -> Array:
    """q [B, Tq, H, D], k [B, L, H, D] -> float32 [B, H, Tq, L]: hashes (of m) in which q_t and k_j collide."""
    sig_q = simhash_signatures(q, rotations)  # [B, Tq, H, m]
    sig_k = simhash_signatures(k, rotations)  # [B, L, H, m]
    equal = sig_q[:, :, None, :, :] == sig_k[:, None, :, :, :]  # [B, Tq, L, H, m]
    return jnp.transpose(jnp.sum(equal.astype(jnp.float32), axis=-1), (0, 3, 1, 2))


def sdim_weights(counts: Array, weighting: str, num_hashes: int) -> Array:
    """Collision counts float [..., L] (0 where masked) -> weights: counts / ||counts||_2 ("l2", 0 for an all-zero
    row) or counts / num_hashes ("hashes")."""
    if weighting == "hashes":
        return counts / num_hashes
    if weighting != "l2":
        raise ValueError(f"weighting={weighting!r} must be one of {WEIGHTINGS}")
    norm = jnp.sqrt(jnp.sum(counts * counts, axis=-1, keepdims=True))
    return counts / jnp.where(norm > 0, norm, 1.0)


@register(
    "sdim",
    family="cross",
    paper="Sampling Is All You Need on Modeling Long-Term User Behaviors for CTR Prediction",
    catalog=201,
    op=sdim_collisions,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=False,
    summary="target attention by SimHash sampling: behaviours whose m tau-bit signatures collide with the target's "
    "are gathered, weighted by their collision count (l2-normalised); no projections, no softmax",
    fidelity="peer",
    reference="arXiv 2205.10249 (Sec. 3: hash-based sampling, multi-round hashing of width tau, gathering the "
    "behaviours with the target's signature, l2 normalisation; collision probability (1 - theta / pi)^tau); no "
    "official code; github.com/reczoo/FuxiCTR model_zoo/SDIM/src/SDIM.py (lsh_hash: fixed rotations [d, m, tau], "
    "relu(sign) bits times powers of two; lsh_attention: per-hash sums of the colliding behaviours averaged over "
    "hashes)",
    supports_gqa=False,
    has_attention_weights=True,
    validators={
        **SOFTMAX_VALIDATORS,
        "num_kv_heads": NO_KV_PROJECTIONS,
        "num_hashes": positive_int,
        "hash_bits": non_negative_int,
        "weighting": choice(*WEIGHTINGS),
        "seed": non_negative_int,
    },
    option_docs={
        **SOFTMAX_OPTION_DOCS,
        "num_hashes": "m: SimHash functions (sampling rounds) per head",
        "hash_bits": "tau: bits per signature; larger tau keeps only the more similar behaviours (0: all collide)",
        "weighting": "'l2' (the paper: collision counts over their l2 norm) or 'hashes' (counts / m, FuxiCTR)",
        "seed": "PRNG seed of the fixed rotations",
    },
)
class SDIMAttention(SoftmaxAttentionLayer):
    """SDIM: o_t = sum_j w_tj v_j with w from SimHash collision counts. x [B, Tq, H D], context [B, L, H D] (or None:
    self-attention) -> [B, Tq, E]. Parameters: the output projection only."""

    position: str = "none"
    num_hashes: int = 32
    hash_bits: int = 3
    weighting: str = "l2"
    seed: int = 0

    intervention_stages: ClassVar[tuple[str, ...]] = ("attention_logits", "attention_weights", "head_outputs")

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        width = self.num_heads * self.head_dim
        for name, value in (("x", call.x), ("context", call.context)):
            if value is not None and value.shape[-1] != width:
                raise ValueError(
                    f"{name} has width {value.shape[-1]} (shape {tuple(value.shape)}); sdim hashes and gathers the "
                    f"embeddings without projections, so it expects num_heads * head_dim = {width}"
                )
        if call.decode:
            raise ValueError("sdim does not decode (decode=True): it gathers a whole behaviour sequence per target")

    def project_qkv(self, x: Array, context: Array | None) -> tuple[Array, Array, Array]:
        """No projections: q = x, k = v = context (x for self-attention), split into heads [B, T, H, D]."""
        split = lambda a: a.reshape(*a.shape[:-1], self.num_heads, self.head_dim).astype(self.dtype)  # noqa: E731
        source = x if context is None else context
        return split(x), split(source), split(source)

    def scores(self, q: Array, k: Array) -> Array:
        """float32 [B, H, Tq, L]: the collision counts c (masked entries become -inf in the logits stage)."""
        return sdim_collisions(q, k, simhash_rotations(self.seed, self.head_dim, self.num_hashes, self.hash_bits))

    def normalize(self, logits: Array) -> tuple[Array, None]:
        """Masked counts (-inf where masked) -> the SDIM weights (no softmax, no lse)."""
        counts = jnp.where(jnp.isfinite(logits), logits, 0.0)
        return sdim_weights(counts, self.weighting, self.num_hashes), None
