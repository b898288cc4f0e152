"""`tcpa`: top-k prompt matching by explicit loops, the prompt-free reduction, a numpy reference with the
coordinated mask (CLS rows see only CLS prompts, image rows only their matched image prompts), and bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.cross.tcpa import match_prompts

B, T, E, H, D = 2, 5, 8, 2, 4
PC, PI, KC, KI = 3, 4, 1, 2
X = jax.random.normal(jax.random.key(0), (B, T, E))


def loop_match(tokens, keys, top_k):
    selected = np.zeros((*tokens.shape[:2], keys.shape[0]), bool)
    losses = []
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            cos = [tokens[b, t] @ k / np.linalg.norm(tokens[b, t]) / np.linalg.norm(k) for k in keys]
            for j in np.argsort(cos)[::-1][:top_k]:
                selected[b, t, j] = True
                losses.append(1 - cos[j])
    return selected, np.mean(losses)


def test_matching_selects_the_most_similar_keys():
    keys = np.asarray(jax.random.normal(jax.random.key(1), (PI, E)))
    selected, loss = match_prompts(X, keys, KI)
    want_selected, want_loss = loop_match(np.asarray(X, np.float64), keys.astype(np.float64), KI)
    np.testing.assert_array_equal(selected, want_selected)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)


def test_a_zero_token_has_finite_matching_gradients():
    # a zero-initialised class token after a LayerNorm with zero bias is the zero vector; its cosine is 0 and the
    # matching loss's gradient must stay finite (the training step of a VLM with vision_cls_token went NaN)
    tokens = X.at[:, 0].set(0.0)
    keys = jax.random.normal(jax.random.key(1), (PI, E))
    grads = jax.grad(lambda t, k: match_prompts(t, k, KI)[1], argnums=(0, 1))(tokens, keys)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)
    # the zero token's selected pairs have cosine 0 (loss 1 each); the other tokens' as the explicit loop
    rest = loop_match(np.asarray(X[:, 1:], np.float64), np.asarray(keys, np.float64), KI)[1]
    want = (rest * (T - 1) + 1.0) / T
    np.testing.assert_allclose(match_prompts(tokens, keys, KI)[1], want, rtol=1e-5)


def init(**options):
    layer = attn.build("tcpa", num_heads=H, head_dim=D, **options)
    return layer, {"params": nn.unbox(layer.init(jax.random.key(2), X)["params"])}


def test_no_prompts_is_plain_softmax_attention():
    layer, params = init(cls_prompts=0, image_prompts=0)
    softmax = attn.build("softmax", num_heads=H, head_dim=D, position="none")
    run = jax.jit(lambda module: module.apply(params, X), static_argnums=0)
    np.testing.assert_allclose(run(layer), run(softmax), atol=1e-6, rtol=1e-6)


def test_layer_matches_a_reference_with_the_coordinated_mask():
    layer, params = init(cls_prompts=PC, image_prompts=PI, cls_top_k=KC, image_top_k=KI)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    x = np.asarray(X, np.float64)
    shift = lambda name: p[name] - 1.0  # noqa: E731  (the parameters store uniform [0, 2) values)
    cls_sel, _ = loop_match(x[:, :1], shift("cls_keys"), KC)
    img_sel, _ = loop_match(x[:, 1:], shift("image_keys"), KI)
    proj = lambda a, name: np.einsum("bte,ehd->bthd", a, p[name]["kernel"])  # noqa: E731
    source = np.concatenate(
        [np.broadcast_to(np.concatenate([shift("cls_prompts"), shift("image_prompts")]), (B, PC + PI, E)), x], 1
    )
    q, k, v = proj(x, "query"), proj(source, "key"), proj(source, "value")
    heads = np.zeros((B, T, H, D))
    for b in range(B):
        for t in range(T):
            allowed = np.ones(PC + PI + T, bool)
            allowed[:PC] = cls_sel[b, 0] if t == 0 else False  # CLS row: its matched CLS prompts only
            allowed[PC : PC + PI] = img_sel[b, t - 1] if t > 0 else False  # image rows: their matched image prompts
            for h in range(H):
                logits = np.where(allowed, k[b, :, h] @ q[b, t, h] / np.sqrt(D), -np.inf)
                w = np.exp(logits - logits.max())
                heads[b, t, h] = (w / w.sum()) @ v[b, :, h]
    want = np.einsum("bthd,hde->bte", heads, p["out"]["kernel"])
    y, state = jax.jit(lambda params: layer.apply(params, X, mutable=["losses"]))(params)
    np.testing.assert_allclose(y, want, atol=2e-5, rtol=1e-5)
    (loss,) = state["losses"]["prompt_matching"]
    assert 0.0 < float(loss) < 4.0


def test_bad_input_names_the_argument():
    layer, params = init()
    with pytest.raises(ValueError, match="tcpa takes no mask"):
        layer.apply(params, X, mask=attn.Mask(causal=True))
    with pytest.raises(ValueError, match="got a context"):
        layer.apply(params, X, context=X)
    with pytest.raises(ValueError, match="image_top_k=5 exceeds image_prompts=4"):
        attn.build("tcpa", num_heads=H, head_dim=D, image_top_k=5).init(jax.random.key(0), X)
    with pytest.raises(ValueError, match="position='rope'"):
        attn.build("tcpa", num_heads=H, head_dim=D, position="rope")
    with pytest.raises(ValueError, match="top_k=5 exceeds the 4 prompts"):
        match_prompts(X, jnp.ones((4, E)), 5)
