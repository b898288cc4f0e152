"""DecoderLM: training step, causality, packed sequences, per-layer mechanisms, logical axes, captures."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import attn
from attn.models import DecoderLM, build_model

VOCAB, BATCH, LENGTH = 32, 2, 8


def small_decoder(**fields) -> DecoderLM:
    config = dict(vocab_size=VOCAB, num_layers=2, d_model=32, num_heads=4, mlp_dim=64)
    return DecoderLM(**{**config, **fields})


def tokens(seed: int = 0, shape=(BATCH, LENGTH)) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB)


@pytest.mark.parametrize(
    ("fields", "real_init"),
    [
        (dict(), True),
        (
            dict(norm="layernorm", mlp="gelu", tie_embeddings=False, position_embedding="learned", max_len=16),
            False,
        ),
    ],
    ids=["rmsnorm-swiglu-tied", "layernorm-gelu-untied-learned"],
)
def test_sgd_step_lowers_next_token_loss(fields, real_init, sgd_losses, quick_params):
    model = small_decoder(attention="softmax", num_layers=1, **fields)
    batch = tokens()
    if real_init:  # compiling the real init costs seconds on CPU, so one case pays for it
        params = jax.jit(model.init)(jax.random.key(1), batch)["params"]
    else:
        params = quick_params(model, batch)["params"]

    def loss_fn(params):
        logits = model.apply({"params": params}, batch[:, :-1])
        assert logits.shape == (BATCH, LENGTH - 1, VOCAB) and logits.dtype == jnp.float32
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    before, after = sgd_losses(loss_fn, params, lr=0.5)
    assert after < before


def test_build_model_kinds():
    model = build_model("decoder", vocab_size=VOCAB, num_layers=1, d_model=16, num_heads=2, mlp_dim=32)
    assert isinstance(model, DecoderLM) and model.attention == "softmax"
    with pytest.raises(
        ValueError,
        match=r"kind='gpt'.*\['cnn', 'ctr', 'decoder', 'detector', 'dit', 'encoder', 'encoder_decoder', 'mil', 'vit', 'vlm'\]",
    ):
        build_model("gpt")


def test_future_tokens_do_not_change_past_logits(quick_params, jit_apply):
    model = small_decoder()
    batch = tokens()
    params, apply = quick_params(model, batch), jit_apply(model)
    t = 4
    changed = batch.at[:, t + 1 :].set((batch[:, t + 1 :] + 7) % VOCAB)
    base, other = apply(params, batch), apply(params, changed)
    np.testing.assert_array_equal(base[:, : t + 1], other[:, : t + 1])
    assert not np.allclose(base[:, t + 1 :], other[:, t + 1 :])


def test_packed_segments_equal_separate_sequences(quick_params, jit_apply):
    model = small_decoder()
    params, apply = quick_params(model, tokens()), jit_apply(model)
    first, second = tokens(1, (1, 5)), tokens(2, (1, 3))
    packed = jnp.concatenate([first, second], axis=1)
    segment_ids = jnp.array([[1] * 5 + [2] * 3])
    positions = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2]])
    logits = apply(params, packed, segment_ids=segment_ids, positions=positions)
    # Each sequence alone, right-padded to the packed length (causality keeps the padding invisible).
    alone = jnp.concatenate([packed, jnp.concatenate([second, first], axis=1)], axis=0)
    expected = apply(params, alone)
    np.testing.assert_allclose(logits[0, :5], expected[0, :5], atol=1e-5)
    np.testing.assert_allclose(logits[0, 5:], expected[1, :3], atol=1e-5)


def test_per_layer_options_reach_their_layer(quick_params, jit_apply):
    options = [{"use_bias": True, "position": "rope"}, {"position": "alibi"}]
    model = small_decoder(attention=["softmax", "softmax"], attention_options=options)
    params = quick_params(model, tokens())
    assert "bias" in params["params"]["layers_0"]["attention"]["query"]
    assert "bias" not in params["params"]["layers_1"]["attention"]["query"]
    # The position option changes the function: layer 1 with rope instead of alibi changes the logits.
    both_rope = small_decoder(attention_options=[options[0], {"position": "rope"}])
    batch = tokens()
    assert not np.allclose(jit_apply(model)(params, batch), jit_apply(both_rope)(params, batch))


def test_per_layer_names_are_each_resolved():
    with pytest.raises(KeyError, match="no_such_mechanism"):
        jax.eval_shape(small_decoder(attention=["softmax", "no_such_mechanism"]).init, jax.random.key(0), tokens())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(attention=["softmax"] * 3), "attention has 3 entries but num_layers=2"),
        (dict(attention_options=[{}]), "attention_options has 1 entries but num_layers=2"),
        (dict(norm="batchnorm"), "norm='batchnorm'"),
        (dict(mlp="relu"), "mlp='relu'"),
        (dict(position_embedding="sinusoidal"), "position_embedding='sinusoidal'"),
        (dict(d_model=30), "d_model=30 is not divisible by num_heads=4"),
        (dict(attention_options={"num_heads": 2}), r"attention_options for 'softmax' set \['num_heads'\]"),
        (dict(position_embedding="learned", max_len=4), "sequence length 8 exceeds max_len=4"),
    ],
)
def test_bad_fields_raise_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(small_decoder(**fields).init, jax.random.key(0), tokens())


def test_non_sequence_mechanisms_are_rejected(monkeypatch):
    real_get = attn.get

    def fake_get(name):
        kinds = {"fake_channels": "channels", "fake_spatial": "spatial"}
        if name not in kinds:
            return real_get(name)
        return dataclasses.replace(real_get("softmax"), name=name, input_kind=kinds[name])

    monkeypatch.setattr(attn, "get", fake_get)
    with pytest.raises(ValueError, match="attention='fake_channels' has input kind 'channels'"):
        jax.eval_shape(small_decoder(attention="fake_channels").init, jax.random.key(0), tokens())
    with pytest.raises(ValueError, match="attention='fake_spatial' has input kind 'spatial'"):
        jax.eval_shape(small_decoder(attention="fake_spatial").init, jax.random.key(0), tokens())


@pytest.mark.parametrize(
    "fields", [dict(), dict(tie_embeddings=False, position_embedding="learned", norm="layernorm", mlp="gelu")]
)
def test_every_parameter_has_logical_axes_of_its_rank(fields, boxed_leaves):
    params = jax.eval_shape(small_decoder(**fields).init, jax.random.key(0), tokens())["params"]
    leaves = boxed_leaves(params)
    assert len(leaves) > 10
    for path, leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), path
        assert len(leaf.names) == leaf.value.ndim, (path, leaf.names, leaf.value.shape)
    specs = nn.get_partition_spec(params)
    assert specs["embedding"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
    assert specs["layers_0"]["feed_forward"]["wo"]["kernel"] == jax.sharding.PartitionSpec("mlp", "embed")


def test_attention_weights_are_sown_per_layer_and_are_causal_distributions(quick_params, jit_apply):
    model = small_decoder()
    batch = tokens()
    params, apply = quick_params(model, batch), jit_apply(model)
    logits, state = apply(params, batch, mutable=("intermediates",))
    np.testing.assert_allclose(logits, apply(params, batch), atol=1e-6)
    above_diagonal = np.triu(np.ones((LENGTH, LENGTH), bool), k=1)
    for i in range(2):
        (weights,) = state["intermediates"][f"layers_{i}"]["attention"]["attention_weights"]
        assert weights.shape == (BATCH, 4, LENGTH, LENGTH)
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
        assert np.all(np.asarray(weights)[..., above_diagonal] == 0)


def test_dropout_is_active_only_when_not_deterministic(quick_params, jit_apply):
    model = small_decoder(dropout_rate=0.5, num_layers=1)
    batch = tokens()
    params, apply = quick_params(model, batch), jit_apply(model)
    a = apply(params, batch, deterministic=False, rngs={"dropout": jax.random.key(2)})
    b = apply(params, batch, deterministic=False, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(a, b)
    assert not np.allclose(a, apply(params, batch))


def test_bfloat16_compute_keeps_float32_params_and_logits(quick_params):
    model = small_decoder(dtype=jnp.bfloat16)
    shapes = jax.eval_shape(model.init, jax.random.key(1), tokens())
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))
    out = jax.eval_shape(model.apply, quick_params(model, tokens()), tokens())
    assert out.dtype == jnp.float32 and out.shape == (BATCH, LENGTH, VOCAB)
