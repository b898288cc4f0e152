"""`dcal`: attention rollout against an explicit loop, the top-R selection, the layer's exact reductions (no context =
softmax, PWCA with an empty distractor = SA, GLCA over all tokens = SA), gradients, and the ViT assembly: its SA
branch is the softmax ViT, PWCA with the image itself as distractor equals SA, PWCA is off at inference, and the
trainer's loss equals the paper's uncertainty-weighted sum."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import attn
from attn.cross.dcal import attention_rollout, local_query_count, select_local_queries
from attn.models import ViT

B, T, E, H, D = 2, 5, 8, 2, 4
X = jax.random.normal(jax.random.key(0), (B, T, E))


def loop_rollout(weights):
    """Ŝ_L = S̄_L ... S̄_1 with S̄ = 0.5 mean_h S + 0.5 I, by explicit loops over entries."""
    batch, _, length, _ = weights[0].shape
    out = np.zeros((batch, length, length))
    for b in range(batch):
        acc = np.eye(length)
        for w in weights:
            bar = 0.5 * w[b].mean(0) + 0.5 * np.eye(length)
            nxt = np.zeros((length, length))
            for i in range(length):
                for j in range(length):
                    nxt[i, j] = sum(bar[i, m] * acc[m, j] for m in range(length))
            acc = nxt
        out[b] = acc
    return out


def test_rollout_matches_an_explicit_loop():
    logits = np.asarray(jax.random.normal(jax.random.key(1), (3, B, H, T, T)))
    weights = [np.exp(x) / np.exp(x).sum(-1, keepdims=True) for x in logits]
    got = attention_rollout([jnp.asarray(w) for w in weights])
    np.testing.assert_allclose(got, loop_rollout(weights), atol=1e-6)
    np.testing.assert_allclose(np.asarray(got).sum(-1), 1.0, atol=1e-6)  # rows stay distributions
    with pytest.raises(ValueError, match="weights"):
        attention_rollout([])


def test_selection_keeps_cls_and_the_top_r_patches():
    rollout = jax.random.uniform(jax.random.key(2), (3, 10, 10))
    for count in (1, 4, 9):
        index = np.asarray(select_local_queries(rollout, count))
        assert index.shape == (3, 1 + count)
        for b in range(3):
            assert index[b, 0] == 0 and len(set(index[b])) == 1 + count
            row = np.asarray(rollout[b, 0, 1:])
            assert set(index[b, 1:]) == set(np.argsort(-row)[:count] + 1)
    assert local_query_count(64, 0.1) == 6 and local_query_count(3, 0.1) == 1
    with pytest.raises(ValueError, match="count"):
        select_local_queries(rollout, 10)


def layer_and_params():
    layer = attn.build("dcal", num_heads=H, head_dim=D)
    return layer, {"params": nn.unbox(layer.init(jax.random.key(3), X)["params"])}


def test_layer_reductions_to_softmax_attention():
    layer, params = layer_and_params()
    sa = layer.apply(params, X)
    softmax = attn.build("softmax", num_heads=H, head_dim=D, position="none")
    np.testing.assert_allclose(sa, softmax.apply(params, X), atol=1e-6)
    # PWCA with a zero-length distractor: keys/values [x; nothing] = x.
    np.testing.assert_allclose(layer.apply(params, X, context=X), sa, atol=1e-6)
    # GLCA with R = all patches: the selected queries (CLS first, then every patch by response) over all tokens
    # are SA's rows in that order.
    index = select_local_queries(jax.random.uniform(jax.random.key(4), (B, T, T)), T - 1)
    local = jnp.take_along_axis(X, index[..., None], axis=1)
    glca = layer.apply(params, local, context=X)
    np.testing.assert_allclose(glca, jnp.take_along_axis(sa, index[..., None], axis=1), atol=1e-6)


def test_pwca_matches_a_numpy_reference_and_has_gradients():
    layer, params = layer_and_params()
    x2 = jax.random.normal(jax.random.key(5), (B, T, E))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    x, c = np.asarray(X, np.float64), np.concatenate([np.asarray(X), np.asarray(x2)], 1).astype(np.float64)
    q = np.einsum("bte,ehd->bthd", x, p["query"]["kernel"])
    k, v = (np.einsum("bte,ehd->bthd", c, p[n]["kernel"]) for n in ("key", "value"))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    heads = np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v)
    want = np.einsum("bthd,hde->bte", heads, p["out"]["kernel"])
    got = layer.apply(params, X, context=jnp.concatenate([X, x2], 1))
    np.testing.assert_allclose(got, want, atol=2e-5)
    f = lambda x, c: layer.apply(params, x[:1, :3], context=c[:1, :4])  # noqa: E731
    check_grads(f, (X, jnp.concatenate([X, x2], 1)), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_bad_input_names_the_argument():
    layer, params = layer_and_params()
    with pytest.raises(ValueError, match="context width"):
        layer.apply(params, X, context=jnp.zeros((B, 3, E + 1)))
    with pytest.raises(ValueError, match="local_ratio"):
        attn.build("dcal", num_heads=H, head_dim=D, local_ratio=1.5)
    with pytest.raises(ValueError, match="pool='cls'"):
        model = ViT(num_classes=3, patch_size=4, num_layers=1, d_model=8, num_heads=2, mlp_dim=8, pool="mean",
                    attention="dcal")  # fmt: skip
        model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


# ---------------------------------------------------------------- the ViT assembly
C = 3
VIT = dict(num_classes=C, patch_size=4, num_layers=2, d_model=16, num_heads=2, mlp_dim=16, pool="cls")
IMAGES = jax.random.uniform(jax.random.key(6), (2, 8, 8, 3))


@pytest.fixture(scope="module")
def vit():
    model = ViT(**VIT, attention="dcal", attention_options={"local_ratio": 0.5})
    params = nn.unbox(model.init(jax.random.key(7), IMAGES)["params"])
    params["dcal_loss_weights"] = jnp.array([0.3, -0.2, 0.5])

    @jax.jit
    def train(params, images):
        return model.apply({"params": params}, images, deterministic=False, mutable=["losses", "intermediates"])

    return model, params, train


def test_sa_branch_is_the_softmax_vit_and_pwca_with_itself_is_sa(vit):
    model, params, train = vit
    softmax = ViT(**VIT, attention="softmax", attention_options={"position": "none"})
    shared = {k: v for k, v in params.items() if not k.startswith(("glca", "dcal"))}
    want = softmax.apply({"params": shared}, IMAGES)
    same = jnp.stack([IMAGES[0], IMAGES[0]])  # each image's distractor is itself: K_c = [K; K], V_c = [V; V]
    _, state = train(params, same)
    sa, glca, pwca = state["intermediates"]["dcal_branch_logits"][0]
    np.testing.assert_allclose(sa, softmax.apply({"params": shared}, same), atol=1e-5)
    np.testing.assert_allclose(pwca, sa, atol=1e-5)
    _, state = train(params, IMAGES)
    sa, glca, pwca = state["intermediates"]["dcal_branch_logits"][0]
    np.testing.assert_allclose(sa, want, atol=1e-5)
    assert np.abs(np.asarray(pwca - sa)).max() > 1e-4  # a different distractor changes the PWCA branch
    assert state["intermediates"]["dcal_local_indices"][0].shape == (2, 1 + 2)  # CLS + 50% of 4 patches


def test_trainer_loss_is_the_uncertainty_weighted_sum(vit):
    _, params, train = vit
    labels = np.array([1, 2])
    z, state = train(params, IMAGES)
    branches = np.asarray(state["intermediates"]["dcal_branch_logits"][0], np.float64)
    (sown,) = state["losses"]["dcal_uncertainty"]
    z = np.asarray(z, np.float64)
    trainer = np.mean(-(z[np.arange(2), labels] - np.log(np.exp(z).sum(-1)))) + float(sown)
    w = np.array([0.3, -0.2, 0.5])
    ce = [np.mean(np.log(np.exp(b).sum(-1)) - b[np.arange(2), labels]) for b in branches]
    np.testing.assert_allclose(trainer, 0.5 * sum(np.exp(-w[i]) * ce[i] + w[i] for i in range(3)), rtol=1e-5)


def test_inference_is_sa_plus_glca_without_the_pair(vit):
    model, params, train = vit
    infer = jax.jit(lambda p, images: model.apply({"params": p}, images))
    other = IMAGES.at[1].set(1.0 - IMAGES[1])
    np.testing.assert_allclose(infer(params, IMAGES)[0], infer(params, other)[0], atol=1e-6)  # no pair at inference
    assert np.abs(np.asarray(train(params, IMAGES)[0][0] - train(params, other)[0][0])).max() > 1e-4
    _, state = train(params, IMAGES)
    sa, glca, _ = state["intermediates"]["dcal_branch_logits"][0]
    want = np.log(0.5 * (jax.nn.softmax(sa) + jax.nn.softmax(glca)))
    np.testing.assert_allclose(infer(params, IMAGES), want, atol=1e-5)


@pytest.mark.slow  # a second compile (the gradient of the three-branch ViT)
def test_every_parameter_gets_a_gradient(vit):
    model, params, _ = vit

    def loss(p):
        z, state = model.apply({"params": p}, IMAGES, deterministic=False, mutable=["losses"])
        return -jnp.mean(z[:, 0]) + sum(jnp.sum(x) for x in jax.tree.leaves(state["losses"]))

    grads = jax.jit(jax.grad(loss))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)
