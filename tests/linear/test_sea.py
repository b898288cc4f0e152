"""`sea`: the whole layer (Performer estimate, encoder, CNN decoder, compressed top-k, sparse softmax, scales and
average context) against a float64 numpy reference written from the paper's and the official code's equations with
explicit loops; the selection by hand; decode == forward; causality; the training loss and what it trains;
gradients; errors."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import attn
from attn.linear.sea import (
    key_columns,
    max_selected_keys,
    orthogonal_features,
    sea_distillation_loss,
    sea_sparse_attention,
    select_keys,
)

CAUSAL = attn.Mask(causal=True)
OPTIONS = dict(num_heads=4, head_dim=4, num_kv_heads=2, top_k=3, compressed_length=8, position="none")


def round_half_up(x):
    return int(math.floor(x + 0.5))


def spans(length, columns):
    """Keys of each compressed column of a row that sees `length` keys: [round(c L / M), round((c+1) L / M))."""
    return [
        range(round_half_up(c * length / columns), round_half_up((c + 1) * length / columns)) for c in range(columns)
    ]


def selected_keys(estimate_row, length, top_k):
    """The row's kept columns (largest estimate first, ties to the lower column) decompressed to keys."""
    columns = len(estimate_row)
    if length == 0:
        return []
    kept = min(max(round_half_up(top_k * columns / length), 1), columns)
    order = np.argsort(-np.asarray(estimate_row), kind="stable")[:kept]
    cols = spans(length, columns)
    return sorted(j for c in order for j in cols[c])


def layer_norm(x, p, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def conv3x3(image, p, causal):
    """Dilation-2 3x3 convolution of image [B, T, W, C] with zero padding; causal rows use t-4, t-2, t."""
    kernel, bias = p["kernel"], p["bias"]
    batch, length, width, _ = image.shape
    out = np.zeros((batch, length, width, kernel.shape[-1])) + bias
    for t in range(length):
        for w in range(width):
            for a in range(3):
                for c in range(3):
                    tt = t + (2 * a - 4 if causal else 2 * a - 2)
                    ww = w + 2 * c - 2
                    if 0 <= tt < length and 0 <= ww < width:
                        out[:, t, w] += image[:, tt, ww] @ kernel[a, c]
    return out


def numpy_sea(x, params, *, causal, heads=4, kv_heads=2, dim=4, columns=8, top_k=3):
    """SEA from its equations (module docstring; official perlin_attention) in float64 with explicit loops."""
    x = np.asarray(x, np.float64)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(params))
    q, k, v = (np.einsum("bte,ehd->bthd", x, p[n]["kernel"]) for n in ("query", "key", "value"))
    batch, length = x.shape[:2]
    group = heads // kv_heads
    features = max(dim, int(dim * math.log(dim)))
    w = np.asarray(orthogonal_features(features, dim, 0), np.float64)

    def phi(y):
        y = y * dim**-0.25
        if causal:
            return np.maximum(y @ w.T, 0.0) + 1e-3
        return np.exp(y @ w.T - 0.5 * np.sum(y * y, -1, keepdims=True)) / np.sqrt(features)

    if causal:
        code = np.broadcast_to(p["value_positions"][:length], (batch, length, dim))
    else:
        where = np.arange(length)[:, None] * (dim - 1) / (length - 1)
        code = np.broadcast_to(np.maximum(0.0, 1.0 - np.abs(where - np.arange(dim))), (batch, length, dim))
    enc_in = np.zeros((batch, length, heads, 3 * dim))
    for b in range(batch):
        for h in range(heads):
            g = h // group
            for i in range(length):
                visible = range(i + 1) if causal else range(length)
                weights = np.array([phi(q[b, i, h]) @ phi(k[b, j, g]) for j in visible])
                values = np.array([np.concatenate([code[b, j], v[b, j, g]]) for j in visible])
                enc_in[b, i, h] = np.concatenate([weights @ values / weights.sum(), v[b, i, g]])
    hidden = layer_norm(enc_in @ p["encoder"]["kernel"] + p["encoder"]["bias"], p["encoder_norm"])
    hidden = 0.5 * hidden * (1.0 + np.vectorize(math.erf)(hidden / np.sqrt(2.0)))  # exact GELU
    rows = hidden @ p["decoder_rows"]["kernel"] + p["decoder_rows"]["bias"]  # [B, T, H, 2 W]
    width = rows.shape[-1] // 2
    image = np.zeros((batch, length, width, 2 * heads))
    for h in range(heads):
        for ch in range(2):
            image[:, :, :, 2 * h + ch] = rows[:, :, h, ch * width : (ch + 1) * width]
    image = np.moveaxis(layer_norm(np.moveaxis(image, 2, 3), p["decoder_norm_in"]), 3, 2)
    image = np.maximum(conv3x3(image, p["decoder_conv1"], causal), 0.0)
    image = np.maximum(conv3x3(image, p["decoder_conv2"], causal), 0.0)
    upsampled = np.repeat(image, 4, axis=2)[:, :, :columns]
    scores = upsampled @ p["decoder_conv_out"]["kernel"][0, 0] + p["decoder_conv_out"]["bias"]  # [B, T, M, H]
    scores = layer_norm(np.moveaxis(scores, 3, 2), p["decoder_norm_out"])  # [B, T, H, M]
    estimate = np.exp(scores - scores.max(-1, keepdims=True))
    estimate /= estimate.sum(-1, keepdims=True)
    gates = 1.0 / (1.0 + np.exp(-(hidden @ p["scales"]["kernel"] + p["scales"]["bias"])))
    out = np.zeros((batch, length, heads, dim))
    for b in range(batch):
        for h in range(heads):
            g = h // group
            mass = estimate[b, :, h].mean(0)
            for i in range(length):
                visible = i + 1 if causal else length
                keys = selected_keys(estimate[b, i, h], visible, top_k)
                logits = np.array([q[b, i, h] @ k[b, j, g] / np.sqrt(dim) for j in keys])
                probs = np.exp(logits - logits.max())
                sparse = (probs / probs.sum()) @ v[b, keys, g]
                if causal:
                    average = v[b, :visible, g].mean(0)
                else:
                    per_key = np.zeros(length)
                    for c, members in enumerate(spans(length, columns)):
                        for j in members:
                            per_key[j] = mass[c] / len(members)
                    average = (per_key / per_key.sum()) @ v[b, :, g]
                scale, mix = gates[b, i, h]
                out[b, i, h] = mix * scale * sparse + (1.0 - mix) * average
    return np.einsum("bthd,hde->bte", out, p["out"]["kernel"]), scores


def inputs(batch=2, length=11, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, length, 16)), jnp.float32)


def init(layer, x, mask):
    return {"params": layer.init(jax.random.key(1), x, mask=mask)["params"]}


@pytest.mark.parametrize("causal", [True, False])
def test_layer_equals_the_numpy_reference(causal):
    layer = attn.build("sea", **OPTIONS)
    x = inputs()
    mask = CAUSAL if causal else None
    variables = init(layer, x, mask)
    y, state = layer.apply(variables, x, mask=mask, mutable=["intermediates"])
    want, scores = numpy_sea(x, variables["params"], causal=causal)
    np.testing.assert_allclose(y, want, atol=5e-5, rtol=5e-5)
    (weights,) = state["intermediates"]["attention_weights"]
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)  # the sparse softmax rows
    assert float(jnp.max(jnp.sum(weights > 0, -1))) <= max_selected_keys(11, 8, 3)
    assert scores.shape == (2, 11, 4, 8)


def test_selection_by_hand():
    """select_keys lists exactly the keys of each row's b = round(k M / L) columns of largest estimate."""
    rng = np.random.default_rng(3)
    estimate = jnp.asarray(rng.random((2, 13, 3, 5)), jnp.float32)
    lengths = jnp.asarray(np.stack([np.arange(1, 14), np.minimum(np.arange(1, 14), 9)]), jnp.int32)
    keys, valid = select_keys(estimate, lengths, top_k=4, kv_len=13)
    assert keys.shape[-1] == max_selected_keys(13, 5, 4)
    for b in range(2):
        for h in range(3):
            for i in range(13):
                got = sorted(int(j) for j, ok in zip(keys[b, h, i], valid[b, h, i], strict=True) if ok)
                assert got == selected_keys(estimate[b, i, h], int(lengths[b, i]), 4), (b, h, i)
    for length in (1, 3, 5, 7, 13):
        columns = np.asarray(key_columns(jnp.asarray(length), 13, 5))
        for c, members in enumerate(spans(length, 5)):
            assert all(columns[j] == c for j in members)


def test_selection_bound_is_tight_and_linear():
    """K, the static number of key slots per row, stops growing with S (about 1.5 top_k): memory linear in T."""
    assert max_selected_keys(1000, 128, 64) == max_selected_keys(4096, 128, 64) <= 2 * 64
    assert max_selected_keys(11, 8, 3) < 11


def test_sparse_stage_is_exact_softmax_on_the_selection():
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(1, 9, 2, 4), (1, 9, 1, 4), (1, 9, 1, 4)])
    estimate = jnp.asarray(rng.random((1, 9, 2, 4)), jnp.float32)
    out, aux = sea_sparse_attention(q, k, v, estimate, top_k=2, causal=True)
    for h in range(2):
        for i in range(9):
            keys = selected_keys(estimate[0, i, h], i + 1, 2)
            logits = np.asarray(k[0, keys, 0]) @ np.asarray(q[0, i, h]) / 2.0
            probs = np.exp(logits - logits.max())
            np.testing.assert_allclose(out[0, i, h], probs / probs.sum() @ np.asarray(v[0, keys, 0]), atol=1e-5)


def test_decode_equals_full_forward_and_is_causal():
    layer = attn.build("sea", **{**OPTIONS, "position": "rope"})
    x = inputs()
    variables = init(layer, x, CAUSAL)
    forward = jax.jit(lambda p, x: layer.apply(p, x, mask=CAUSAL))
    step = jax.jit(lambda p, x: layer.apply(p, x, mask=CAUSAL, decode=True, mutable=["cache"]))
    shapes = jax.eval_shape(lambda x: layer.init(jax.random.key(1), x, mask=CAUSAL, decode=True)["cache"], x)
    cache, outs, start = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), [], 0
    assert cache["decoder_rows"].shape == (2, 8, 2, 8)  # the decoder's last 8 rows: [B, 8, ceil(M/4), 2 H]
    for size in (5, 1, 5):
        y, mutated = step({**variables, "cache": cache}, x[:, start : start + size])
        outs.append(y)
        cache, start = mutated["cache"], start + size
    full = forward(variables, x)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5, rtol=2e-5)
    after = forward(variables, x.at[:, 7:].set(0.5))
    np.testing.assert_allclose(after[:, :7], full[:, :7], atol=1e-6)
    assert float(jnp.abs(after[:, 7:] - full[:, 7:]).max()) > 1e-4


def test_distillation_loss_formula():
    """0.1 KL(teacher || resized estimate) + MSE(resized estimate, teacher) + MSE(outputs), by hand."""
    rng = np.random.default_rng(5)
    scores = rng.standard_normal((1, 5, 2, 3))
    lengths = np.arange(1, 6)[None]
    teacher = np.tril(rng.random((1, 2, 5, 5)))
    teacher /= teacher.sum(-1, keepdims=True)
    out, teacher_out = rng.standard_normal((2, 1, 5, 2, 4))
    student = np.zeros((1, 2, 5, 5))
    for h in range(2):
        for i in range(5):
            column_of = {j: c for c, members in enumerate(spans(i + 1, 3)) for j in members}
            row = np.array([np.exp(scores[0, i, h, column_of[j]]) for j in range(i + 1)])
            student[0, h, i, : i + 1] = row / row.sum()
    safe = np.where(teacher > 0, teacher, 1.0)
    kl = np.sum(np.where(teacher > 0, teacher * np.log(safe / np.where(teacher > 0, student, 1.0)), 0.0), -1).mean()
    want = 0.1 * kl + np.mean((student - teacher) ** 2) + np.mean((out - teacher_out) ** 2)
    arrays = [jnp.asarray(a, jnp.float32) for a in (scores, teacher, out, teacher_out)]
    got = sea_distillation_loss(arrays[0], jnp.asarray(lengths, jnp.int32), *arrays[1:])
    assert float(got) == pytest.approx(want, rel=1e-5)


@pytest.mark.slow  # trains the estimator: ~20-35 s on 2 cores
def test_distillation_trains_only_the_estimator_and_lowers_the_loss():
    layer = attn.build("sea", **{**OPTIONS, "distill": True})
    x = inputs(batch=1, length=8)
    params = init(layer, x, CAUSAL)["params"]
    estimator = {"encoder", "encoder_norm", "decoder_rows", "decoder_norm_in", "decoder_conv1", "decoder_conv2"}
    estimator |= {"decoder_conv_out", "decoder_norm_out", "scales", "value_positions"}
    assert set(params) == estimator | {"query", "key", "value", "out"}

    def distillation(p):
        _, state = layer.apply({"params": p}, x, mask=CAUSAL, mutable=["losses"])
        return state["losses"]["sea_distillation"][0]

    value_and_grad = jax.jit(jax.value_and_grad(distillation))
    loss, grads = value_and_grad(params)
    norms = {name: float(optax.tree.norm(g)) for name, g in nn.unbox(grads).items()}
    assert all(norms[name] == 0.0 for name in ("query", "key", "value", "out"))
    assert all(norms[name] > 0.0 for name in ("encoder", "decoder_rows", "decoder_conv1", "scales"))
    optimizer = optax.adam(0.05)
    state = optimizer.init(params)
    for _ in range(5):  # Adam steps on the sown loss lower it: the estimator moves towards the teacher
        _, grads = value_and_grad(params)
        updates, state = optimizer.update(grads, state)
        params = optax.apply_updates(params, updates)
    assert float(value_and_grad(params)[0]) < 0.95 * float(loss)


def test_gradients_match_finite_differences():
    """Finite differences w.r.t. the estimator's scales and encoder and the value/output projections (the selection,
    a discrete top-k, stays put under these perturbations). float32: the estimator and the sparse softmax compute in
    float32 whatever the input dtype, so float64 differences would only measure float32 rounding."""
    layer = attn.build("sea", **OPTIONS)
    x = inputs(batch=1, length=6)
    params = nn.unbox(init(layer, x, CAUSAL)["params"])
    wrt = {name: params[name] for name in ("scales", "value", "out", "encoder")}

    @jax.jit
    def loss(subset):
        return jnp.sum(jnp.sin(layer.apply({"params": {**params, **subset}}, x, mask=CAUSAL)))

    check_grads(loss, (wrt,), order=1, modes=("rev",), atol=2e-2, rtol=2e-2)


@pytest.mark.slow  # ~15-30 s on 2 cores; the matrix checks sea's other gradients
def test_query_and_key_gradients_match_finite_differences():
    """float64, w.r.t. the query and key projections, with a 1e-4 step: q and k pass the causal Performer's ReLU
    features, whose kinks a 1e-3 step crosses (the registry matrix checks the other parameters)."""
    with jax.enable_x64(True):
        layer = attn.build("sea", **OPTIONS, dtype=jnp.float64, param_dtype=jnp.float64)
        x = inputs(batch=1, length=6).astype(jnp.float64)
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), nn.unbox(init(layer, x, CAUSAL)["params"]))

        @jax.jit
        def loss(subset):
            return jnp.sum(jnp.sin(layer.apply({"params": {**params, **subset}}, x, mask=CAUSAL)))

        wrt = {name: params[name] for name in ("query", "key")}
        check_grads(loss, (wrt,), order=1, modes=("rev",), eps=1e-4, atol=5e-3, rtol=5e-3)


def test_errors_name_the_problem():
    x = jnp.zeros((1, 5, 16))
    build = lambda **o: attn.build("sea", num_heads=4, head_dim=8, **o)  # noqa: E731
    with pytest.raises(ValueError, match="top_k=0"):
        build(top_k=0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="feature_map='softmax'"):
        build(feature_map="softmax").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="sea cannot honour the mask part\\(s\\) window"):
        build().init(jax.random.key(0), x, mask=attn.Mask(window=2))
    with pytest.raises(ValueError, match="decode=True needs a causal mask"):
        build().init(jax.random.key(0), x, decode=True)
    with pytest.raises(ValueError, match="compressed_length=4"):
        build(compressed_length=4).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="max_positions=4"):
        build(max_positions=4).init(jax.random.key(0), x, mask=CAUSAL)
    with pytest.raises(ValueError, match="sea is self-attention"):
        build().init(jax.random.key(0), x, context=jnp.zeros((1, 3, 16)))
    q = jnp.zeros((1, 5, 4, 8))
    with pytest.raises(ValueError, match="estimate has shape"):
        sea_sparse_attention(q, q, q, jnp.zeros((1, 5, 3, 4)), top_k=2)
    spec = attn.get("sea")
    assert spec.supports_causal and spec.supports_decode and spec.catalog == 183
    assert spec.fidelity == "official-code"
