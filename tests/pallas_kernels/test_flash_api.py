"""flash_attention's argument checks: each bad argument raises a ValueError naming it, its value and what was
expected (no kernel runs here), and the backend choice on a platform without a kernel."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from pallas_kernels import flash_attention

Q = jnp.zeros((2, 8, 4, 16))
KV = jnp.zeros((2, 8, 2, 16))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(q=jnp.zeros((8, 4, 16))),
            r"q must have rank 4 \[batch, length, heads, head_dim\], got shape \(8, 4, 16\)",
        ),
        (
            dict(k=jnp.zeros((2, 8, 3, 16)), v=jnp.zeros((2, 8, 3, 16))),
            r"num_heads=4 \(q\) must be a multiple of num_kv_heads=3",
        ),
        (
            dict(v=jnp.zeros((2, 9, 2, 16))),
            r"k and v must have the same shape .* got k \(2, 8, 2, 16\), v \(2, 9, 2, 16\)",
        ),
        (dict(k=jnp.zeros((2, 8, 2, 8)), v=jnp.zeros((2, 8, 2, 8))), r"head_dim mismatch: q has 16, k and v have 8"),
        (
            dict(q=jnp.zeros((1, 4, 1, 300)), k=jnp.zeros((1, 4, 1, 300)), v=jnp.zeros((1, 4, 1, 300))),
            r"head_dim=300 is not supported; expected 1 <= head_dim <= 256",
        ),
        (dict(window=(-1, 2)), r"window=\(-1, 2\) must be an int w >= 0 or a pair \(left, right\) of ints >= 0"),
        (dict(window=2.5), r"window=2.5 must be an int"),
        (
            dict(bias=jnp.zeros((2, 3, 8, 8))),
            r"bias shape \(2, 3, 8, 8\) must be \[B\|1, H\|1, Tq, Tk\] = \[2\|1, 4\|1, 8, 8\]",
        ),
        (
            dict(bias_factors=(jnp.zeros((2, 8, 4, 3)), jnp.zeros((2, 8, 4, 2)))),
            r"bias_factors shapes u \(2, 8, 4, 3\), v \(2, 8, 4, 2\) must be",
        ),
        (
            dict(segment_ids=(jnp.zeros((2, 8), jnp.int32), jnp.zeros((2, 7), jnp.int32))),
            r"segment_ids shapes \(2, 8\) and \(2, 7\) do not match",
        ),
        (dict(segment_ids=jnp.zeros((2, 8), jnp.int32)), r"segment_ids must be a pair"),
        (dict(softcap=0.0), r"softcap=0.0 must be None or a number > 0"),
        (dict(sinks=jnp.zeros((2,))), r"sinks shape \(2,\) must be \[H\] = \[4\]"),
        (dict(block_sizes={"block_q": 24}), r"block_sizes\['block_q'\]=24 must be a power of two >= 16"),
        (dict(block_sizes={"block_x": 16}), r"block_sizes key 'block_x' is unknown for the GPU kernel"),
        (dict(backend="cuda"), r"backend='cuda' is not supported; expected None, 'gpu' or 'tpu'"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    args = dict(q=Q, k=KV, v=KV, backend="gpu", interpret=True)
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v, **args)


def test_no_kernel_for_cpu_without_interpret():
    with pytest.raises(
        ValueError,
        match=r"no Pallas flash attention kernel for platform 'cpu'; pass backend='gpu' or 'tpu' with interpret=True to emulate it",
    ):
        flash_attention(Q, KV, KV)
