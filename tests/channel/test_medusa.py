"""`medusa`: a numpy re-implementation of the layout in the module docstring (loops over tokens and levels), the
exact half gate with zero heads, global context through the body, bad shapes, and training inside the CNN."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import attn
from attn.models.cnn import CNN


def layer_norm(z, scale, bias, eps=1e-6):
    mean = z.mean(-1, keepdims=True)
    var = ((z - mean) ** 2).mean(-1, keepdims=True)
    return (z - mean) / np.sqrt(var + eps) * scale + bias


def gelu(z):  # flax's default: the tanh approximation
    return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))


def reference(p, x, grid, levels, heads, head_dim):
    """MEDUSA's gate layout on x [B, H, W, C] in float64."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x = np.asarray(x, np.float64)
    batch, height, width, channels = x.shape

    def dense(z, name):
        layer = p[name] if name in p else p["body"][name]  # the body's layers live in the "body" submodule
        return z @ layer["kernel"] + layer["bias"]

    def pool(size):
        out = np.zeros((batch, size, size, channels))
        bh, bw = height // size, width // size
        for i in range(size):
            for j in range(size):
                out[:, i, j] = x[:, i * bh : (i + 1) * bh, j * bw : (j + 1) * bw].mean(axis=(1, 2))
        return out

    def up(z, h, w):
        out = np.zeros((batch, h, w, z.shape[-1]))
        for i in range(h):
            for j in range(w):
                out[:, i, j] = z[:, i * z.shape[1] // h, j * z.shape[2] // w]
        return out

    t = dense(pool(grid).reshape(batch, grid * grid, channels), "embed")
    n = layer_norm(t, p["body"]["attention_norm"]["scale"], p["body"]["attention_norm"]["bias"])
    q, k, v = (dense(n, name).reshape(batch, grid * grid, heads, head_dim) for name in ("query", "key", "value"))
    attended = np.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            for i in range(grid * grid):
                logits = np.array([q[b, i, h] @ k[b, j, h] for j in range(grid * grid)]) / np.sqrt(head_dim)
                w = np.exp(logits - logits.max())
                attended[b, i, h] = (w / w.sum()) @ v[b, :, h]
    t = t + dense(attended.reshape(batch, grid * grid, heads * head_dim), "out")
    n = layer_norm(t, p["body"]["mlp_norm"]["scale"], p["body"]["mlp_norm"]["bias"])
    t = t + dense(gelu(dense(n, "mlp_in")), "mlp_out")
    d = t.reshape(batch, grid, grid, -1)
    logits = np.zeros_like(x)
    for level in range(levels):
        if level:
            size = grid * 2**level
            d = up(d, size, size) + dense(pool(size), f"skip_{level}")
        logits += up(dense(d, f"head_{level}"), height, width)
    return x / (1 + np.exp(-logits))


def inputs(shape=(2, 8, 8, 6), seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("options", [{}, {"grid": 2, "levels": 3, "body_heads": 2, "body_head_dim": 3}])
def test_matches_the_numpy_layout(options):
    module = attn.build("medusa", **options)
    x = inputs()
    params = nn.unbox(module.init(jax.random.key(0), x)["params"])
    # non-zero biases, so every term is exercised
    params = jax.tree.map(
        lambda a: a + 0.1 * jnp.cos(jnp.arange(a.size).reshape(a.shape)) if a.ndim == 1 else a, params
    )
    full = {"grid": 4, "levels": 2, "body_heads": 4, "body_head_dim": 8, **options}
    want = reference(params, x, full["grid"], full["levels"], full["body_heads"], full["body_head_dim"])
    np.testing.assert_allclose(module.apply({"params": params}, x), want, atol=2e-5, rtol=2e-5)


def test_zero_heads_give_half_the_input():
    module = attn.build("medusa")
    x = inputs()
    params = nn.unbox(module.init(jax.random.key(0), x)["params"])
    for level in range(2):
        params[f"head_{level}"] = jax.tree.map(jnp.zeros_like, params[f"head_{level}"])
    np.testing.assert_allclose(module.apply({"params": params}, x), x / 2, rtol=1e-6)


def test_the_body_gives_every_position_global_context():
    """A change confined to one corner cell of the coarsest grid changes the gate in the opposite corner."""
    module = attn.build("medusa")
    x = inputs()
    variables = module.init(jax.random.key(0), x)
    changed = x.at[:, :2, :2].add(3.0)
    _, base = module.apply(variables, x, mutable=["intermediates"])
    _, after = module.apply(variables, changed, mutable=["intermediates"])
    gate, gate_after = base["intermediates"]["attention_map"][0], after["intermediates"]["attention_map"][0]
    assert float(jnp.max(jnp.abs(gate[:, 6:, 6:] - gate_after[:, 6:, 6:]))) > 1e-4
    weights = base["intermediates"]["body"]["attention_weights"][0]  # sown by the body submodule
    assert weights.shape == (2, 4, 16, 16)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)


def test_bad_shapes_and_options_raise():
    x = inputs((1, 12, 12, 4))
    with pytest.raises(ValueError, match=r"multiples of grid \* 2\^\(levels - 1\) = 8"):
        attn.build("medusa").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="grid=0"):
        attn.build("medusa", grid=0).init(jax.random.key(0), inputs())
    with pytest.raises(ValueError, match="feature map"):
        attn.build("medusa").init(jax.random.key(0), x[0])


def test_trains_inside_the_cnn():
    """A few Adam steps on one fixed batch of 16x16 images lower the CNN's loss (the medusa parameters move)."""
    model = CNN(num_classes=2, widths=(8, 16), attention="medusa", norm_groups=4)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((8, 16, 16, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 2, 8))
    params = nn.unbox(model.init(jax.random.key(0), images)["params"])
    assert "attention" in params["stage_1_block_0"] and "head_1" in params["stage_1_block_0"]["attention"]

    def loss_fn(p):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, images), labels).mean()

    optimizer = optax.adam(1e-2)
    state = optimizer.init(params)

    @jax.jit
    def step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = optimizer.update(grads, s, p)
        return loss, updates, s

    first = None
    current = params
    for _ in range(15):
        loss, updates, state = step(current, state)
        first = loss if first is None else first
        current = optax.apply_updates(current, updates)
    assert float(loss_fn(current)) < 0.5 * float(first)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), params, current)
    assert moved["stage_0_block_0"]["attention"]["head_0"]["kernel"] > 1e-3


def test_the_cnn_shares_one_body_across_its_blocks():
    """The paper's "single body, multi-scale heads": the CNN computes one body on its stem output and every block's
    heads read it; a block equals the layer given that body's tokens; share_attention_body=False gives every block
    its own body."""
    from attn.channel.medusa import MedusaBody

    model = CNN(num_classes=2, widths=(8, 16), attention="medusa", norm_groups=4, attention_options={"grid": 2})
    images = jnp.asarray(np.random.default_rng(1).standard_normal((2, 16, 16, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), images)
    params = nn.unbox(variables["params"])
    assert "medusa_body" in params and "query" in params["medusa_body"]
    for block in ("stage_0_block_0", "stage_1_block_0"):
        assert "body" not in params[block]["attention"] and "head_0" in params[block]["attention"]
    # Every block reads the same tokens: changing the body's attention output projection moves both blocks' gates.
    _, sown = model.apply(variables, images, mutable=["intermediates"])
    bumped = jax.tree.map(lambda a: a, params)
    bumped["medusa_body"]["out"]["kernel"] = bumped["medusa_body"]["out"]["kernel"] + 0.5
    _, sown_bumped = model.apply({"params": bumped}, images, mutable=["intermediates"])
    for block in ("stage_0_block_0", "stage_1_block_0"):
        gate = sown["intermediates"][block]["attention"]["attention_map"][0]
        assert np.abs(gate - sown_bumped["intermediates"][block]["attention"]["attention_map"][0]).max() > 1e-4
    # The stem's output through the body, then block 0's layer with those tokens, is block 0's gate.
    stem = nn.relu(
        nn.GroupNorm(num_groups=4).apply(
            {"params": params["stem_norm"]},
            nn.Conv(8, (3, 3), use_bias=False, padding="SAME").apply({"params": params["stem"]}, images),
        )
    )
    tokens = MedusaBody(grid=2).apply({"params": params["medusa_body"]}, stem)
    layer = attn.build("medusa", grid=2)
    block_in = sown["intermediates"]["stage_0_block_0"]["attention"]["attention_map"][0]
    assert block_in.shape == (2, 16, 16, 8)
    _, own = layer.apply(
        {"params": params["stage_0_block_0"]["attention"]},
        jnp.ones((2, 16, 16, 8)),
        body=tokens,
        mutable=["intermediates"],
    )
    # with x = 1 the gate depends on the body tokens and the skips of a constant map: recompute it in numpy
    p = jax.tree.map(np.asarray, params["stage_0_block_0"]["attention"])
    d = np.asarray(tokens, np.float64)
    logits = np.repeat(np.repeat(d @ p["head_0"]["kernel"] + p["head_0"]["bias"], 8, 1), 8, 2)
    d = np.repeat(np.repeat(d, 2, 1), 2, 2) + (np.ones((2, 4, 4, 8)) @ p["skip_1"]["kernel"] + p["skip_1"]["bias"])
    logits = logits + np.repeat(np.repeat(d @ p["head_1"]["kernel"] + p["head_1"]["bias"], 4, 1), 4, 2)
    np.testing.assert_allclose(own["intermediates"]["attention_map"][0], 1 / (1 + np.exp(-logits)), atol=1e-5)
    separate = CNN(
        num_classes=2,
        widths=(8, 16),
        attention="medusa",
        norm_groups=4,
        attention_options={"grid": 2},
        share_attention_body=False,
    )
    separate_params = nn.unbox(separate.init(jax.random.key(0), images)["params"])
    assert "medusa_body" not in separate_params and "body" in separate_params["stage_1_block_0"]["attention"]
    with pytest.raises(ValueError, match="different body options"):
        CNN(
            num_classes=2,
            widths=(8, 16),
            attention="medusa",
            norm_groups=4,
            attention_options=[{"grid": 2}, {"grid": 4}],
        ).init(jax.random.key(0), images)
    with pytest.raises(ValueError, match="body has shape"):
        layer.apply({"params": params["stage_0_block_0"]["attention"]}, jnp.ones((2, 16, 16, 8)), body=tokens[:, :1])
