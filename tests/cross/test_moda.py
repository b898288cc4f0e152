"""`moda` (modular duplex attention): the modality-pair mask by explicit loops, a numpy reference of the aligned visual
keys and the masked attention, the reductions to softmax attention, the prompt bound, decoding, and bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.cross.moda import modality_pair_mask

B, T, E, H, D = 2, 8, 8, 2, 4
START, IMAGE, PROMPT = 1, 3, 2  # [text | visual 1..3 | prompt 4..5 | answer 6..7]
CAUSAL = attn.Mask(causal=True)
X = jax.random.normal(jax.random.key(0), (B, T, E))


def loop_allowed(length, start, image, pairs, causal=True):
    allowed = np.zeros((length, length), bool)
    for i in range(length):
        for j in range(length):
            mi, mj = int(start <= i < start + image), int(start <= j < start + image)
            allowed[i, j] = pairs[2 * mi + mj] and (j <= i or not causal)
    return allowed


@pytest.mark.parametrize("pairs", [(True, False, True, True), (False, True, True, False), (True, True, False, True)])
def test_modality_pair_mask_matches_the_explicit_loop(pairs):
    mask = modality_pair_mask(START, IMAGE, pairs, CAUSAL)
    dense = np.asarray(mask.materialize(T, T))[0, 0]
    np.testing.assert_array_equal(dense, loop_allowed(T, START, IMAGE, pairs))
    padded = modality_pair_mask(START, IMAGE, pairs, attn.Mask(kv_lengths=jnp.array([6])))
    want = loop_allowed(T, START, IMAGE, pairs, causal=False) & (np.arange(T) < 6)[None, :]
    np.testing.assert_array_equal(np.asarray(padded.materialize(T, T))[0, 0], want)
    assert modality_pair_mask(START, IMAGE, (True,) * 4, CAUSAL) is CAUSAL


def init(**options):
    layer = attn.build("moda", num_heads=H, head_dim=D, **{"position": "none", **options})
    return layer, nn.unbox(layer.init(jax.random.key(2), X, mask=CAUSAL))


def reference(params, start, image, prompt, pairs):
    """MODA's forward by explicit loops in float64: aligned visual keys per head, then masked causal softmax."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    x = np.asarray(X, np.float64)
    q, k, v = (np.einsum("bte,ehd->bthd", x, p[name]["kernel"]) for name in ("query", "key", "value"))
    ratio, fuser = p["modality_ratio"], p["modality_fuser"]
    visual = [start <= t < start + image for t in range(T)]
    text = [not visual[t] and (prompt is None or t < start + image + prompt) for t in range(T)]
    allowed = loop_allowed(T, start, image, pairs)
    heads = np.zeros((B, T, H, D))
    for b in range(B):
        for h in range(H):
            unit = np.stack([(k[b, t, h] + 1e-6) / np.linalg.norm(k[b, t, h] + 1e-6) for t in range(T)])
            gram = np.zeros((D, D))
            for t in range(T):
                if text[t]:
                    gram += np.outer(unit[t], v[b, t, h])
            for row in range(D):
                gram[row] /= np.linalg.norm(gram[row])
            keys = k[b, :, h].copy()
            for t in range(T):
                if visual[t]:
                    keys[t] = (k[b, t, h] + ratio * (unit[t] @ gram)) @ fuser
            for i in range(T):
                logits = np.where(allowed[i], keys @ q[b, i, h] / np.sqrt(D), -np.inf)
                w = np.exp(logits - logits.max())
                heads[b, i, h] = (w / w.sum()) @ v[b, :, h]
    return np.einsum("bthd,hde->bte", heads, p["out"]["kernel"])


def perturbed(params, seed=3):
    """The parameters with a nonzero ratio and a non-identity fuser, so the alignment shows."""
    ratio = jax.random.normal(jax.random.key(seed), (D,))
    fuser = jnp.eye(D) + 0.3 * jax.random.normal(jax.random.key(seed + 1), (D, D))
    return {"params": {**params["params"], "modality_ratio": ratio, "modality_fuser": fuser}}


@pytest.mark.parametrize("prompt, pairs", [(None, (True,) * 4), (PROMPT, (True, False, True, True))])
def test_layer_matches_the_reference(prompt, pairs):
    options = dict(image_start=START, image_tokens=IMAGE, prompt_tokens=prompt, modality_mask=pairs)
    layer, params = init(**options)
    params = perturbed(params)
    y = jax.jit(lambda p: layer.apply(p, X, mask=CAUSAL))(params)
    np.testing.assert_allclose(y, reference(params, START, IMAGE, prompt, pairs), atol=2e-5, rtol=1e-5)


def test_initial_parameters_and_no_image_are_softmax_attention():
    softmax = attn.build("softmax", num_heads=H, head_dim=D, position="rope")
    layer, params = init(image_start=START, image_tokens=IMAGE, position="rope")
    np.testing.assert_array_equal(np.asarray(params["params"]["modality_fuser"]), np.eye(D))
    base = {"params": {name: params["params"][name] for name in ("query", "key", "value", "out")}}
    want = softmax.apply(base, X, mask=CAUSAL)
    np.testing.assert_allclose(layer.apply(params, X, mask=CAUSAL), want, atol=1e-6, rtol=1e-6)
    plain, plain_params = init(image_start=START, image_tokens=0, position="rope")
    assert set(plain_params["params"]) == {"query", "key", "value", "out"}
    np.testing.assert_array_equal(
        plain.apply(plain_params, X, mask=CAUSAL), softmax.apply(plain_params, X, mask=CAUSAL)
    )
    moved = layer.apply(perturbed(params), X, mask=CAUSAL)
    assert float(jnp.abs(moved[:, START:] - want[:, START:]).max()) > 1e-3


def test_answer_tokens_change_no_earlier_output_with_a_prompt_bound():
    layer, params = init(image_start=START, image_tokens=IMAGE, prompt_tokens=PROMPT)
    params, cut = perturbed(params), START + IMAGE + PROMPT
    run = jax.jit(lambda x: layer.apply(params, x, mask=CAUSAL))
    changed = X.at[:, cut:].set(jax.random.normal(jax.random.key(5), (B, T - cut, E)))
    y, y2 = run(X), run(changed)
    np.testing.assert_array_equal(y[:, :cut], y2[:, :cut])
    assert float(jnp.abs(y[:, cut:] - y2[:, cut:]).max()) > 1e-4
    # without the bound every text token enters the Gram, so the answer reaches the visual keys
    unbounded, _ = init(image_start=START, image_tokens=IMAGE)
    leak = jax.jit(lambda x: unbounded.apply(params, x, mask=CAUSAL))
    assert float(jnp.abs(leak(X)[:, START:cut] - leak(changed)[:, START:cut]).max()) > 1e-5


def test_decoding_after_a_prefill_of_image_and_prompt_equals_the_forward():
    layer, params = init(
        image_start=START, image_tokens=IMAGE, prompt_tokens=PROMPT, modality_mask=(True, False, True, True)
    )
    layer = layer.clone(position="rope")
    params = perturbed(params)
    step = jax.jit(lambda variables, x: layer.apply(variables, x, mask=CAUSAL, decode=True, mutable=["cache"]))
    shapes = jax.eval_shape(step, params, X)[1]["cache"]
    cache, outs, start = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), [], 0
    for size in (START + IMAGE + PROMPT, 1, 1):
        y, state = step({**params, "cache": cache}, X[:, start : start + size])
        outs.append(y)
        cache, start = state["cache"], start + size
    full = layer.apply(params, X, mask=CAUSAL)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5, rtol=1e-5)


def test_gradients_reach_the_alignment_parameters():
    layer, params = init(image_start=START, image_tokens=IMAGE, prompt_tokens=PROMPT)
    params = perturbed(params)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, X, mask=CAUSAL) ** 2)))(params)["params"]
    assert float(jnp.abs(grads["modality_ratio"]).min()) > 0
    assert float(jnp.abs(grads["modality_fuser"]).max()) > 0


def test_bad_input_names_the_argument():
    layer, params = init(image_start=START, image_tokens=IMAGE, modality_mask=(True, False, True, True))
    with pytest.raises(ValueError, match="image_tokens=3 = 4 exceeds the length 3 of x"):
        layer.apply(params, X[:, :3], mask=CAUSAL)
    with pytest.raises(ValueError, match="self-attention over the mixed sequence; got a context of shape"):
        layer.apply(params, X, context=X, mask=CAUSAL)
    with pytest.raises(ValueError, match="already has mask_fn"):
        layer.apply(params, X, mask=attn.Mask(mask_fn=attn.cross.modality_mutual.ModalityMutualPattern(0, 1, 2)))
    with pytest.raises(ValueError, match="modality_mask=\\(True, False\\) must be a tuple of 4 bools"):
        attn.build("moda", num_heads=H, head_dim=D, modality_mask=(True, False))
    with pytest.raises(ValueError, match="prompt_tokens=-1 must be None or a non-negative int"):
        attn.build("moda", num_heads=H, head_dim=D, prompt_tokens=-1)
