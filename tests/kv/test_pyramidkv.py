"""PyramidKV (`pyramidkv`): each layer's selection and decode equal the numpy loop of SnapKV's rule
(tests/kv/prompt_selection_reference.py) with the layer budget of the official code's integer arithmetic, written out
here; the models fill layer_index / num_layers, so each layer's cache is allocated at its own budget."""

import jax
import numpy as np
import pytest

import attn
from attn.models import DecoderLM, generate, init_cache
from tests.kv.test_snapkv import DECODE, KERNEL, WINDOW, B, D, check_against_reference, inputs

BUDGET, BETA, LAYERS = 6, 4, 3


def official_layer_budget(prompt, layer):
    """PyramidKVCluster.update_kv's prompt keys kept before the window, line by line (prompt > budget)."""
    min_num = (BUDGET - WINDOW) // BETA
    max_num = (BUDGET - WINDOW) * 2 - min_num
    if max_num >= prompt - WINDOW:
        max_num = prompt - WINDOW
        min_num = (BUDGET - WINDOW) * 2 - max_num
    steps = (max_num - min_num) // (LAYERS - 1)
    if prompt < (BUDGET - WINDOW) * 2:
        return BUDGET - WINDOW
    return max_num - layer * steps


def build(**options):
    defaults = {"budget": BUDGET, "observation_window": WINDOW, "kernel_size": KERNEL, "decode_budget": DECODE}
    defaults.update(beta=BETA, num_layers=LAYERS)
    return attn.build("pyramidkv", num_heads=4, head_dim=D, **{**defaults, **options})


# the largest selection of each layer over every prompt length, plus the decode slots: 7 + 2 + 2, then 6 + 2
CAPACITY = {0: 11, 1: 8, 2: 8}


@pytest.mark.parametrize("prompt", [8, 12])  # 8: k_max clipped to the prompt; 12: the unclipped pyramid
@pytest.mark.parametrize("layer", [0, 2])
def test_layer_selection_and_decode_equal_reference(layer, prompt):
    assert official_layer_budget(prompt, 0) > official_layer_budget(prompt, 2)
    layer_module = build(num_kv_heads=2, layer_index=layer)
    x = inputs(prompt + 4)
    cache, kept = check_against_reference(
        layer_module, x, prompt, kv_heads=2, pooling="max", capacity=CAPACITY[layer],
        counts=lambda b, g, scores: official_layer_budget(prompt, layer),
    )  # fmt: skip
    assert cache["cached_key"].shape == (B, CAPACITY[layer], 2, D)


def test_capacity_is_the_largest_selection():
    for layer, capacity in CAPACITY.items():
        largest = max(official_layer_budget(prompt, layer) for prompt in range(BUDGET + 1, 40)) + WINDOW
        assert capacity == max(largest, BUDGET) + DECODE


def test_single_layer_is_snapkv():
    x = inputs(14)
    options = {"budget": BUDGET, "observation_window": WINDOW, "kernel_size": KERNEL, "decode_budget": DECODE}
    pyramid = build(num_layers=1, layer_index=0)
    snap = attn.build("snapkv", num_heads=4, head_dim=D, **options)
    params = snap.init(jax.random.key(1), x)
    outs = []
    for layer in (pyramid, snap):
        _, state = layer.apply(params, x, decode=True, mutable=["cache"])
        y, state = layer.apply({**params, "cache": state["cache"]}, x[:, :12], decode=True, mutable=["cache"])
        outs.append((y, state["cache"]["cache_positions"]))
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    np.testing.assert_allclose(outs[0][0], outs[1][0], atol=1e-6)


def test_models_fill_the_layer_fields():
    model = DecoderLM(
        vocab_size=32, num_layers=LAYERS, d_model=16, num_heads=2, mlp_dim=32, attention="pyramidkv",
        attention_options={"budget": BUDGET, "observation_window": WINDOW, "kernel_size": KERNEL, "beta": BETA,
                           "decode_budget": DECODE},
    )  # fmt: skip
    prompt = jax.random.randint(jax.random.key(0), (2, 12), 0, 32)
    params = model.init(jax.random.key(1), prompt)
    cache = init_cache(model, params, 2, 500)
    for layer, capacity in CAPACITY.items():
        assert cache[f"layers_{layer}"]["attention"]["cached_key"].shape == (2, capacity, 2, 8)
    assert generate(model, params, prompt, 4).shape == (2, 16)


def test_bad_layer_index_raises():
    with pytest.raises(ValueError, match=r"layer_index=3 must lie in \[0, num_layers=3\)"):
        build(layer_index=3).init(jax.random.key(0), inputs(8))
