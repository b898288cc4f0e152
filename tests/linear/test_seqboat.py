"""`seqboat`: router forced on/off, gather/scatter == masking, local window == windowed softmax, EMA == linear
attention with a decay, causality, jit + gradients, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn import functional as F
from attn.linear.seqboat import compress_tokens, damped_ema, extract_tokens, local_window_attention

# rbg keys: XLA compiles a jitted init ~5x faster than with threefry keys.
KEY = jax.random.key(3, impl="rbg")
CAUSAL = attn.Mask(causal=True)
OPTIONS = dict(num_heads=1, head_dim=8, window=3, ema_dim=4)


def inputs(batch=2, length=11, features=16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, length, features)), jnp.float32)


def with_router_bias(params, skip_logit, activate_logit):
    """Router kernel 0 and a fixed bias: every token gets the same logits (all skipped or all activated). The GAU
    weights are scaled up from their 0.02-std init so that its contribution is O(1) and the identities are sharp."""
    inner = {
        k: v * 30.0 if k in ("gau_in_kernel", "gau_out_kernel", "gau_gamma") else v for k, v in params["params"].items()
    }
    inner["router_kernel"] = jnp.zeros_like(inner["router_kernel"])
    inner["router_bias"] = jnp.asarray([skip_logit, activate_logit], jnp.float32)
    return {"params": inner}


def test_router_forced_on_is_the_dense_gau_scaled_and_forced_off_is_the_skip_path():
    x = inputs()
    layer = attn.build("seqboat", **OPTIONS)
    dense = attn.build("seqboat", router="always", form="masked", **OPTIONS)  # the GAU on every token, no gather
    params = nn.unbox(jax.jit(lambda x: layer.init(KEY, x, mask=CAUSAL))(x))
    apply = jax.jit(lambda p, x: layer.apply(p, x, mask=CAUSAL))
    off = apply(with_router_bias(params, 5.0, -5.0), x)
    on_params = with_router_bias(params, -5.0, 5.0)
    on = apply(on_params, x)
    always = jax.jit(lambda p, x: dense.apply(p, x, mask=CAUSAL))(
        {"params": {k: v for k, v in on_params["params"].items() if not k.startswith("router")}}, x
    )
    # c = softmax([-5, 5] / tau)[1], tau = exp(log_tau) (1.0 * sqrt(16) at init).
    tau = float(jnp.exp(on_params["params"]["router_log_temperature"][0]))
    chosen = 1.0 / (1.0 + np.exp(-10.0 / tau))
    np.testing.assert_allclose(on - off, chosen * (always - off), atol=2e-5)
    assert float(jnp.abs(on - off).max()) > 0.1


def test_all_skipped_means_the_attention_path_contributes_nothing():
    x = inputs()
    layer = attn.build("seqboat", **OPTIONS)
    params = with_router_bias(nn.unbox(jax.jit(lambda x: layer.init(KEY, x, mask=CAUSAL))(x)), 5.0, -5.0)
    gau = {k for k in params["params"] if k.startswith("gau")}
    loss = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x, mask=CAUSAL) ** 2)))
    grads = loss(params)
    assert all(float(jnp.abs(grads["params"][name]).max()) == 0.0 for name in gau)
    changed = {"params": {k: (v + 1.0 if k in gau else v) for k, v in params["params"].items()}}
    apply = jax.jit(lambda p: layer.apply(p, x, mask=CAUSAL))
    np.testing.assert_array_equal(apply(params), apply(changed))


@pytest.mark.parametrize("causal", [True, False])
def test_compressed_gau_equals_masking_the_full_sequence(causal):
    """Gather -> local GAU -> scatter equals the masked reference (tokens attend to active tokens within w ranks)."""
    x = inputs(seed=1)
    mask = CAUSAL if causal else None
    layer = attn.build("seqboat", capacity=0.7, **OPTIONS)
    masked = attn.build("seqboat", capacity=0.7, form="masked", **OPTIONS)
    params = nn.unbox(jax.jit(lambda x: layer.init(KEY, x, mask=mask))(x))
    out, state = jax.jit(lambda p, x: layer.apply(p, x, mask=mask, mutable=["intermediates"]))(params, x)
    active = np.asarray(state["intermediates"]["activation"][0])
    assert 0 < active.sum() < active.size and np.all(active.sum(1) <= 8)  # mixed pattern, capacity ceil(0.7 * 11)
    np.testing.assert_allclose(out, jax.jit(lambda p, x: masked.apply(p, x, mask=mask))(params, x), atol=2e-5)


def test_compress_then_extract_is_masking():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((3, 9, 4)), jnp.float32)
    active = jnp.asarray(rng.random((3, 9)) < 0.5)
    packed, rank, count = jax.jit(compress_tokens)(x, active)
    np.testing.assert_array_equal(extract_tokens(packed, rank), jnp.where(active[..., None], x, 0.0))
    for b in range(3):  # order kept, active tokens first, zeros after
        kept = np.asarray(x[b])[np.asarray(active[b])]
        np.testing.assert_array_equal(packed[b, : int(count[b])], kept)
        assert np.all(np.asarray(packed[b, int(count[b]) :]) == 0)


@pytest.mark.parametrize(("causal", "window"), [(True, 3), (False, 2), (True, 20)])
def test_local_window_attention_is_windowed_softmax(causal, window):
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 10, 2, 4)), jnp.float32) for _ in range(3))
    lengths = jnp.asarray([10, 7])
    run = jax.jit(lambda q, k, v, n: local_window_attention(q, k, v, window=window, causal=causal, lengths=n))
    out = run(q, k, v, lengths)
    side = min(window, 10)
    mask = attn.Mask(causal=causal, window=(side, 0 if causal else side), q_lengths=lengths, kv_lengths=lengths)
    np.testing.assert_allclose(out, F.softmax_attention(q, k, v, mask=mask), atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_ema_is_linear_attention_with_one_feature_and_a_per_channel_decay(causal):
    """h_t = phi h_{t-1} + p beta x_t per (channel, n): linear attention with q = gamma sqrt(1/N), k = p beta, v = x,
    decay phi, one head per (channel, n); bidirectional adds the reversed pass."""
    rng = np.random.default_rng(4)
    width, n = 3, 2
    params = {
        name: jnp.asarray(rng.standard_normal((2 * width, n)), jnp.float32)
        for name in ("delta", "alpha", "beta", "gamma")
    }
    params["omega"] = jnp.asarray(rng.standard_normal(width), jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 9, width)), jnp.float32)

    def scan(x, rows):
        p = jax.nn.sigmoid(params["delta"][rows])
        phi = 1.0 - p * jax.nn.sigmoid(params["alpha"][rows])
        heads = width * n
        q = jnp.broadcast_to((params["gamma"][rows] * np.sqrt(1.0 / n)).reshape(1, 1, heads, 1), (2, 9, heads, 1))
        k = jnp.broadcast_to((p * params["beta"][rows]).reshape(1, 1, heads, 1), (2, 9, heads, 1))
        v = jnp.repeat(x, n, axis=-1)[..., None]
        out = F.linear_attention(q, k, v, causal=True, decay=phi.reshape(heads), form="recurrent")
        return out[..., 0].reshape(2, 9, width, n).sum(-1)

    expected = scan(x, slice(0, width)) + x * params["omega"]
    if not causal:
        expected = expected + jnp.flip(scan(jnp.flip(x, 1), slice(width, 2 * width)), 1)
    np.testing.assert_allclose(damped_ema(x, params, causal=causal), expected, atol=2e-5)


def test_causal_and_finite_gradients_under_jit():
    """Causality with a capacity cap (the cap counts only earlier activations); gradients in training mode with the
    Gumbel router reach the router (through c_t) and are finite."""
    x = inputs(length=13, seed=5)
    layer = attn.build("seqboat", router="gumbel", capacity=0.8, **{**OPTIONS, "num_heads": 2})
    params = nn.unbox(jax.jit(lambda x: layer.init(KEY, x, mask=CAUSAL))(x))
    forward = jax.jit(lambda p, x: layer.apply(p, x, mask=CAUSAL))
    full = forward(params, x)
    after = forward(params, x.at[:, 7:].set(0.5))
    np.testing.assert_allclose(after[:, :7], full[:, :7], atol=1e-6)
    assert float(jnp.abs(after[:, 7:] - full[:, 7:]).max()) > 1e-4
    rngs = {"dropout": jax.random.key(0, impl="rbg")}
    loss = lambda p: jnp.sum(layer.apply(p, x, mask=CAUSAL, deterministic=False, rngs=rngs) ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(loss))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["params"]["router_kernel"]).max()) > 0


def test_errors_name_the_problem():
    x = jnp.zeros((1, 5, 16))
    build = lambda **o: attn.build("seqboat", **{**OPTIONS, **o})  # noqa: E731
    with pytest.raises(ValueError, match="window=0 must be a positive int"):
        build(window=0).init(KEY, x)
    with pytest.raises(ValueError, match="router='topk' must be one of"):
        build(router="topk").init(KEY, x)
    with pytest.raises(ValueError, match="capacity=1.5 must be None or a number in"):
        build(capacity=1.5).init(KEY, x)
    with pytest.raises(ValueError, match="hidden_dim=7 must be a positive int divisible by num_heads=2"):
        build(hidden_dim=7, num_heads=2).init(KEY, x)
    with pytest.raises(ValueError, match="seqboat supports only the mask part causal"):
        build().init(KEY, x, mask=attn.Mask(causal=True, window=2))
    with pytest.raises(ValueError, match="decode=True is not supported by seqboat"):
        build().init(KEY, x, mask=CAUSAL, decode=True)
    with pytest.raises(ValueError, match="2E when causal=False"):
        damped_ema(
            x,
            {n: jnp.zeros((16, 2)) for n in ("delta", "alpha", "beta", "gamma")} | {"omega": jnp.zeros(16)},
            causal=False,
        )
    spec = attn.get("seqboat")
    assert spec.supports_causal and not spec.supports_decode and spec.catalog == 3
