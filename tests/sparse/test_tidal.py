"""`tidal`: the selection against loop-by-loop numpy, a sparse decode step against softmax over the carried positions,
and a decoder whose budget covers the context decoding exactly like `softmax` (the cross-layer carry of the stack)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.core.layer_carry import current_carry, layer_carry
from attn.models import DecoderLM, init_cache
from attn.sparse.tidal import CARRY_KEY, tidal_positions
from tests.sparse.sparse_reference import random_qk


def test_positions_match_numpy():
    q, k, _ = random_qk(1, 2, 1, 7, 4, 2, 4)
    ids = np.asarray(tidal_positions(q, k, top_k=3, position=5))
    for b in range(2):
        for h in range(4):
            logits = [q[b, 0, h] @ k[b, j, h // 2] for j in range(5)]
            best = sorted(range(5), key=lambda j: (-logits[j], j))[:2]
            assert sorted(ids[b, h, 0]) == sorted(best + [5])
    early = np.asarray(tidal_positions(q, k, top_k=4, position=1))  # only one earlier slot: the rest unused
    assert sorted(early[0, 0, 0]) == [-1, -1, 0, 1]
    with pytest.raises(ValueError, match="top_k=0"):
        tidal_positions(q, k, top_k=0, position=1)


def layer_step(layer, x, carry_positions):
    """Decode x [B, 6, E] as a 5-token chunk then one token; the last step under a carry holding carry_positions."""
    variables = layer.init(jax.random.key(0), x)
    params = {"params": variables["params"]}
    _, cache = layer.apply(params, jnp.zeros_like(x), decode=True, mutable=["cache"])
    _, cache = layer.apply({**params, **cache}, x[:, :5], decode=True, mutable=["cache"])
    with layer_carry() as carry:
        if carry_positions is not None:
            carry[CARRY_KEY] = carry_positions
        y, _ = layer.apply({**params, **cache}, x[:, 5:], decode=True, mutable=["cache"])
        selected = current_carry().get(CARRY_KEY)
    return y, selected, nn.unbox(params)


def test_selection_and_sparse_layers_at_a_decode_step():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 6, 8)), jnp.float32)
    options = dict(num_heads=2, head_dim=4, position="none", top_k=3, sparse_layer_start=1, correction_layer=3)
    chosen = jnp.asarray([[[[0, 2, 5]], [[4, 5, -1]]]], jnp.int32)

    def run(x):
        select = layer_step(attn.build("tidal", layer_index=1, **options), x, None)
        sparse = layer_step(attn.build("tidal", layer_index=2, **options), x, chosen)
        return select, sparse

    (y_sel, picked, params), (y_sparse, _, _) = jax.jit(run)(x)
    p = params["params"]
    xs = np.asarray(x[0], np.float64)
    q = np.einsum("te,ehd->thd", xs, p["query"]["kernel"])
    k = np.einsum("te,ehd->thd", xs, p["key"]["kernel"])
    v = np.einsum("te,ehd->thd", xs, p["value"]["kernel"])

    def attend(keep):
        o = np.zeros((2, 4))
        for h in range(2):
            s = np.array([q[5, h] @ k[j, h] / 2.0 for j in keep[h]])
            w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            o[h] = w @ v[keep[h], h]
        return np.einsum("hd,hde->e", o, p["out"]["kernel"])

    full = [list(range(6))] * 2
    np.testing.assert_allclose(y_sel[0, 0], attend(full), rtol=1e-5, atol=1e-6)  # a selection layer attends fully
    for h in range(2):
        best = sorted(range(5), key=lambda j: (-(q[5, h] @ k[j, h]), j))[:2]
        assert sorted(np.asarray(picked)[0, h, 0].tolist()) == sorted(best + [5])
    np.testing.assert_allclose(y_sparse[0, 0], attend([[0, 2, 5], [4, 5]]), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # two 4-layer decoders, prefill and three decode steps jitted: ~30 s on 2 shared cores
def test_full_budget_decodes_like_softmax_and_a_small_one_does_not():
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 11, size=(1, 7)), jnp.int32)
    common = dict(vocab_size=11, num_layers=4, d_model=8, num_heads=2, mlp_dim=16, num_kv_heads=1)
    tidal = dict(sparse_layer_start=1, correction_layer=2)
    models = {
        "softmax": DecoderLM(attention="softmax", **common),
        "full": DecoderLM(attention="tidal", attention_options={"top_k": 64, **tidal}, **common),
        "small": DecoderLM(attention="tidal", attention_options={"top_k": 2, **tidal}, **common),
    }

    def decode(model, params):
        cache = init_cache(model, params, 1, 7)
        logits, state = model.apply({**params, "cache": cache}, tokens[:, :4], decode=True, mutable=["cache"])
        steps = [logits[:, -1]]
        for t in range(4, 7):
            logits, state = model.apply({**params, **state}, tokens[:, t : t + 1], decode=True, mutable=["cache"])
            steps.append(logits[:, -1])
        return jnp.stack(steps)

    def run(tokens):
        params = {"params": models["softmax"].init(jax.random.key(0), tokens)["params"]}
        return {name: decode(model, params) for name, model in models.items()}

    out = jax.jit(run)(tokens)
    np.testing.assert_allclose(out["full"], out["softmax"], atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(out["small"][0], out["softmax"][0], atol=2e-5, rtol=2e-5)  # the prefill is dense
    assert float(jnp.max(jnp.abs(out["small"][1:] - out["softmax"][1:]))) > 1e-4


@pytest.mark.slow  # an eager layer init and three decode calls: ~30 s on 2 shared cores
def test_sparse_layer_without_a_selection_raises():
    x = jnp.ones((1, 6, 8))
    layer = attn.build("tidal", num_heads=2, head_dim=4, layer_index=3, sparse_layer_start=1, correction_layer=2)
    with pytest.raises(ValueError, match="no token-selection layer ran before it"):
        layer_step(layer, x, None)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="window=4"):
        attn.build("tidal", num_heads=2, head_dim=4, window=4).init(jax.random.key(0), jnp.ones((1, 6, 8)))
    with pytest.raises(ValueError, match="top_k=0"):
        attn.build("tidal", num_heads=2, head_dim=4, top_k=0)
