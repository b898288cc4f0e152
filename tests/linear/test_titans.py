"""`titans`: the chunk-parallel memory equals its token-by-token reference, its exact reductions (online rule,
linear attention, frozen memory), test-time learning, causality of every variant, decode == full forward ('lmm',
'mag', 'mal'; 'mac' raises), jit + gradients, bad options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn import functional as F
from attn.linear.titans_memory import continue_memory, memory_apply, neural_memory

B, T, H, D = 2, 11, 3, 4


def _rand(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _problem(depth, seed=0, hidden=6):
    """Memory inputs with l2-normalised keys, gates in (0, 1), and initial weights for an MLP of `depth` layers."""
    rng = np.random.default_rng(seed)
    q, k, v = _rand(rng, B, T, H, D), _rand(rng, B, T, H, D), _rand(rng, B, T, H, D)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    alpha = jax.nn.sigmoid(_rand(rng, B, T, H) - 2)
    eta = jax.nn.sigmoid(_rand(rng, B, T, H) + 1)
    theta = 0.3 * jax.nn.sigmoid(_rand(rng, B, T, H))
    dims = [D] + [hidden] * (depth - 1) + [D]
    weights = tuple(_rand(rng, H, dims[i], dims[i + 1]) / np.sqrt(dims[i]) for i in range(depth))
    return (q, k, v, alpha, eta, theta), weights


@pytest.mark.parametrize("depth", [1, 2])
def test_chunked_form_equals_the_recurrent_reference_for_every_chunk_size(depth):
    """Given chunk-start gradients, momentum, forgetting and per-token retrieval are exact: outputs and final
    (weights, momentum) agree with the token-by-token scan for chunk 1 and for chunk 4 (11 tokens: 4 + 4 + 3)."""
    args, weights = _problem(depth)
    momentum = tuple(0.1 * w for w in weights)
    for chunk in (1, 4):  # 4 leaves a shorter last chunk
        kwargs = dict(initial_weights=weights, initial_momentum=momentum, chunk_size=chunk, return_state=True)
        y_chunked, state_chunked = neural_memory(*args, form="chunked", **kwargs)
        y_recurrent, state_recurrent = neural_memory(*args, form="recurrent", **kwargs)
        np.testing.assert_allclose(y_chunked, y_recurrent, atol=1e-5)
        for a, b in zip(jax.tree.leaves(state_chunked), jax.tree.leaves(state_recurrent), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_chunk_one_is_the_papers_online_rule_and_larger_chunks_approximate_it():
    """chunk_size=1 is eqs. 13-14 exactly (hand-written loop for a linear memory, row convention M(k) = k W);
    chunk_size > 1 takes gradients at the chunk-start memory, which changes the result even for a linear memory."""
    (q, k, v, alpha, eta, theta), (w0,) = _problem(1)
    w = jnp.broadcast_to(w0, (B,) + w0.shape)
    s = jnp.zeros_like(w)
    expected = []
    for t in range(T):
        kt, vt = k[:, t], v[:, t]  # [B, H, D]
        grad = 2.0 * jnp.einsum("bhi,bho->bhio", kt, jnp.einsum("bhi,bhio->bho", kt, w) - vt)
        s = eta[:, t, :, None, None] * s - theta[:, t, :, None, None] * grad
        w = (1.0 - alpha[:, t, :, None, None]) * w + s
        expected.append(jnp.einsum("bhi,bhio->bho", q[:, t], w))
    expected = jnp.stack(expected, axis=1)
    online = neural_memory(q, k, v, alpha, eta, theta, initial_weights=(w0,), chunk_size=1)
    np.testing.assert_allclose(online, expected, atol=1e-5)
    chunked = neural_memory(q, k, v, alpha, eta, theta, initial_weights=(w0,), chunk_size=4)
    np.testing.assert_allclose(chunked[:, :1], expected[:, :1], atol=1e-5)  # the first token has no earlier one
    assert float(jnp.max(jnp.abs(chunked - expected))) > 1e-3, "chunking is an approximation of the online rule"


def test_linear_memory_without_momentum_and_forgetting_reduces_to_linear_attention_and_the_delta_rule():
    (q, k, v, _, _, theta), _ = _problem(1)
    zeros = jnp.zeros((B, T, H))
    w0 = (jnp.zeros((H, D, D)),)
    # One chunk, M_0 = 0: every gradient is -2 k_i^T v_i, so y_t = sum_{i<=t} 2 theta_i (q_t . k_i) v_i.
    one_chunk = neural_memory(q, k, v, zeros, zeros, theta, initial_weights=w0, chunk_size=T)
    reference = F.linear_attention(q, k, 2.0 * theta[..., None] * v, causal=True, form="quadratic")
    np.testing.assert_allclose(one_chunk, reference, atol=1e-5)
    # Chunk 1: W_t = W_{t-1} - 2 theta_t k_t^T (k_t W_{t-1} - v_t), the delta rule with beta = 2 theta.
    w, expected = jnp.zeros((B, H, D, D)), []
    for t in range(T):
        kt = k[:, t]
        error = jnp.einsum("bhi,bhio->bho", kt, w) - v[:, t]
        w = w - 2.0 * theta[:, t, :, None, None] * jnp.einsum("bhi,bho->bhio", kt, error)
        expected.append(jnp.einsum("bhi,bhio->bho", q[:, t], w))
    delta_rule = neural_memory(q, k, v, zeros, zeros, theta, initial_weights=w0, chunk_size=1)
    np.testing.assert_allclose(delta_rule, jnp.stack(expected, axis=1), atol=1e-5)


def test_theta_zero_keeps_the_memory_at_its_initial_weights():
    (q, k, v, _, eta, _), weights = _problem(2)
    zeros = jnp.zeros((B, T, H))
    for chunk in (1, 4):
        y = neural_memory(q, k, v, zeros, eta, zeros, initial_weights=weights, chunk_size=chunk)
        batched = tuple(jnp.broadcast_to(w, (B,) + w.shape) for w in weights)
        expected = jnp.swapaxes(memory_apply(batched, jnp.swapaxes(q, 1, 2)), 1, 2)
        np.testing.assert_allclose(y, expected, atol=1e-5)


@pytest.mark.parametrize("depth", [1, 2])
def test_the_memory_learns_at_test_time(depth):
    """After seeing 4 (k, v) pairs repeatedly, retrieval M(k) approaches v: the loss on those keys ends far below
    that of the initial memory, and the error of the last pass over the pairs is well below that of the first."""
    rng = np.random.default_rng(3)
    pairs, passes = 4, 8
    k = _rand(rng, 1, pairs, H, D)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = 0.5 * _rand(rng, 1, pairs, H, D)
    _, weights = _problem(depth, seed=4)
    keys, values = jnp.tile(k, (1, passes, 1, 1)), jnp.tile(v, (1, passes, 1, 1))
    shape = keys.shape[:3]
    alpha, eta, theta = jnp.zeros(shape), jnp.full(shape, 0.5), jnp.full(shape, 0.2)
    _, (final, _) = neural_memory(
        keys, keys, values, alpha, eta, theta, initial_weights=weights, chunk_size=pairs, return_state=True
    )
    # Retrieval at every step: the error on the pair seen at step t, read right after it was written.
    y = neural_memory(keys, keys, values, alpha, eta, theta, initial_weights=weights, chunk_size=pairs)
    per_pass = jnp.mean(jnp.square(y - values).reshape(passes, -1), axis=1)
    batched = tuple(w[None] for w in weights)
    init_loss = jnp.mean(jnp.square(memory_apply(batched, jnp.swapaxes(k, 1, 2)) - jnp.swapaxes(v, 1, 2)))
    final_loss = jnp.mean(jnp.square(memory_apply(final, jnp.swapaxes(k, 1, 2)) - jnp.swapaxes(v, 1, 2)))
    assert float(final_loss) < 0.5 * float(init_loss)
    assert float(per_pass[-1]) < 0.6 * float(per_pass[0]), per_pass


def _layer(variant, **options):
    return attn.build(
        "titans", num_heads=4, head_dim=8, variant=variant, chunk_size=3, window=3, segment_size=4, **options
    )


def _gap(apply, x, changed, upto):
    before, after = apply(x), apply(changed)
    return float(jnp.max(jnp.abs(before[:, :upto] - after[:, :upto]))), float(
        jnp.max(jnp.abs(before[:, upto:] - after[:, upto:]))
    )


@pytest.mark.parametrize("variant", ["mag", "mal", "lmm"])
def test_every_variant_is_causal(layer_checks, variant):
    c = layer_checks
    layer = _layer(variant, num_kv_heads=2 if variant != "lmm" else None)
    x = c.inputs()
    variables = c.init(layer, x)
    apply = jax.jit(lambda inputs: layer.apply(variables, inputs, mask=c.CAUSAL))
    noise = jnp.asarray(np.random.default_rng(7).standard_normal(x.shape), x.dtype)
    past, future = _gap(apply, x, x.at[:, 6:].set(noise[:, 6:]), 6)
    assert past < 1e-5 and future > 1e-4


def test_mac_is_causal_and_carries_memory_across_segments(layer_checks):
    """Segments of 4: changing tokens >= 6 leaves outputs < 6 unchanged; attention in MAC sees only its segment
    (and the persistent tokens), so a change at token 1 (segment 0) reaches segment 2 (tokens 8..10) only through
    the memory carried across segments (a memory reset per segment would fail this)."""
    c = layer_checks
    layer = _layer("mac", num_kv_heads=2)
    x = c.inputs()
    variables = c.init(layer, x)
    apply = jax.jit(lambda inputs: layer.apply(variables, inputs, mask=c.CAUSAL))
    noise = jnp.asarray(np.random.default_rng(7).standard_normal(x.shape), x.dtype)
    past, future = _gap(apply, x, x.at[:, 6:].set(noise[:, 6:]), 6)
    assert past < 1e-5 and future > 1e-4
    _, later_segment = _gap(apply, x, x.at[:, 1].add(1.0), 8)
    assert later_segment > 1e-5


def test_jit_and_finite_gradients(layer_checks):
    c = layer_checks
    layer = _layer("mac", memory_depth=2)
    x = c.inputs(length=9)
    variables = c.init(layer, x)

    @jax.jit
    def loss_and_grad(params):
        return jax.value_and_grad(lambda p: jnp.sum(jnp.square(layer.apply({"params": p}, x, mask=c.CAUSAL))))(params)

    value, grads = loss_and_grad(variables["params"])
    assert np.isfinite(float(value))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    for name in ("memory_0", "memory_1", "gates", "update_key", "persistent"):
        assert float(jnp.max(jnp.abs(jax.tree.leaves(grads[name])[0]))) > 0, name


@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "lmm"])
def test_attention_dropout_is_off_when_deterministic(layer_checks, variant):
    """dropout_rate=0.1 with deterministic=True is the dropout_rate=0 layer bit for bit (same parameters); in
    training (deterministic=False, a "dropout" rng) the attention of the variants that have one changes."""
    c = layer_checks
    x = c.inputs(length=9)
    variables = c.init(_layer(variant), x)
    plain = c.forward(_layer(variant), variables, x)
    dropped = _layer(variant, dropout_rate=0.1)
    np.testing.assert_array_equal(np.asarray(c.forward(dropped, variables, x, deterministic=True)), np.asarray(plain))
    if variant != "lmm":  # 'lmm' has no attention
        training = c.forward(dropped, variables, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
        assert float(jnp.max(jnp.abs(training - plain))) > 1e-4


def test_continue_memory_in_pieces_equals_the_chunked_form():
    """Resuming the token scan from (weights, momentum, chunk-start snapshot) in pieces 3 + 1 + 5 + 2 (chunk 4:
    pieces cross chunk boundaries mid-chunk) gives neural_memory's chunked outputs and final state."""
    args, weights = _problem(2, seed=5)
    y_full, (w_full, s_full) = neural_memory(*args, initial_weights=weights, chunk_size=4, return_state=True)
    batched = tuple(jnp.broadcast_to(w, (B,) + w.shape) for w in weights)
    state, outs, start = (batched, tuple(jnp.zeros_like(w) for w in batched), batched), [], 0
    for size in (3, 1, 5, 2):
        piece = tuple(a[:, start : start + size] for a in args)
        y, state = continue_memory(*piece, state=state, start=start, chunk_size=4)
        outs.append(y)
        start += size
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), y_full, atol=1e-5)
    for a, b in zip(jax.tree.leaves(state[:2]), jax.tree.leaves((w_full, s_full)), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def _decode_jitted(layer, variables, x, chunks, mask):
    """Like layer_checks.decode_in_chunks, with the step jitted (one compile per piece size, not per call)."""
    cache = layer.init(jax.random.key(1), x, mask=mask, decode=True)["cache"]
    step = jax.jit(
        lambda c, piece: layer.apply({**variables, "cache": c}, piece, mask=mask, decode=True, mutable=["cache"])
    )
    outs, start = [], 0
    for size in chunks:
        y, mutated = step(cache, x[:, start : start + size])
        outs.append(y)
        cache, start = mutated["cache"], start + size
    assert start == x.shape[1]
    return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize(
    "variant, chunks, persistent",
    [("lmm", (1,) * 11, 0), ("mag", (5,) + (1,) * 6, 4), ("mal", (5,) + (1,) * 6, 4)],
)
def test_decode_token_by_token_and_after_a_prefill_equals_the_full_forward(layer_checks, variant, chunks, persistent):
    """chunk_size=4: memory chunks start at positions 0, 4, 8, 12 of P || x. With 4 persistent tokens the first
    step (persistent tokens + x_0..x_4 = positions 4..8) ends mid-chunk and the single steps after it cross the
    boundary at 12; window=3 < 11 makes the sliding window (and the always-visible persistent keys) matter.
    'lmm' (no persistent tokens) decodes token by token from the start."""
    c = layer_checks
    layer = attn.build(
        "titans",
        num_heads=4,
        head_dim=8,
        variant=variant,
        chunk_size=4,
        window=3,
        num_kv_heads=2,
        num_persistent=persistent,
    )
    x = c.inputs()
    variables = c.init(layer, x)
    full = jax.jit(lambda inputs: layer.apply(variables, inputs, mask=c.CAUSAL))(x)
    decoded, cache = _decode_jitted(layer, variables, x, chunks, c.CAUSAL)
    np.testing.assert_allclose(decoded, full, atol=2e-5, rtol=2e-5)
    assert int(cache["cache_index"]) == persistent + 11  # positions of [P || x] seen
    assert cache["memory_snapshot_1"].shape == (2, 4, 16, 8)
    if variant != "lmm":
        assert cache["cached_key"].shape == (2, persistent + 11, 2, 8)  # [P || x]


def test_mac_decode_raises():
    layer = _layer("mac")
    x = jnp.ones((1, 4, 16))
    with pytest.raises(ValueError, match="decode=True is not supported by titans variant='mac'"):
        layer.init(jax.random.key(0), x, mask=attn.Mask(causal=True), decode=True)


def test_registry_spec():
    spec = attn.get("titans")
    assert (spec.family, spec.catalog, spec.supports_causal, spec.supports_decode) == ("linear", 8, True, True)
    assert "all but 'mac'" in spec.options["variant"].doc
    assert spec.paper == "Titans: Learning to Memorize at Test Time"
    assert spec.options["variant"].default == "mag"


def test_bad_options_and_calls_raise(layer_checks):
    c = layer_checks
    x = c.inputs(length=4)
    cases = [
        (dict(variant="mat"), c.CAUSAL, {}, "variant='mat' must be one of"),
        (dict(memory_depth=0), c.CAUSAL, {}, "memory_depth=0 must be a positive int"),
        (dict(segment_size=2.5), c.CAUSAL, {}, "segment_size=2.5 must be a positive int"),
        (dict(num_persistent=-1), c.CAUSAL, {}, "num_persistent=-1 must be a non-negative int"),
        (dict(theta_max=0.0), c.CAUSAL, {}, "theta_max=0.0 must be a number > 0"),
        ({}, None, {}, "titans is causal only"),
        ({}, attn.Mask(causal=True, window=2), {}, "cannot honour the mask part"),
        (dict(variant="lmm"), attn.Mask(causal=True, q_lengths=jnp.array([4, 4])), dict(decode=True), "q_lengths"),
    ]
    for options, mask, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            attn.build("titans", num_heads=4, head_dim=8, **options).init(jax.random.key(0), x, mask=mask, **kwargs)
    (q, k, v, alpha, eta, theta), weights = _problem(1)
    with pytest.raises(ValueError, match="chunk_size=0 must be a positive int"):
        neural_memory(q, k, v, alpha, eta, theta, initial_weights=weights, chunk_size=0)
    with pytest.raises(ValueError, match="form='scan' is not supported"):
        neural_memory(q, k, v, alpha, eta, theta, initial_weights=weights, form="scan")
    with pytest.raises(ValueError, match="theta has shape"):
        neural_memory(q, k, v, alpha, eta, theta[:, :3], initial_weights=weights)
    with pytest.raises(ValueError, match="must chain Dk=4"):
        neural_memory(q, k, v, alpha, eta, theta, initial_weights=(jnp.zeros((H, 3, D)),))
