"""Model building blocks: norms, MLPs and embeddings against their formulas, with logical axis names."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.core.positions import LearnedPositionEmbedding
from attn.models.layers import Mlp, TokenEmbedding, make_norm

X = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32) * 3 + 1


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_mlp_matches_its_formula(kind):
    mlp = Mlp(hidden_dim=16, kind=kind)
    variables = jax.jit(mlp.init)(jax.random.key(0), X)
    p = nn.unbox(variables)["params"]
    if kind == "swiglu":
        hidden = jax.nn.silu(X @ p["wi_gate"]["kernel"]) * (X @ p["wi_up"]["kernel"])
    else:
        hidden = jax.nn.gelu(X @ p["wi"]["kernel"])
    np.testing.assert_allclose(jax.jit(mlp.apply)(variables, X), hidden @ p["wo"]["kernel"], atol=1e-5)
    spec = nn.get_partition_spec(variables)["params"]
    assert spec["wo"]["kernel"] == jax.sharding.PartitionSpec("mlp", "embed")


def test_norms_normalise_the_embed_axis():
    for kind in ("rmsnorm", "layernorm"):
        norm = make_norm(kind, dtype=jnp.float32, param_dtype=jnp.float32)
        variables = norm.init(jax.random.key(0), X)
        y = np.asarray(norm.apply(variables, X))
        if kind == "rmsnorm":
            np.testing.assert_allclose(np.sqrt((y**2).mean(-1)), 1.0, atol=1e-3)
        else:
            np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-5)
            np.testing.assert_allclose(y.std(-1), 1.0, atol=1e-3)
        assert nn.get_partition_spec(variables)["params"]["scale"] == jax.sharding.PartitionSpec("embed")
    with pytest.raises(ValueError, match="norm='batchnorm'"):
        make_norm("batchnorm", dtype=jnp.float32, param_dtype=jnp.float32)


def test_token_embedding_lookup_and_attend_share_the_table():
    embed = TokenEmbedding(vocab_size=11, features=8)
    tokens = jnp.array([[0, 3, 10]])
    variables = embed.init(jax.random.key(0), tokens)
    table = nn.unbox(variables)["params"]["embedding"]
    np.testing.assert_array_equal(embed.apply(variables, tokens), table[tokens])
    np.testing.assert_allclose(embed.apply(variables, X, method="attend"), X @ table.T, atol=1e-5)
    assert nn.get_partition_spec(variables)["params"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
    with pytest.raises(ValueError, match="tokens must be an integer array"):
        embed.apply(variables, X)


def test_position_embedding_rows_follow_positions():
    table = LearnedPositionEmbedding(max_len=6, features=4)
    positions = jnp.array([[5, 0, 2]])
    variables = table.init(jax.random.key(0), positions)
    rows = nn.unbox(variables)["params"]["embedding"]
    np.testing.assert_array_equal(table.apply(variables, positions), rows[positions])
    assert nn.get_partition_spec(variables)["params"]["embedding"] == jax.sharding.PartitionSpec("length", "embed")
