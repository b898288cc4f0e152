"""`modality_mutual` (AKI): the mask by construction, the reductions to causal attention, no leak from the answer,
decoding after a prefill of image and prompt, and bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.cross.modality_mutual import modality_mutual_mask

B, T, E, H, D = 2, 8, 8, 2, 4
START, IMAGE, PROMPT = 1, 3, 2  # [text | image 1..3 | prompt 4..5 | answer 6..7]
CAUSAL = attn.Mask(causal=True)
X = jax.random.normal(jax.random.key(0), (B, T, E))


def loop_mask(length, start, image, prompt):
    mask = np.zeros((length, length), bool)
    for i in range(length):
        for j in range(length):
            is_image_row = start <= i < start + image
            is_prompt_column = start + image <= j < start + image + prompt
            mask[i, j] = j <= i or (is_image_row and is_prompt_column)
    return mask


@pytest.mark.parametrize("start, image, prompt", [(1, 3, 2), (0, 4, 4), (2, 2, 0), (0, 0, 3), (5, 3, 0)])
def test_mask_matches_the_explicit_loop(start, image, prompt):
    mask = modality_mutual_mask(start, image, prompt, CAUSAL)
    dense = mask.mask_fn(np.arange(T)[:, None], np.arange(T)[None, :]) & ~np.zeros((T, T), bool)
    np.testing.assert_array_equal(dense, loop_mask(T, start, image, prompt))
    assert not mask.causal  # the mask function carries the causal part


@pytest.mark.parametrize("prefix", [0, 2, 4, 6])
def test_a_prefix_lm_base_keeps_its_prefix_visible(prefix):
    # a prefix VLM: Mask(causal=True, prefix_lengths=L); every row also sees keys j < L
    mask = modality_mutual_mask(START, IMAGE, PROMPT, attn.Mask(causal=True, prefix_lengths=prefix))
    want = loop_mask(T, START, IMAGE, PROMPT) | (np.arange(T) < prefix)[None, :]
    np.testing.assert_array_equal(np.asarray(mask.materialize(T, T))[0, 0], want)
    assert mask.prefix_lengths is None and not mask.causal


def test_padding_is_anded_and_a_bidirectional_mask_is_left_alone():
    padded = modality_mutual_mask(START, IMAGE, PROMPT, attn.Mask(causal=True, kv_lengths=jnp.array([5])))
    dense = np.asarray(padded.materialize(T, T))[0, 0]
    np.testing.assert_array_equal(dense, loop_mask(T, START, IMAGE, PROMPT) & (np.arange(T) < 5)[None, :])
    bidirectional = attn.Mask(kv_lengths=jnp.array([5]))
    assert modality_mutual_mask(START, IMAGE, PROMPT, bidirectional) is bidirectional


def init(**options):
    layer = attn.build("modality_mutual", num_heads=H, head_dim=D, **{"position": "none", **options})
    return layer, nn.unbox(layer.init(jax.random.key(2), X, mask=CAUSAL))


def reference(params, allowed):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    x = np.asarray(X, np.float64)
    q, k, v = (np.einsum("bte,ehd->bthd", x, p[name]["kernel"]) for name in ("query", "key", "value"))
    heads = np.zeros((B, T, H, D))
    for b in range(B):
        for h in range(H):
            for i in range(T):
                logits = np.where(allowed[i], k[b, :, h] @ q[b, i, h] / np.sqrt(D), -np.inf)
                w = np.exp(logits - logits.max())
                heads[b, i, h] = (w / w.sum()) @ v[b, :, h]
    return np.einsum("bthd,hde->bte", heads, p["out"]["kernel"])


def test_layer_matches_the_reference_and_text_rows_equal_causal_attention():
    layer, params = init(image_start=START, image_tokens=IMAGE, prompt_tokens=PROMPT)
    softmax = attn.build("softmax", num_heads=H, head_dim=D, position="none")
    run = jax.jit(lambda module: module.apply(params, X, mask=CAUSAL), static_argnums=0)
    y, causal = run(layer), run(softmax)
    np.testing.assert_allclose(y, reference(params, loop_mask(T, START, IMAGE, PROMPT)), atol=2e-5, rtol=1e-5)
    text = np.r_[0:START, START + IMAGE : T]
    np.testing.assert_allclose(y[:, text], causal[:, text], atol=1e-6, rtol=1e-6)
    assert float(jnp.abs(y[:, START : START + IMAGE] - causal[:, START : START + IMAGE]).max()) > 1e-3


def test_no_image_tokens_is_causal_self_attention():
    layer, params = init(image_start=START, image_tokens=0, prompt_tokens=PROMPT)
    softmax = attn.build("softmax", num_heads=H, head_dim=D, position="none")
    np.testing.assert_array_equal(layer.apply(params, X, mask=CAUSAL), softmax.apply(params, X, mask=CAUSAL))
    np.testing.assert_array_equal(
        np.asarray(modality_mutual_mask(START, 0, PROMPT, CAUSAL).materialize(T, T))[0, 0], np.tri(T, dtype=bool)
    )


def test_answer_tokens_change_no_earlier_output():
    layer, params = init(image_start=START, image_tokens=IMAGE, prompt_tokens=PROMPT)
    cut = START + IMAGE + PROMPT
    run = jax.jit(lambda x: layer.apply(params, x, mask=CAUSAL))
    changed = X.at[:, cut:].set(jax.random.normal(jax.random.key(5), (B, T - cut, E)))
    y, y2 = run(X), run(changed)
    np.testing.assert_array_equal(y[:, :cut], y2[:, :cut])
    assert float(jnp.abs(y[:, cut:] - y2[:, cut:]).max()) > 1e-4


def test_decoding_after_a_prefill_of_image_and_prompt_equals_the_forward():
    layer, params = init(image_start=START, image_tokens=IMAGE, prompt_tokens=PROMPT, position="rope")
    step = jax.jit(lambda variables, x: layer.apply(variables, x, mask=CAUSAL, decode=True, mutable=["cache"]))
    shapes = jax.eval_shape(step, params, X)[1]["cache"]
    cache, outs, start = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), [], 0
    for size in (START + IMAGE + PROMPT, 1, 1):
        y, state = step({**params, "cache": cache}, X[:, start : start + size])
        outs.append(y)
        cache, start = state["cache"], start + size
    full = layer.apply(params, X, mask=CAUSAL)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5, rtol=1e-5)


def test_bad_input_names_the_argument():
    layer, params = init(image_start=START, image_tokens=IMAGE, prompt_tokens=PROMPT)
    with pytest.raises(ValueError, match="prompt_tokens=2 = 6 exceeds the length 5 of x"):
        layer.apply(params, X[:, :5], mask=CAUSAL)
    with pytest.raises(ValueError, match="self-attention over the mixed sequence; got a context of shape"):
        layer.apply(params, X, context=X, mask=CAUSAL)
    with pytest.raises(ValueError, match="the given mask has per-row prefix_lengths"):
        layer.apply(params, X, mask=attn.Mask(causal=True, prefix_lengths=jnp.array([2, 3])))
    with pytest.raises(ValueError, match="image_tokens=-1 must be a non-negative int"):
        attn.build("modality_mutual", num_heads=H, head_dim=D, image_tokens=-1)
