"""Bad input gives a ValueError (KeyError for registry names) that names the argument and what was expected."""

import jax
import jax.numpy as jnp
import pytest

import attn
from attn import functional as F

q = jnp.zeros((2, 8, 4, 16))
kv = jnp.zeros((2, 8, 2, 16))


def test_wrong_rank():
    with pytest.raises(
        ValueError, match=r"q must have rank 4 \[batch, length, heads, head_dim\], got shape \(8, 4, 16\)"
    ):
        F.softmax_attention(q[0], kv, kv)


def test_mismatched_head_dim():
    with pytest.raises(ValueError, match="head_dim mismatch: q has head_dim=16 but k has head_dim=8"):
        F.softmax_attention(q, kv[..., :8], kv[..., :8])


def test_heads_not_multiple_of_kv_heads():
    k = jnp.zeros((2, 8, 3, 16))
    with pytest.raises(ValueError, match="num_heads=4 must be a multiple of num_kv_heads=3"):
        F.softmax_attention(q, k, k)
    layer = attn.build("softmax", num_heads=4, head_dim=8, num_kv_heads=3)
    with pytest.raises(ValueError, match="num_heads=4 must be a multiple of num_kv_heads=3"):
        layer.init(__import__("jax").random.key(0), jnp.zeros((1, 4, 16)))


def test_window_larger_than_allowed_and_negative():
    with pytest.raises(
        ValueError,
        match=r"window=\(100, 0\) is larger than allowed for q_len=8, kv_len=8: each side must be <= 8",
    ):
        F.softmax_attention(q, kv, kv, window=(100, 0))
    with pytest.raises(ValueError, match=r"window=\(-1, 2\) must be a pair \(left, right\) of non-negative ints"):
        F.softmax_attention(q, kv, kv, window=(-1, 2))
    with pytest.raises(ValueError, match="window"):
        attn.Mask(window=(2, 3, 4))


def test_bias_mask_and_sinks_shapes():
    with pytest.raises(
        ValueError, match=r"bias of shape \(3, 8, 8\) does not broadcast to \[B, H, Tq, Tk\] = \(2, 4, 8, 8\)"
    ):
        F.softmax_attention(q, kv, kv, bias=jnp.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match=r"sinks must have shape \(num_heads,\) = \(4,\), got \(2,\)"):
        F.softmax_attention(q, kv, kv, sinks=jnp.zeros(2))
    with pytest.raises(ValueError, match="softcap=-1.0 must be a positive float"):
        F.softmax_attention(q, kv, kv, softcap=-1.0)


def test_mask_construction_errors():
    with pytest.raises(ValueError, match="prefix_lengths is set but causal=False"):
        attn.Mask(prefix_lengths=3)
    with pytest.raises(ValueError, match="q_segment_ids and kv_segment_ids must be given together"):
        attn.Mask(q_segment_ids=jnp.zeros((2, 8), int))
    with pytest.raises(ValueError, match="block_mask and block_size must be given together"):
        attn.Mask(block_mask=jnp.ones((2, 2), bool))


def test_unknown_mechanism_lists_closest_names():
    with pytest.raises(KeyError, match="unknown attention mechanism 'softmaxx'; did you mean 'softmax'"):
        attn.get("softmaxx")
    with pytest.raises(KeyError, match="unknown attention mechanism 'softmaxx'"):
        attn.build("softmaxx", num_heads=2, head_dim=4)


def test_unknown_and_missing_options():
    with pytest.raises(
        ValueError,
        match="unknown option 'rope_bse' for mechanism 'softmax' \\(did you mean 'rope_base'\\?\\)",
    ):
        attn.build("softmax", num_heads=2, head_dim=4, rope_bse=5.0)
    with pytest.raises(ValueError, match="mechanism 'softmax' needs option\\(s\\) 'head_dim'"):
        attn.build("softmax", num_heads=2)


def test_bad_option_values_in_layer():
    import jax

    x = jnp.zeros((1, 4, 16))
    with pytest.raises(ValueError, match=r"position='sinusoid' must be one of \('none', 'rope'"):
        attn.build("softmax", num_heads=2, head_dim=8, position="sinusoid").init(jax.random.key(0), x)
    expected = r"rope_scaling='dynamic' must be None or one of \('linear', 'ntk', 'yarn', 'llama3'\)"
    with pytest.raises(ValueError, match=expected):
        attn.build("softmax", num_heads=2, head_dim=8, rope_scaling="dynamic").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"x must have rank 3 \[batch, length, embed\]"):
        attn.build("softmax", num_heads=2, head_dim=8).init(jax.random.key(0), x[0])


def test_torch_layout_gets_a_transpose_hint():
    q_bhtd = jnp.zeros((2, 32, 16, 8))  # [batch, heads=32, length=16, head_dim]
    k_bhtd = jnp.zeros((2, 8, 32, 8))  # [batch, kv_heads=8, length=32, head_dim]
    with pytest.raises(ValueError, match=r"are \[batch, heads, length, head_dim\].*transpose\(0, 2, 1, 3\)"):
        F.softmax_attention(q_bhtd, k_bhtd, k_bhtd)
    k = jnp.zeros((2, 3, 3, 16))  # 3 does not divide 8 on axis 1 either: not a transposed layout, no hint
    with pytest.raises(ValueError) as info:
        F.softmax_attention(q, k, k)
    assert "PyTorch" not in str(info.value) and "num_kv_heads=3" in str(info.value)


@pytest.mark.parametrize("mask", [True, False, jnp.asarray(True)])
def test_scalar_mask_is_refused(mask):
    with pytest.raises(ValueError, match=r"is a scalar, which would mask nothing \(True\) or everything \(False\)"):
        F.softmax_attention(q, kv, kv, mask=mask)
    layer = attn.build("softmax", num_heads=2, head_dim=8)
    x = jnp.zeros((1, 4, 16))
    with pytest.raises(ValueError, match=r"attn.Mask\(causal=True\)"):
        layer.init(jax.random.key(0), x, mask=mask)
