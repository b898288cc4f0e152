"""The linear family on the layer template: every layer passes its per-head outputs through the `head_outputs`
stage (ablating heads equals zeroing those heads' rows of the output projection), and a rule on attention weights
raises, since none of them exposes a probability matrix through the pipeline's stages."""

import flax
import jax
import numpy as np
import pytest

import attn
from attn import interventions as iv

HEADS = [0, 2]
# name -> (options, mask) of a small layer; 4 heads of size 8 (conftest.build).
LAYERS = {
    "linear": ({}, attn.Mask(causal=True)),
    "flowformer": ({}, attn.Mask(causal=True)),
    "hedgehog": ({"position": "rope"}, attn.Mask(causal=True)),
    "lightning": ({}, attn.Mask(causal=True)),
    "transnormer": ({}, attn.Mask(causal=True)),
    "agent": ({"num_agents": 3, "bias_resolution": 4}, None),
    "rala": ({}, None),
    "combiner": ({"block_size": 4}, attn.Mask(causal=True)),
    "sea": ({"top_k": 4, "compressed_length": 8}, attn.Mask(causal=True)),
    "titans": (
        {"variant": "mag", "memory_depth": 1, "chunk_size": 4, "window": 3, "num_persistent": 1},
        attn.Mask(causal=True),
    ),
    "seqboat": ({"window": 3, "router": "always", "ema_dim": 2}, attn.Mask(causal=True)),
}


def zero_head_rows(params, name: str, heads):
    """The same parameters with the output-projection rows of `heads` zeroed (the independent reference)."""
    tree = flax.core.unfreeze(params)
    if name == "seqboat":  # gau_out_kernel [H * dv, E], rows grouped by head
        kernel = np.array(tree["params"]["gau_out_kernel"].unbox())
        kernel = kernel.reshape(4, -1, kernel.shape[-1])
        kernel[np.asarray(heads)] = 0.0
        box = tree["params"]["gau_out_kernel"]
        tree["params"]["gau_out_kernel"] = box.replace_boxed(kernel.reshape(-1, kernel.shape[-1]))
        return tree
    box = tree["params"]["out"]["kernel"]
    tree["params"]["out"]["kernel"] = box.replace_boxed(box.unbox().at[np.asarray(heads)].set(0))
    return tree


@pytest.mark.parametrize(
    "name",
    # linear runs in the default suite; the others (each a few compiles) with the slow tests CI runs afterwards.
    [n if n == "linear" else pytest.param(n, marks=pytest.mark.slow) for n in sorted(LAYERS)],
)
def test_head_ablation_equals_zeroed_output_rows_and_weight_rules_raise(layer_checks, name):
    options, mask = LAYERS[name]
    layer = layer_checks.build(name, **options)
    x = layer_checks.inputs(length=8)
    plain, variables = layer.init_with_output(jax.random.key(1), x, mask=mask)
    variables = {"params": variables["params"]}
    with attn.intervene(iv.ablate_heads(heads=HEADS)):
        ablated = layer.apply(variables, x, mask=mask)
    reference = layer.apply(zero_head_rows(variables, name, HEADS), x, mask=mask)
    np.testing.assert_allclose(np.asarray(ablated), np.asarray(reference), rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(ablated), np.asarray(plain))
    assert not attn.get(name).has_attention_weights
    with pytest.raises(ValueError, match="has no attention probability matrix"):
        with attn.intervene(iv.scale_weights(keys=0, factor=2.0)):
            layer.apply(variables, x, mask=mask)


def test_head_outputs_capture_has_the_per_head_shape(layer_checks):
    layer = layer_checks.build("linear")
    x = layer_checks.inputs(length=8)
    variables = layer_checks.init(layer, x)
    _, state = layer.apply(variables, x, mask=attn.Mask(causal=True), mutable=["intermediates"])
    assert state["intermediates"]["head_outputs"][0].shape == (2, 8, 4, 8)
