"""The memory-efficient (blockwise, online-softmax) path of F.softmax_attention: equal to the dense reference in
value, lse and gradients, chosen by implementation=None only for large score matrices, O(T) compiled memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn import functional as F
from attn.core import blockwise_softmax

ATOL = 1e-5


def random_qkv(seed, batch, q_len, kv_len, heads, kv_heads, head_dim, value_dim=None):
    rng = np.random.default_rng(seed)
    shapes = [
        (batch, q_len, heads, head_dim),
        (batch, kv_len, kv_heads, head_dim),
        (batch, kv_len, kv_heads, value_dim or head_dim),
    ]
    return tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes)


SEGMENTS = np.array([[0] * 20 + [1] * 25, [0] * 9 + [1] * 36])
CASES = {
    "no mask": dict(),
    "causal": dict(causal=True),
    "causal decode offset": dict(causal=True, q_offset=8),
    "window": dict(window=(6, 3)),
    "causal window": dict(causal=True, window=5),
    "kv lengths": dict(mask=attn.Mask(kv_lengths=jnp.array([30, 45]))),
    "segments": dict(segment_ids=(jnp.asarray(SEGMENTS[:, :37]), jnp.asarray(SEGMENTS))),
    "prefix lm": dict(mask=attn.Mask(causal=True, prefix_lengths=jnp.array([5, 12]))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_blockwise_matches_dense_in_value_lse_and_gradients(name):
    options = CASES[name]
    q, k, v = random_qkv(0, 2, 37, 45, 4, 2, 12, value_dim=10)
    rng = np.random.default_rng(1)
    w_out, w_lse = rng.normal(size=(2, 37, 4, 10)), rng.normal(size=(2, 4, 37))

    def loss(implementation, **tiles):
        def value(q, k, v):
            if implementation == "blockwise":
                mask = attn.Mask.from_args(
                    causal=options.get("causal", False),
                    mask=options.get("mask"),
                    window=options.get("window"),
                    segment_ids=options.get("segment_ids"),
                )
                out, aux = blockwise_softmax.blockwise_attention(
                    q, k, v, mask=mask, q_offset=options.get("q_offset", 0), return_lse=True, **tiles
                )
            else:
                out, aux = F.softmax_attention(q, k, v, return_lse=True, implementation="xla", **options)
            lse = aux["lse"]
            return jnp.sum(out * w_out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * w_lse), (out, lse)

        return value

    # small tiles: several query chunks (grouped under causal/window masks), a partial last key block
    blockwise = jax.jit(jax.value_and_grad(loss("blockwise", query_chunk=8, key_block=16), (0, 1, 2), True))
    (_, (out, lse)), grads = blockwise(q, k, v)
    (_, (ref_out, ref_lse)), ref_grads = jax.jit(jax.value_and_grad(loss("dense"), (0, 1, 2), True))(q, k, v)
    np.testing.assert_allclose(out, ref_out, atol=ATOL)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
    np.testing.assert_allclose(
        jnp.where(jnp.isfinite(lse), lse, 0), jnp.where(jnp.isfinite(ref_lse), ref_lse, 0), atol=ATOL
    )
    for axis, got, want in zip("qkv", grads, ref_grads, strict=True):
        assert np.isfinite(got).all(), f"non-finite d{axis}"
        np.testing.assert_allclose(got, want, atol=ATOL, err_msg=f"d{axis}")


@pytest.mark.parametrize("causal", [False, True])
def test_forced_implementation_equals_reference(causal):
    q, k, v = random_qkv(2, 1, 50, 50, 2, 1, 16)
    got = F.softmax_attention(q, k, v, causal=causal, implementation="xla_blockwise")
    np.testing.assert_allclose(got, F.softmax_attention(q, k, v, causal=causal, implementation="xla"), atol=ATOL)


def test_numpy_inputs_are_accepted():
    q, k, v = (np.asarray(x) for x in random_qkv(3, 1, 40, 40, 2, 1, 8))
    got = F.softmax_attention(q, k, v, causal=True, implementation="xla_blockwise")
    np.testing.assert_allclose(got, F.softmax_attention(q, k, v, causal=True, implementation="xla"), atol=ATOL)


def test_fully_masked_rows_are_zero_with_finite_gradients():
    q, k, v = random_qkv(3, 2, 16, 16, 2, 2, 8)
    mask = attn.Mask(q_lengths=jnp.array([16, 5]), kv_lengths=jnp.array([16, 0]))

    def run(q, k, v):
        return F.softmax_attention(q, k, v, mask=mask, return_lse=True, implementation="xla_blockwise")

    out, aux = run(q, k, v)
    np.testing.assert_array_equal(out[1], 0.0)
    assert np.isneginf(aux["lse"][1]).all()
    for g in jax.grad(lambda *a: jnp.sum(run(*a)[0]), argnums=(0, 1, 2))(q, k, v):
        assert np.isfinite(g).all()


@pytest.mark.parametrize(
    "options, reason",
    [
        (dict(bias=jnp.zeros((1, 1, 8, 8))), "bias"),
        (dict(softcap=5.0), "softcap"),
        (dict(sinks=jnp.zeros(2)), "sinks"),
        (dict(dropout_rate=0.1, dropout_rng=jax.random.key(0)), "dropout"),
        (dict(return_probs=True), "return_probs"),
        (dict(mask=jnp.ones((1, 1, 8, 8), bool)), "dense boolean mask"),
    ],
)
def test_forcing_blockwise_with_options_it_cannot_express_raises(options, reason):
    q, k, v = random_qkv(4, 1, 8, 8, 2, 2, 8)
    with pytest.raises(ValueError, match=f"implementation='xla_blockwise' is not available.*{reason}"):
        F.softmax_attention(q, k, v, implementation="xla_blockwise", **options)


def test_unknown_implementation_lists_the_blockwise_name():
    q, k, v = random_qkv(5, 1, 8, 8, 2, 2, 8)
    with pytest.raises(ValueError, match="implementation='blockwise' is not supported.*'xla_blockwise'"):
        F.softmax_attention(q, k, v, implementation="blockwise")


def _spy(monkeypatch):
    calls = []
    real = blockwise_softmax.blockwise_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(blockwise_softmax, "blockwise_attention", spy)
    return calls


def test_auto_choice_keeps_small_calls_dense_and_moves_large_ones_blockwise(monkeypatch):
    calls = _spy(monkeypatch)
    small = jax.ShapeDtypeStruct((1, 2048, 8, 64), jnp.float32)  # scores 128 MiB: dense
    large = jax.ShapeDtypeStruct((1, 8192, 8, 64), jnp.float32)  # scores 2 GiB: blockwise
    jax.eval_shape(lambda q, k, v: F.softmax_attention(q, k, v, causal=True), small, small, small)
    assert calls == []
    jax.eval_shape(lambda q, k, v: F.softmax_attention(q, k, v, causal=True), large, large, large)
    assert calls == [large.shape]
    # options the blockwise path cannot express keep even a large call on the dense reference
    jax.eval_shape(lambda q, k, v: F.softmax_attention(q, k, v, softcap=30.0), large, large, large)
    jax.eval_shape(lambda q, k, v: F.softmax_attention(q, k, v, implementation="xla"), large, large, large)
    assert calls == [large.shape]


def _training_temp_bytes(length, implementation=None):
    spec = jax.ShapeDtypeStruct((1, length, 8, 64), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(F.softmax_attention(q, k, v, causal=True, implementation=implementation))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_large_call_compiles_to_a_footprint_far_below_the_score_matrix():
    scores = 4 * 8 * 8192 * 8192  # 2 GiB
    temp = _training_temp_bytes(8192)
    assert temp < scores / 8, f"temp {temp / 2**20:.0f} MiB for a {scores / 2**20:.0f} MiB score matrix"


def test_forward_and_backward_memory_grow_linearly_with_length():
    short, long = (_training_temp_bytes(n, "xla_blockwise") for n in (1024, 4096))
    assert long < 6 * short, f"{short / 2**20:.0f} MiB at 1K, {long / 2**20:.0f} MiB at 4K (quadratic: 16x)"


def test_causal_query_groups_skip_blocks_above_the_diagonal():
    from attn.core.blockwise_softmax import _query_groups

    groups = _query_groups(attn.Mask(causal=True), 0, n_chunks=16, chunk=512, block=256, n_blocks=32)
    scanned = sum((end - first) * (hi - lo) for first, end, lo, hi in groups)
    assert scanned == sum(2 * (2 * g + 2) for g in range(8)) * 2  # each pair of chunks sees up to its last key
    assert scanned / (16 * 32) == pytest.approx((1 + 1 / 8) / 2)
    assert _query_groups(None, 0, n_chunks=16, chunk=512, block=256, n_blocks=32) == ((0, 16, 0, 32),)


def test_gradients_with_a_block_mask_under_jit_equal_the_dense_path():
    # The backward rebuilds the Mask pytree with placeholder leaves; its validation must let them through.
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 64, 2, 8)) for i in range(3))
    mask = attn.Mask(block_mask=jnp.asarray(np.eye(4, dtype=bool)), block_size=(16, 16))

    def grads(implementation):
        loss = lambda q, k, v: (F.softmax_attention(q, k, v, mask=mask, implementation=implementation) ** 2).sum()  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for blockwise, dense in zip(grads("xla_blockwise"), grads("xla"), strict=True):
        np.testing.assert_allclose(blockwise, dense, atol=2e-5, rtol=2e-5)
