"""EncoderDecoder: cached decoding equals the full forward, padding and causality, per-layer mechanisms, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.models import EncoderDecoder, generate_encoder_decoder

VOCAB, BATCH, SRC, TGT = 16, 2, 7, 6
LENGTHS = jnp.array([SRC, 4])


def small_model(**fields) -> EncoderDecoder:
    config = dict(vocab_size=VOCAB, num_layers=2, d_model=32, num_heads=4, mlp_dim=64)
    return EncoderDecoder(**{**config, **fields})


def tokens(seed, length):
    return jax.random.randint(jax.random.key(seed), (BATCH, length), 0, VOCAB)


@pytest.fixture(scope="module")
def model_and_params(quick_params):
    model = small_model(num_kv_heads=2)
    return model, quick_params(model, tokens(0, SRC), tokens(1, TGT))


def test_encoder_decoder_decoding_with_the_cache_equals_the_full_forward(model_and_params):
    model, params = model_and_params
    src, tgt = tokens(2, SRC), tokens(3, TGT)
    full = jax.jit(lambda s, t: model.apply(params, s, t, src_lengths=LENGTHS))(src, tgt)
    encoded = jax.jit(lambda s: model.apply(params, s, LENGTHS, method="encode"))(src)

    @jax.jit
    def step(cache, chunk):
        logits, state = model.apply(
            {**params, "cache": cache}, chunk, encoded, LENGTHS, decode=True, mutable=["cache"], method="decode"
        )
        return logits, state["cache"]

    # The creating call is a plain forward that sizes the cache and stores the projected encoder output.
    create = jax.jit(
        lambda t: model.apply(params, t, encoded, LENGTHS, decode=True, mutable=["cache"], method="decode")
    )
    created, state = create(tgt)
    np.testing.assert_allclose(created, full, rtol=1e-5, atol=1e-5)
    cache = state["cache"]
    assert "cross_attention" in cache["decoder"]["layers_0"]
    for prefill in (1, 3):  # token by token, and a 3-token chunk followed by single tokens
        current, pieces = cache, []
        logits, current = step(current, tgt[:, :prefill])
        pieces.append(logits)
        for t in range(prefill, TGT):
            logits, current = step(current, tgt[:, t : t + 1])
            pieces.append(logits)
        np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-5)


def test_generation_equals_greedy_decoding_with_full_forwards(model_and_params):
    model, params = model_and_params
    src = tokens(4, SRC)
    generated = generate_encoder_decoder(model, params, src, 5, lengths=LENGTHS, start_token=1)
    assert generated.shape == (BATCH, 5) and generated.dtype == jnp.int32
    forward = jax.jit(lambda t: model.apply(params, src, t, src_lengths=LENGTHS))
    # The reference re-runs the whole decoder for every token; the causal decoder's logits at position i do not
    # depend on the (zero) tokens after i, so one fixed-length buffer serves every step.
    target = jnp.zeros((BATCH, 6), jnp.int32).at[:, 0].set(1)
    for i in range(5):
        next_token = jnp.argmax(forward(target)[:, i], axis=-1).astype(jnp.int32)
        target = target.at[:, i + 1].set(next_token)
    np.testing.assert_array_equal(generated, target[:, 1:])


def test_padded_source_tokens_change_nothing_and_the_decoder_is_causal(model_and_params):
    model, params = model_and_params
    forward = jax.jit(lambda s, t: model.apply(params, s, t, src_lengths=LENGTHS))
    src, tgt = tokens(5, SRC), tokens(6, TGT)
    out = forward(src, tgt)
    np.testing.assert_array_equal(forward(src.at[1, 4:].set(0), tgt), out)  # row 1 has 4 valid source tokens
    assert np.abs(forward(src.at[1, 3].set((src[1, 3] + 1) % VOCAB), tgt)[1] - out[1]).max() > 1e-4
    later = forward(src, tgt.at[:, 4:].set((tgt[:, 4:] + 1) % VOCAB))
    np.testing.assert_array_equal(later[:, :4], out[:, :4])
    assert np.abs(later[:, 4:] - out[:, 4:]).max() > 1e-4


def test_mechanisms_come_from_the_registry_per_layer():
    model = small_model(
        encoder_attention=("softmax", "linear"),
        attention="gated",
        cross_attention=("softmax", "gated"),
        encoder_layers=2,
    )
    params = jax.eval_shape(model.init, jax.random.key(0), tokens(0, SRC), tokens(1, TGT))["params"]
    decoder = params["decoder"]
    assert set(params) == {"encoder", "decoder"}
    assert {"attention", "cross_attention"} <= set(decoder["layers_0"]) and "cross_attention" in decoder["layers_1"]
    assert "cross_attention" not in params["encoder"]["layers_0"]
    assert "gate" in str(jax.tree_util.tree_structure(decoder["layers_1"]["cross_attention"]))


def test_bad_configurations_are_rejected():
    src, tgt = tokens(0, SRC), tokens(1, TGT)
    with pytest.raises(ValueError, match="does not support causal masking"):
        jax.eval_shape(small_model(attention="agent").init, jax.random.key(0), src, tgt)
    with pytest.raises(ValueError, match="cross_attention='eca' has input kind 'channels'"):
        jax.eval_shape(small_model(cross_attention="eca").init, jax.random.key(0), src, tgt)
    with pytest.raises(ValueError, match="lengths must be int"):
        jax.eval_shape(small_model().init, jax.random.key(0), src, tgt, src_lengths=jnp.ones((3,), jnp.int32))
