"""Class semantics-based attention: temporal [B, T, C] and NHWC layouts, the channel + temporal gate structure,
attention learned from the semantics input, parameter counts, option errors."""

import jax
import numpy as np
import pytest

import attn


def csa_count(c_in, c, k, n, reduction, classes=None):
    h = c // reduction
    head = 0 if classes is None else c_in * classes + classes
    source = c_in if classes is None else classes
    return head + k**n * source * c + c + c * h + h + h * c + c + k**n * c + 1


@pytest.mark.parametrize("shape", [(2, 12, 16), (2, 5, 6, 16)])
def test_gate_is_a_channel_weight_plus_a_temporal_weight(shape, quick_params, count, features, jitted):
    x = features(shape) + 2.0  # away from zero so out / x is well conditioned
    module = attn.build("class_semantic")
    p = quick_params(module, x)
    assert count(p) == csa_count(16, 16, 3, len(shape) - 2, 4)
    out, state = jitted(module)({"params": p}, x, mutable=("intermediates",))
    a_c, a_t = state["intermediates"]["attention_map"][0]
    assert a_c.shape == (2, 16) and a_t.shape == shape[:-1]
    channel_shape = (2,) + (1,) * (len(shape) - 2) + (16,)
    expected = x * (np.asarray(a_c).reshape(channel_shape) + np.asarray(a_t)[..., None])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    gate = np.asarray(out) / x
    assert np.all((gate > 0) & (gate < 2))


def test_attention_is_learned_from_the_semantics_input(quick_params, features, jitted):
    x, semantics = features((2, 12, 16)), features((2, 12, 24), seed=1)
    module = attn.build("class_semantic", num_classes=5)
    p = quick_params(module, x, semantics=semantics)
    assert p["class_scores"]["kernel"].shape == (24, 5)
    apply = jitted(module)
    out, state = apply({"params": p}, x, semantics=semantics, mutable=("intermediates",))
    assert state["intermediates"]["class_logits"][0].shape == (2, 12, 5)
    # The weights come from the semantics only: another x keeps them, other semantics change them.
    _, same = apply({"params": p}, x * 2.0, semantics=semantics, mutable=("intermediates",))
    np.testing.assert_array_equal(
        same["intermediates"]["attention_map"][0][0], state["intermediates"]["attention_map"][0][0]
    )
    other = apply({"params": p}, x, semantics=semantics[:, ::-1], mutable=("intermediates",))[0]
    assert not np.allclose(out, other)


def test_default_semantics_is_the_input_itself(quick_params, features, jitted):
    x = features((1, 4, 4, 8))
    module = attn.build("class_semantic", reduction=2)
    p = quick_params(module, x)
    apply = jitted(module)
    np.testing.assert_array_equal(apply({"params": p}, x), apply({"params": p}, x, semantics=x))


@pytest.mark.parametrize(
    ("options", "semantics", "message"),
    [
        ({"reduction": 3}, None, "reduction=3"),
        ({"kernel_size": 2}, None, "kernel_size=2"),
        ({"num_classes": 0}, None, "num_classes=0"),
        ({}, np.zeros((2, 11, 4), np.float32), "semantics must have shape"),
    ],
)
def test_bad_options_name_the_option(options, semantics, message):
    module = attn.build("class_semantic", **options)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(module.init, jax.random.key(0), np.zeros((2, 12, 16), np.float32), semantics=semantics)
