"""`rettention`: the window, the ratio and the sparse attention against loop-by-loop numpy, the step schedule, the
exact correction when the attention is unchanged, the stateless call equal to `softmax`, argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.sparse.rettention import rettention_parts, step_kind, window_indices
from tests.sparse.sparse_reference import random_qk


def numpy_parts(q, k, v, window):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, length, heads, dim = q.shape
    group = heads // k.shape[2]
    full, sparse = np.zeros((batch, length, heads, v.shape[-1])), np.zeros((batch, length, heads, v.shape[-1]))
    ratio = np.zeros((batch, heads, length))
    for b in range(batch):
        for h in range(heads):
            s = q[b, :, h] @ k[b, :, h // group].T / np.sqrt(dim)
            for i in range(length):
                e = np.exp(s[i] - s[i].max())
                kept = [j for j in range(length) if abs(i - j) <= window // 2]
                full[b, i, h] = e @ v[b, :, h // group] / e.sum()
                sparse[b, i, h] = e[kept] @ v[b, kept, h // group] / e[kept].sum()
                ratio[b, h, i] = e[kept].sum() / e.sum()
    return full, sparse, ratio


def test_parts_match_numpy():
    q, k, v = random_qk(2, 2, 9, 9, 4, 2, 4)
    with jax.enable_x64(True):
        parts = jax.jit(lambda q, k, v: rettention_parts(q, k, v, window=4))(
            *(jnp.asarray(x, np.float64) for x in (q, k, v))
        )
    full, sparse, ratio = numpy_parts(q, k, v, 4)
    np.testing.assert_allclose(parts["full"], full, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(parts["sparse"], sparse, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(parts["ratio"], ratio, rtol=1e-6)  # the core's lse is float32 by design
    np.testing.assert_array_equal(window_indices(3, 3)[0, 0], [[-1, 0, 1], [0, 1, 2], [1, 2, -1]])


def test_schedule_is_the_official_one():
    kinds = [int(step_kind(jnp.int32(t), warmup_steps=5, refresh_interval=5, refresh_until=20)) for t in range(22)]
    assert kinds == [0] * 5 + [1, 2, 2, 2, 2] * 3 + [2] * 2  # full 0-4, refresh at 5, 10, 15, sparse otherwise


@pytest.mark.slow  # four jitted stateful steps and two layers: ~30 s on 2 cores shared with other jobs
def test_steps_follow_the_cached_statistics():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 8, 16)), jnp.float32)
    x2 = x + 0.3 * jnp.asarray(np.random.default_rng(2).normal(size=(1, 8, 16)), jnp.float32)
    layer = attn.build("rettention", num_heads=2, head_dim=4, keep_rate=0.25, warmup_steps=1, ratio_step=0.0)
    base = attn.build("softmax", num_heads=2, head_dim=4)

    def run(x, x2):
        variables = layer.init(jax.random.key(0), x)
        params = {"params": variables["params"]}
        state = {"rettention": jax.tree.map(jnp.zeros_like, variables["rettention"])}
        outs = []
        for inp in (x, x, x, x2):  # steps 0 full, 1 refresh, 2 sparse on the same input, 3 sparse on another
            y, state = layer.apply({**params, **state}, inp, mutable=["rettention"])
            outs.append(y)
        return outs, state, base.apply(params, x), base.apply(params, x2), layer.apply(params, x2)

    outs, state, dense, dense2, stateless = jax.jit(run)(x, x2)
    for y in outs[:3]:
        np.testing.assert_allclose(y, dense, atol=2e-6, rtol=2e-5)  # full, refresh, exact correction
    np.testing.assert_allclose(stateless, dense2, atol=2e-6, rtol=2e-5)
    assert float(jnp.max(jnp.abs(outs[3] - dense2))) > 1e-4  # a sparse step on changed input is an approximation
    assert int(state["rettention"]["step"]) == 4


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="keep_rate=0.0"):
        attn.build("rettention", num_heads=2, head_dim=4, keep_rate=0.0)
    with pytest.raises(ValueError, match="refresh_interval=0"):
        attn.build("rettention", num_heads=2, head_dim=4, refresh_interval=0)
    with pytest.raises(ValueError, match="window=0"):
        window_indices(4, 0)
    layer = attn.build("rettention", num_heads=2, head_dim=4)
    with pytest.raises(ValueError, match="takes no mask"):
        layer.init(jax.random.key(0), jnp.ones((1, 6, 8)), mask=attn.Mask(causal=True))
