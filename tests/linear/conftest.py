"""Checks every layer of attn/linear shares: decode-with-state equals the full forward, and causality.

Exposed as the `layer_checks` fixture (a namespace of functions) so the test files do not import each other.
The layers run eagerly: these layers are small, and after the first call of a process eager flax costs ~0.1 s
where a jitted init or apply costs seconds of compilation each.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn

CAUSAL = attn.Mask(causal=True)
# Decode one token at a time (each new piece size compiles again; test_linear.py also checks prefills).
CHUNKS = (1,) * 11
# A prefill, single steps, and a prefill that continues from the state.
PREFILL_CHUNKS = (4, 1, 1, 1, 4)


def build(name, **options):
    """The layer `name` with 4 heads of size 8 (GQA via num_kv_heads in options)."""
    return attn.build(name, num_heads=4, head_dim=8, **options)


def inputs(batch=2, length=11, features=16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, length, features)), jnp.float32)


def init(layer, x, mask=CAUSAL):
    """{"params": ...} only (init also returns sown collections, which must not leak into applies)."""
    return {"params": layer.init(jax.random.key(1), x, mask=mask)["params"]}


def forward(layer, variables, x, mask=CAUSAL, **kwargs):
    return layer.apply(variables, x, mask=mask, **kwargs)


def decode_in_chunks(layer, variables, x, chunks, mask=CAUSAL):
    """Creates the cache with a decode call on x, then feeds x again in `chunks` (sizes) with decode=True."""
    cache = layer.init(jax.random.key(1), x, mask=mask, decode=True)["cache"]
    outs, start = [], 0
    for size in chunks:
        piece = x[:, start : start + size]
        y, mutated = layer.apply({**variables, "cache": cache}, piece, mask=mask, decode=True, mutable=["cache"])
        outs.append(y)
        cache, start = mutated["cache"], start + size
    assert start == x.shape[1]
    return jnp.concatenate(outs, axis=1), cache


def causality_gap(layer, variables, x, t, mask=CAUSAL):
    """Largest change of outputs at positions <= t when every token after t is replaced."""
    noise = jnp.asarray(np.random.default_rng(7).standard_normal(x.shape), x.dtype)
    changed = x.at[:, t + 1 :].set(noise[:, t + 1 :])
    before, after = layer.apply(variables, x, mask=mask), layer.apply(variables, changed, mask=mask)
    assert float(jnp.max(jnp.abs(before[:, t + 1 :] - after[:, t + 1 :]))) > 1e-4, "future tokens must matter"
    return float(jnp.max(jnp.abs(before[:, : t + 1] - after[:, : t + 1])))


@pytest.fixture(scope="session")
def layer_checks():
    return types.SimpleNamespace(
        CAUSAL=CAUSAL,
        CHUNKS=CHUNKS,
        PREFILL_CHUNKS=PREFILL_CHUNKS,
        build=build,
        inputs=inputs,
        init=init,
        forward=forward,
        decode_in_chunks=decode_in_chunks,
        causality_gap=causality_gap,
    )
