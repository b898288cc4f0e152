"""ECA: the adaptive kernel-size rule, exactly k parameters, the closed form, and channel locality of the gate."""

import math

import jax
import numpy as np
import pytest

import attn
from attn.channel.eca import eca_kernel_size


def nearest_odd(t: float) -> int:
    """The odd number nearest to t; of two equally near ones, the larger (brute force over candidates)."""
    candidates = range(1, int(t) + 4, 2)
    return min(candidates, key=lambda n: (abs(n - t), -n))


def test_adaptive_kernel_size_follows_the_paper_rule():
    table = {16: 3, 32: 3, 64: 3, 128: 5, 256: 5, 512: 5, 1024: 5, 2048: 7}
    assert {c: eca_kernel_size(c) for c in table} == table
    for gamma, b in ((2, 1), (3, 2), (1.5, 0.5)):
        for channels in range(1, 4097):
            t = abs(math.log2(channels) / gamma + b / gamma)
            k = eca_kernel_size(channels, gamma, b)
            assert k == nearest_odd(t), (channels, gamma, b)
            # The widely used integer form of the same rule.
            assert k == (int(t) if int(t) % 2 else int(t) + 1)


@pytest.mark.parametrize("channels", [16, 128])
def test_output_is_x_times_sigmoid_of_conv1d_of_the_mean(channels, quick_params, count, features, jitted):
    x = features((2, 5, 3, channels))
    module = attn.build("eca")
    params = quick_params(module, x)
    k = eca_kernel_size(channels)
    assert count(params) == k and params["kernel"].shape == (k,)
    y = x.mean(axis=(1, 2))
    padded = np.pad(y, ((0, 0), ((k - 1) // 2, (k - 1) // 2)))
    z = np.stack([np.correlate(row, params["kernel"], mode="valid") for row in padded])
    expected = x / (1 + np.exp(-z))[:, None, None, :]
    np.testing.assert_allclose(jitted(module)({"params": params}, x), expected, rtol=1e-5, atol=1e-6)


def test_gate_of_a_channel_depends_only_on_its_k_neighbours(quick_params, features, jitted):
    x = features((1, 4, 4, 32))
    module = attn.build("eca", kernel_size=5)
    params = quick_params(module, x)
    apply = jitted(module)

    def gate(x):
        _, state = apply({"params": params}, x, mutable=("intermediates",))
        return state["intermediates"]["attention_map"][0][0]

    shifted = x.copy()
    shifted[..., 10] += 1.0  # changes only the pooled value of channel 10
    changed = np.flatnonzero(np.abs(np.asarray(gate(shifted) - gate(x))) > 0)
    np.testing.assert_array_equal(changed, np.arange(8, 13))  # 10 +- (5 - 1) / 2
    assert np.all(np.asarray(gate(x)) > 0) and np.all(np.asarray(gate(x)) < 1)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"kernel_size": 4}, "kernel_size=4"), ({"kernel_size": 0}, "kernel_size=0"), ({"gamma": 0.0}, "gamma=0.0")],
)
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(attn.build("eca", **options).init, jax.random.key(0), np.zeros((1, 2, 2, 8), np.float32))
