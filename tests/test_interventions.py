"""attn.interventions: exact identities (ablation = zeroed output-projection rows, self-patching = no change,
logit steering = the closed-form softmax factor), composition and scoping, jit safety, clear errors."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn import interventions as iv
from attn.models import DecoderLM, Encoder, ViT

V, B, T = 32, 2, 8
TOKENS = jax.random.randint(jax.random.key(0), (B, T), 0, V)


@pytest.fixture(scope="module")
def lm():
    model = DecoderLM(vocab_size=V, num_layers=2, d_model=16, num_heads=4, mlp_dim=32)
    return model, model.init(jax.random.key(1), TOKENS)


def zero_out_rows(variables, layer: str, heads):
    """The same model with the output-projection rows of `heads` of `layer` zeroed (the independent reference)."""
    tree = flax.core.unfreeze(variables)
    box = tree["params"][layer]["attention"]["out"]["kernel"]
    tree["params"][layer]["attention"]["out"]["kernel"] = box.replace_boxed(box.unbox().at[np.asarray(heads)].set(0))
    return tree


def test_no_rule_is_bit_identical(lm):
    model, variables = lm
    with attn.intervene():
        assert (model.apply(variables, TOKENS) == model.apply(variables, TOKENS)).all()
        out = model.apply(variables, TOKENS)
    assert (out == model.apply(variables, TOKENS)).all()


def test_ablate_heads_equals_zeroed_output_rows(lm):
    model, variables = lm
    with attn.intervene(iv.ablate_heads(layers=[1], heads=[0, 2])):
        ablated = model.apply(variables, TOKENS)
    reference = model.apply(zero_out_rows(variables, "layers_1", [0, 2]), TOKENS)
    np.testing.assert_array_equal(ablated, reference)
    assert not np.allclose(ablated, model.apply(variables, TOKENS))


def test_patching_every_head_with_own_activations_is_bit_identical(lm):
    model, variables = lm
    clean = model.apply(variables, TOKENS)
    out, cache = iv.run_with_cache(model, variables, TOKENS)
    np.testing.assert_array_equal(out, clean)
    assert sorted(cache) == ["layers_0/attention", "layers_1/attention"]
    assert cache["layers_0/attention"]["attention_weights"].shape == (B, 4, T, T)
    assert cache["layers_0/attention"]["head_outputs"].shape == (B, T, 4, 4)
    for stage in iv.STAGES:
        with attn.intervene(iv.patch(cache, stage)):
            np.testing.assert_array_equal(model.apply(variables, TOKENS), clean)


def test_patching_heads_from_another_input_equals_mixing_them_by_hand():
    layer = attn.build("softmax", num_heads=4, head_dim=4, num_kv_heads=2)
    x = jax.random.normal(jax.random.key(13), (B, T, 16))
    other = jax.random.normal(jax.random.key(14), (B, T, 16))
    params = layer.init(jax.random.key(15), x)
    _, source = iv.run_with_cache(layer, params, other)
    _, clean = iv.run_with_cache(layer, params, x)
    path = next(iter(source))
    with attn.intervene(iv.patch(source, "head_outputs", heads=[1, 2], queries=(2, 6))):
        patched = layer.apply(params, x)
    heads = np.array(clean[path]["head_outputs"])
    heads[:, 2:6, 1:3] = np.asarray(source[path]["head_outputs"])[:, 2:6, 1:3]
    want = np.einsum("bthk,hke->bte", heads, np.asarray(params["params"]["out"]["kernel"].unbox()))
    np.testing.assert_allclose(patched, want, atol=1e-5)


def test_nested_blocks_equal_one_block_and_rules_are_values():
    layer = attn.build("softmax", num_heads=2, head_dim=4)
    x = jax.random.normal(jax.random.key(16), (1, 6, 8))
    params = layer.init(jax.random.key(17), x)
    with attn.intervene(iv.add_to_logits(keys=(0, 2), value=1.0)):
        with attn.intervene(iv.set_temperature(temperature=2.0)):
            nested = layer.apply(params, x)
        with attn.intervene(iv.capture("head_outputs")):  # run_with_cache-style block inside: rules not re-applied
            captured, state = layer.apply(params, x, mutable=["intermediates"])
    with attn.intervene(iv.add_to_logits(keys=(0, 2), value=1.0), iv.set_temperature(temperature=2.0)):
        flat = layer.apply(params, x)
    with attn.intervene(iv.add_to_logits(keys=(0, 2), value=1.0)):
        once = layer.apply(params, x)
    np.testing.assert_array_equal(nested, flat)
    np.testing.assert_array_equal(captured, once)
    assert set(state["intermediates"]) == {"head_outputs"}  # while capture rules are active: only what they ask
    assert iv.add_to_logits(keys=(0, 2), value=1.0) == iv.add_to_logits(keys=(0, 2), value=1.0)
    assert iv.add_to_logits(keys=(0, 2), value=1.0) != iv.add_to_logits(keys=(0, 2), value=2.0)


def test_selection_by_module_path_and_hooks(lm):
    model, variables = lm
    reference = model.apply(zero_out_rows(variables, "layers_1", [0]), TOKENS)
    for selector in (dict(layers="layers_1"), dict(layers="layers_1/attention"), dict(layers=1, module="*/attention")):
        with attn.intervene(iv.ablate_heads(heads=[0], **selector)):
            np.testing.assert_array_equal(model.apply(variables, TOKENS), reference)
    with attn.intervene(iv.hook("head_outputs", lambda y, path: jnp.zeros_like(y), layers=[1], heads=[0])):
        np.testing.assert_array_equal(model.apply(variables, TOKENS), reference)
    _, cache = iv.run_with_cache(model, variables, TOKENS, names=("head_outputs",), layers=[0])
    assert list(cache) == ["layers_0/attention"] and list(cache["layers_0/attention"]) == ["head_outputs"]


def test_add_to_logits_moves_mass_by_the_closed_form_factor():
    layer = attn.build("softmax", num_heads=4, head_dim=4)
    x = jax.random.normal(jax.random.key(2), (B, T, 16))
    params = layer.init(jax.random.key(3), x)
    mask = attn.Mask(causal=True)
    _, base = layer.apply(params, x, mask=mask, mutable=["intermediates"])
    a, keys, heads = 1.5, (1, 4), [1, 3]
    with attn.intervene(iv.add_to_logits(heads=heads, keys=keys, value=a)):
        _, steered = layer.apply(params, x, mask=mask, mutable=["intermediates"])
    p = np.asarray(base["intermediates"]["attention_weights"][0], np.float64)
    selected = np.zeros(T, bool)
    selected[keys[0] : keys[1]] = True
    # softmax(l + a on S): p_j e^a / Z' on S, p_j / Z' elsewhere, Z' = 1 + (e^a - 1) sum_S p.
    z = 1.0 + (np.exp(a) - 1.0) * p[..., selected].sum(-1, keepdims=True)
    want = np.where(selected, p * np.exp(a), p) / z
    got = np.asarray(steered["intermediates"]["attention_weights"][0])
    np.testing.assert_allclose(got[:, heads], want[:, heads], atol=1e-6)
    np.testing.assert_array_equal(got[:, [0, 2]], p[:, [0, 2]].astype(np.float32))  # other heads untouched


def test_scale_weights_renormalises_and_temperature_divides_logits():
    layer = attn.build("softmax", num_heads=2, head_dim=4, position="none")
    x = jax.random.normal(jax.random.key(4), (1, 6, 8))
    params = layer.init(jax.random.key(5), x)
    kernel = {name: np.asarray(params["params"][name]["kernel"].unbox(), np.float64) for name in params["params"]}
    xs = np.asarray(x, np.float64)
    q, k, v = (np.einsum("btd,dhk->bthk", xs, kernel[n]) for n in ("query", "key", "value"))
    logits = np.einsum("bthk,bshk->bhts", q, k) / 2.0  # scale 1/sqrt(head_dim)

    def output(weights):
        return np.einsum("bthk,hke->bte", np.einsum("bhts,bshk->bthk", weights, v), kernel["out"])

    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    scaled = p.copy()
    scaled[..., [0, 5]] *= 3.0
    scaled /= scaled.sum(-1, keepdims=True)
    with attn.intervene(iv.scale_weights(keys=[0, 5], factor=3.0)):
        y_steered, out = layer.apply(params, x, mutable=["intermediates"])
    np.testing.assert_allclose(y_steered, output(scaled), atol=1e-5)
    np.testing.assert_allclose(layer.apply(params, x), output(p), atol=1e-5)
    # Captures record what the rules left: the steered weights.
    np.testing.assert_allclose(out["intermediates"]["attention_weights"][0], scaled, atol=1e-6)
    hot = np.exp(logits / 2.0 - (logits / 2.0).max(-1, keepdims=True))
    hot /= hot.sum(-1, keepdims=True)
    with attn.intervene(iv.set_temperature(temperature=2.0)):
        np.testing.assert_allclose(layer.apply(params, x), output(hot), atol=1e-5)


def test_rules_compose_in_order_and_are_scoped_to_the_block(lm):
    model, variables = lm
    clean = model.apply(variables, TOKENS)
    with attn.intervene(iv.ablate_heads(layers=[0], heads=[1])):
        with attn.intervene(iv.ablate_heads(layers=[1], heads=[3])):
            nested = model.apply(variables, TOKENS)
        outer_only = model.apply(variables, TOKENS)
    with attn.intervene(iv.ablate_heads(layers=[0], heads=[1]), iv.ablate_heads(layers=[1], heads=[3])):
        together = model.apply(variables, TOKENS)
    np.testing.assert_array_equal(nested, together)
    reference = model.apply(zero_out_rows(zero_out_rows(variables, "layers_0", [1]), "layers_1", [3]), TOKENS)
    np.testing.assert_array_equal(together, reference)
    np.testing.assert_array_equal(outer_only, model.apply(zero_out_rows(variables, "layers_0", [1]), TOKENS))
    np.testing.assert_array_equal(model.apply(variables, TOKENS), clean)  # nothing leaks past the block


def test_a_function_jitted_before_the_block_is_retraced_inside_it(lm):
    model, variables = lm
    apply = jax.jit(model.apply)
    clean = apply(variables, TOKENS)
    rule = iv.ablate_heads(layers=[1], heads=[0])
    with attn.intervene(rule):
        inside = apply(variables, TOKENS)
    np.testing.assert_allclose(inside, model.apply(zero_out_rows(variables, "layers_1", [0]), TOKENS), atol=1e-6)
    np.testing.assert_array_equal(apply(variables, TOKENS), clean)  # and re-traced back after it

    @jax.jit
    def entered_inside(variables, tokens):
        with attn.intervene(rule):
            return model.apply(variables, tokens)

    np.testing.assert_allclose(entered_inside(variables, TOKENS), inside, atol=1e-6)


def test_query_ranges_are_absolute_positions_while_decoding(lm):
    model, variables = lm
    rule = iv.add_to_logits(layers=[0], keys=(0, 1), value=-3.0, queries=(5, 8))
    with attn.intervene(rule):
        full = model.apply(variables, TOKENS)
        cache = attn.models.init_cache(model, variables, batch_size=B, max_len=T)
        _, state = model.apply({**variables, "cache": cache}, TOKENS[:, :5], decode=True, mutable=["cache"])
        steps = []
        for t in range(5, T):
            logits, state = model.apply({**variables, **state}, TOKENS[:, t : t + 1], decode=True, mutable=["cache"])
            steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full[:, 5:], atol=1e-5)
    assert not np.allclose(full[:, 5:], model.apply(variables, TOKENS)[:, 5:])
    np.testing.assert_array_equal(full[:, :5], model.apply(variables, TOKENS)[:, :5])  # queries < 5 untouched


def test_cross_attention_decoding_selects_queries_by_absolute_position():
    layer = attn.build("softmax", num_heads=2, head_dim=4)
    x = jax.random.normal(jax.random.key(18), (1, 6, 8))
    context = jax.random.normal(jax.random.key(19), (1, 5, 8))
    params = layer.init(jax.random.key(20), x, context=context)
    rule = iv.add_to_logits(keys=(0, 2), value=2.0, queries=(3, 5))
    with attn.intervene(rule):
        full = layer.apply(params, x, context=context)
        _, state = layer.apply(params, x[:, :1], context=context, decode=True, mutable=["cache"])
        steps = []
        for t in range(6):
            y, state = layer.apply(
                {**params, **state}, x[:, t : t + 1], context=context, decode=True, mutable=["cache"]
            )
            steps.append(y)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-5)
    plain = layer.apply(params, x, context=context)
    assert not np.allclose(full[:, 3:5], plain[:, 3:5])
    np.testing.assert_array_equal(full[:, :3], plain[:, :3])


def test_encoder_and_vit_take_interventions():
    encoder = Encoder(vocab_size=V, num_layers=2, d_model=16, num_heads=4, mlp_dim=32, head="mlm")
    variables = encoder.init(jax.random.key(6), TOKENS)
    with attn.intervene(iv.ablate_heads(layers=[0], heads=[2])):
        ablated = encoder.apply(variables, TOKENS)
    np.testing.assert_array_equal(ablated, encoder.apply(zero_out_rows(variables, "layers_0", [2]), TOKENS))

    vit = ViT(num_classes=3, patch_size=4, num_layers=2, d_model=16, num_heads=4, mlp_dim=32, pool="mean")
    images = jax.random.uniform(jax.random.key(7), (2, 8, 8, 3))
    variables = vit.init(jax.random.key(8), images)
    with attn.intervene(iv.ablate_heads(layers=[1], heads=[1])):
        ablated = vit.apply(variables, images)
    np.testing.assert_array_equal(ablated, vit.apply(zero_out_rows(variables, "layers_1", [1]), images))
    _, cache = iv.run_with_cache(vit, variables, images)
    assert cache["layers_0/attention"]["attention_weights"].shape[1:] == (4, 4, 4)


def test_captures_have_the_standard_names_and_values():
    layer = attn.build("softmax", num_heads=2, head_dim=4, num_kv_heads=1)
    x = jax.random.normal(jax.random.key(9), (1, 5, 8))
    params = layer.init(jax.random.key(10), x)
    mask = attn.Mask(causal=True)
    with attn.intervene(iv.capture()):  # every standard name except the logits: and those
        _, default = layer.apply(params, x, mask=mask, mutable=["intermediates"])
    assert set(default["intermediates"]) == {"attention_weights", "head_outputs", "key_mass", "lse"}
    with attn.intervene(iv.capture(*iv.CAPTURE_NAMES)):
        _, state = layer.apply(params, x, mask=mask, mutable=["intermediates"])
    got = {name: value[0] for name, value in state["intermediates"].items()}
    assert set(got) >= {"attention_logits", "attention_weights", "head_outputs", "key_mass", "lse"}
    logits = np.asarray(got["attention_logits"], np.float64)
    assert np.isneginf(logits[0, 0, 0, 1])  # masked logits are -inf
    finite = np.where(np.isfinite(logits), logits, -np.inf)
    lse = np.log(np.exp(finite).sum(-1))
    np.testing.assert_allclose(got["lse"], lse, rtol=1e-6)
    np.testing.assert_allclose(got["key_mass"], np.asarray(got["attention_weights"]).sum(-2), rtol=1e-6)
    with pytest.raises(ValueError, match="'intermediates' is not mutable"):
        with attn.intervene(iv.capture("attention_logits")):
            layer.apply(params, x, mask=mask)


def test_a_rule_on_weights_raises_for_a_mechanism_without_them():
    layer = attn.build("linear", num_heads=2, head_dim=4)
    x = jax.random.normal(jax.random.key(11), (1, 5, 8))
    params = layer.init(jax.random.key(12), x, mask=attn.Mask(causal=True))
    with pytest.raises(ValueError, match="has no attention probability matrix"):
        with attn.intervene(iv.scale_weights(keys=0, factor=2.0)):
            layer.apply(params, x, mask=attn.Mask(causal=True))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: iv.ablate_heads(heads=[-1]), r"heads=\[-1\] must be None, a non-negative int"),
        (lambda: iv.add_to_logits(keys=(4, 2)), r"keys=\(4, 2\) as a \(start, stop\) range needs 0 <= start < stop"),
        (lambda: iv.set_temperature(temperature=0.0), r"temperature=0.0 must be > 0"),
        (lambda: iv.capture("weights"), r"capture name 'weights' is not one of"),
        (lambda: iv.patch({}, "values"), r"stage='values' must be one of"),
        (lambda: iv.ablate_heads(layers=[1.5]), r"layers=\[1.5\] must hold layer indices"),
    ],
)
def test_bad_rules_are_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_selecting_a_head_the_layer_lacks_is_an_error(lm):
    model, variables = lm
    with pytest.raises(ValueError, match=r"selects head\(s\) \[7\] of layers_0/attention, which has 4 heads"):
        with attn.intervene(iv.ablate_heads(layers=[0], heads=[7])):
            model.apply(variables, TOKENS)
