"""Every local mechanism passes its per-head outputs through the template's `head_outputs` stage: ablating a head
with `attn.interventions` equals the same layer with that head's rows of the output projection(s) zeroed (the
head's contribution removed by hand, in the parameters), and a layer run with a capture of `head_outputs` returns
the same output."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from local_reference import normal, random_params

import attn
from attn import interventions as iv

HEADS = dict(num_heads=2, head_dim=4)
GRID = (1, 4, 4, 8)
CASES = [
    # name, options, input shape, output projections (paths in params) fed by the per-head outputs
    ("neighborhood", dict(kernel_size=3), GRID, [("out",)]),
    ("window", dict(window_size=2, shift=1, rpb=True), GRID, [("out",)]),
    ("cswin", dict(stripe_width=2), GRID, [("out",)]),
    ("halo", dict(block_size=2, halo_size=1), GRID, [("out",)]),
    ("hilo", dict(alpha=0.5, window_size=2), GRID, [("out",)]),
    ("spatial_sparse", dict(compression_block=2, selection_block=2, topk=2, window_size=2), GRID, [("out",)]),
    ("criss_cross", dict(qk_reduction=2, gamma_init=0.5), GRID, [("out",)]),
    ("davit", dict(window_size=2), GRID, [("spatial", "out"), ("channel", "out")]),
    ("swap", dict(window_size=2), (1, 2, 2, 2, 8), [("swap_out",)]),
    ("arrow", dict(local_window=2), (1, 8, 8), [("out",)]),
    ("s2_attention", dict(block_size=2, local_blocks=1, vert_stride=2), (1, 8, 8), [("out",)]),
]


def zero_head_rows(params, paths, head):
    """A copy of params with row `head` of the kernels [H, Dv, E] at `paths` set to 0."""
    unboxed = nn.meta.unbox(params)
    tree = jax.tree.map(lambda a: a, unboxed)  # fresh containers, shared leaves
    for path in paths:
        node = tree["params"]
        for part in path:
            node = node[part]
        node["kernel"] = node["kernel"].at[head].set(0.0)
    return tree


@pytest.mark.parametrize("name, options, shape, outputs", CASES, ids=[case[0] for case in CASES])
def test_ablating_a_head_removes_its_rows_of_the_output_projection(name, options, shape, outputs):
    layer = attn.build(name, **HEADS, **options)
    x = normal(shape)
    params = random_params(layer, x)
    y = layer.apply(params, x)
    with attn.intervene(iv.ablate_heads(heads=[1])):
        ablated = layer.apply(params, x)
    np.testing.assert_allclose(ablated, layer.apply(zero_head_rows(params, outputs, 1), x), atol=1e-5, rtol=1e-5)
    assert float(np.max(np.abs(np.asarray(ablated - y)))) > 1e-4  # the head contributed
