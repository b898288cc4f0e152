"""`transnormer`: NormAttention equals its formula, DiagAttention is block-diagonal softmax (and plain softmax for
one block), decode == forward and causality for both, per-layer choice inside a model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.models import DecoderLM


def projections(params, x):
    p = nn.unbox(params)
    q, k, v = (np.einsum("bte,ehd->bthd", x, p[name]["kernel"]) for name in ("query", "key", "value"))
    return q, k, v, p["out"]["kernel"]


@pytest.mark.parametrize("causal", [True, False])
def test_norm_attention_equals_its_formula(layer_checks, causal):
    """SRMSNorm(phi(Q) phi(K)^T V) with phi = 1 + elu, the mask applied to phi(Q) phi(K)^T, no denominator."""
    c = layer_checks
    layer = c.build("transnormer")
    x = c.inputs()
    mask = c.CAUSAL if causal else None
    variables = c.init(layer, x, mask=mask)
    q, k, v, out = projections(variables["params"], np.asarray(x))
    phi = lambda z: np.where(z > 0, z, np.expm1(z)) + 1  # noqa: E731
    scores = np.einsum("bthd,bshd->bhts", phi(q), phi(k))
    if causal:
        scores = scores * np.tril(np.ones(scores.shape[-2:]))
    o = np.einsum("bhts,bshd->bthd", scores, v)
    o = o / np.sqrt(np.mean(o**2, axis=(-2, -1), keepdims=True) + 1e-6)
    want = np.einsum("bthd,hde->bte", o, out)
    np.testing.assert_allclose(c.forward(layer, variables, x, mask=mask), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_diag_attention_is_block_diagonal_softmax(layer_checks, causal):
    c = layer_checks
    x = c.inputs()
    mask = c.CAUSAL if causal else None
    layer = c.build("transnormer", use_diag=True, diag_block_size=4, num_kv_heads=2)
    variables = c.init(layer, x, mask=mask)
    q, k, v, out = projections(variables["params"], np.asarray(x))
    block = np.arange(x.shape[1]) // 4
    allowed = block[:, None] == block[None, :]
    dense = attn.Mask(causal=causal, dense=jnp.asarray(allowed)[None, None])
    o = attn.functional.softmax_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=dense)
    want = np.einsum("bthd,hde->bte", o, out)
    np.testing.assert_allclose(c.forward(layer, variables, x, mask=mask), want, atol=1e-5, rtol=1e-5)
    # One block covering the sequence is exactly the `softmax` layer (no positions) with the same parameters.
    whole = c.build("transnormer", use_diag=True, diag_block_size=16, num_kv_heads=2)
    softmax = c.build("softmax", position="none", num_kv_heads=2)
    np.testing.assert_allclose(
        c.forward(whole, variables, x, mask=mask), c.forward(softmax, variables, x, mask=mask), atol=1e-5
    )


@pytest.mark.parametrize("use_diag", [False, True])
def test_decode_equals_full_forward_and_is_causal(layer_checks, use_diag):
    c = layer_checks
    layer = c.build("transnormer", use_diag=use_diag, diag_block_size=3, chunk_size=4, output_norm="rmsnorm")
    x = c.inputs()
    variables = c.init(layer, x)
    full = c.forward(layer, variables, x)
    decoded, cache = c.decode_in_chunks(layer, variables, x, c.CHUNKS)
    np.testing.assert_allclose(decoded, full, atol=2e-5, rtol=2e-5)
    assert ("cached_key" in cache) == use_diag and ("state" in cache) != use_diag
    assert c.causality_gap(layer, variables, x, t=4) < 1e-5


def test_a_model_picks_diag_or_norm_attention_per_layer():
    """Diag in the lower half, Norm in the upper half (the paper's stack): each layer keeps its own decode cache."""
    options = [{"use_diag": True, "diag_block_size": 4}] * 2 + [{}] * 2
    model = DecoderLM(
        vocab_size=40,
        num_layers=4,
        d_model=32,
        num_heads=4,
        mlp_dim=32,
        attention="transnormer",
        attention_options=options,
    )
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 6)))
    cache = jax.eval_shape(lambda t: model.init(jax.random.key(0), t, decode=True)["cache"], tokens)
    assert set(cache["layers_0"]["attention"]) == {"cached_key", "cached_value", "cache_index"}
    assert set(cache["layers_3"]["attention"]) == {"state", "cache_index"}


def test_options_are_checked(layer_checks):
    c = layer_checks
    x = c.inputs()
    with pytest.raises(ValueError, match="diag_block_size=0 must be a positive int"):
        c.build("transnormer", use_diag=True, diag_block_size=0).init(jax.random.key(0), x, mask=c.CAUSAL)
    with pytest.raises(ValueError, match="output_norm='none' must be one of"):
        c.build("transnormer", output_norm="none").init(jax.random.key(0), x, mask=c.CAUSAL)
