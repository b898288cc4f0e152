"""KV-cache decoding and generation: identities to the full (non-cached) forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.models import DecoderLM, generate, init_cache

VOCAB, BATCH, LENGTH = 32, 2, 8

CONFIGS = {
    "mha-rope": dict(),
    "gqa-rope": dict(num_kv_heads=2),
    "learned-positions": dict(position_embedding="learned", max_len=16, attention_options={"position": "none"}),
}


def small_decoder(**fields) -> DecoderLM:
    config = dict(vocab_size=VOCAB, num_layers=2, d_model=32, num_heads=4, mlp_dim=64)
    return DecoderLM(**{**config, **fields})


def tokens(seed: int = 0, shape=(BATCH, LENGTH)) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_cached_decoding_equals_full_forward(config, quick_params, jit_apply):
    model = small_decoder(**CONFIGS[config])
    batch = tokens()
    params = quick_params(model, batch)
    full = jit_apply(model)(params, batch)

    @jax.jit
    def decode(cache, chunk):
        logits, state = model.apply({**params, "cache": cache}, chunk, decode=True, mutable=["cache"])
        return logits, state["cache"]

    for prefill in (1, 3):  # 1: token by token from the start; 3: a prompt in one call, then single steps
        cache = init_cache(model, params, BATCH, LENGTH)
        logits, cache = decode(cache, batch[:, :prefill])
        steps = [logits]
        for t in range(prefill, LENGTH):
            logits, cache = decode(cache, batch[:, t : t + 1])
            steps.append(logits)
        np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5, err_msg=f"prefill={prefill}")


def test_init_cache_is_zero_and_sized_for_max_len(quick_params):
    model = small_decoder(num_kv_heads=2, position_embedding="learned", max_len=16)
    params = quick_params(model, tokens())
    cache = init_cache(model, params, batch_size=3, max_len=12)
    assert cache["layers_1"]["attention"]["cached_key"].shape == (3, 12, 2, 8)
    assert cache["position_index"].shape == ()
    assert all(not np.any(leaf) for leaf in jax.tree.leaves(cache))
    with pytest.raises(ValueError, match="max_len=0"):
        init_cache(model, params, batch_size=1, max_len=0)


@pytest.fixture(scope="module")
def lm(quick_params):
    """A one-layer GQA decoder, its parameters, and its jitted full forward."""
    model = small_decoder(num_layers=1, num_kv_heads=2)
    params = quick_params(model, tokens())
    return model, params, jax.jit(model.apply)


def test_greedy_generate_equals_repeated_argmax_of_full_forward(lm):
    model, params, forward = lm
    prompt, new = tokens(1, (BATCH, 3)), LENGTH - 3
    out = generate(model, params, prompt, new)
    assert out.shape == (BATCH, LENGTH) and out.dtype == jnp.int32
    # Causality lets a fixed-length buffer stand in for the growing sequence (one compiled shape).
    expected = jnp.zeros((BATCH, LENGTH), jnp.int32).at[:, :3].set(prompt)
    for t in range(3, LENGTH):
        expected = expected.at[:, t].set(jnp.argmax(forward(params, expected)[:, t - 1], axis=-1))
    np.testing.assert_array_equal(out, expected)
    # Jittable from the outside too (model and lengths closed over), with the same result.
    np.testing.assert_array_equal(jax.jit(lambda p, x: generate(model, p, x, new))(params, prompt), out)


def test_sampling_is_reproducible_and_restricted_to_top_k(lm):
    model, params, forward = lm
    prompt = tokens(1, (BATCH, 2))
    sample = lambda seed, **kw: generate(model, params, prompt, 6, temperature=1.0, rng=jax.random.key(seed), **kw)
    first = sample(0)
    np.testing.assert_array_equal(first, sample(0))
    assert not np.array_equal(first, sample(1))
    np.testing.assert_array_equal(sample(3, top_k=1), generate(model, params, prompt, 6))
    top3 = sample(4, top_k=3)
    logits = forward(params, top3)
    allowed = jax.lax.top_k(logits[:, 1:-1], 3)[1]  # the 3 best next tokens after each prefix
    assert np.all(np.any(allowed == top3[:, 2:, None], axis=-1))


def test_generate_rejects_bad_arguments(lm):
    model, params, _ = lm
    prompt = tokens(1, (BATCH, 2))
    with pytest.raises(ValueError, match="needs rng"):
        generate(model, params, prompt, 3, temperature=0.7)
    with pytest.raises(ValueError, match="top_k=0"):
        generate(model, params, prompt, 3, temperature=0.7, top_k=0, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="prompt must be int"):
        generate(model, params, prompt.astype(jnp.float32), 3)
    np.testing.assert_array_equal(generate(model, params, prompt, 0), prompt)
