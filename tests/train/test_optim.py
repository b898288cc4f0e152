"""Optimizer: schedule values, clipping, gradient accumulation, weight-decay mask."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train.optim import decay_mask, global_norm, make_optimizer, param_norm


def test_warmup_then_cosine_values():
    cfg = {"learning_rate": 1e-3, "warmup_steps": 10, "min_lr_ratio": 0.1}
    _, lr = make_optimizer(cfg, total_steps=110)
    floor = 1e-4
    expected = {
        0: 0.0,
        5: 0.5e-3,
        10: 1e-3,
        35: floor + (1e-3 - floor) * 0.5 * (1 + math.cos(math.pi * 0.25)),
        60: floor + (1e-3 - floor) * 0.5,
        110: floor,
        500: floor,
    }
    for step, value in expected.items():
        np.testing.assert_allclose(float(lr(step)), value, rtol=1e-5, atol=1e-9, err_msg=f"step {step}")
    # The optimizer applies the same rate: with b1=b2=0 and large eps the update is -lr * g / eps.
    tx, _ = make_optimizer({**cfg, "b1": 0.0, "b2": 0.0, "eps": 1e6}, total_steps=110)
    params = {"w": jnp.zeros(3)}
    state, update = tx.init(params), jax.jit(tx.update)
    for _ in range(6):
        updates, state = update({"w": jnp.ones(3)}, state, params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -float(lr(5)) / (1e6 + 1), rtol=1e-4)


def test_bad_config_messages():
    with pytest.raises(ValueError, match=r"unknown fields \['learnin_rate'\]"):
        make_optimizer({"learnin_rate": 1e-3}, total_steps=10)
    with pytest.raises(ValueError, match=r"warmup_steps=20; expected 0 <= warmup_steps <= total_steps=10"):
        make_optimizer({"learning_rate": 1e-3, "warmup_steps": 20}, total_steps=10)


def _update_norm(clip_norm, grad_scale):
    # b1 = b2 = 0 and eps >> |g| make Adam's update ~ -lr * g / eps, so it reflects the clipped gradient.
    cfg = {"learning_rate": 1.0, "b1": 0.0, "b2": 0.0, "eps": 1e3, "clip_norm": clip_norm}
    tx, _ = make_optimizer(cfg, total_steps=10)
    params = {"a": jnp.zeros((4, 4)), "b": jnp.zeros(4)}
    grads = jax.tree.map(lambda p: jnp.full_like(p, grad_scale), params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    return float(global_norm(updates)), float(global_norm(grads))


def test_clipping_bounds_update_norm():
    clipped, grad_norm = _update_norm(clip_norm=1.0, grad_scale=10.0)
    assert grad_norm > 40.0
    assert clipped <= 1.0 / 1e3 * (1 + 1e-5)
    unclipped, _ = _update_norm(clip_norm=None, grad_scale=10.0)
    assert unclipped > 10 * clipped
    # Below the threshold nothing changes.
    small_clip, _ = _update_norm(clip_norm=1e3, grad_scale=0.01)
    small_free, _ = _update_norm(clip_norm=0, grad_scale=0.01)
    np.testing.assert_allclose(small_clip, small_free, rtol=1e-6)


def _apply(tx, grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def test_grad_accumulation_equals_one_step_on_mean_gradient():
    k = 4
    cfg = {"learning_rate": 0.1, "weight_decay": 0.01, "clip_norm": 0.5, "min_lr_ratio": 0.2}
    key = jax.random.key(0)
    params0 = {"dense": {"kernel": jax.random.normal(key, (3, 5)), "bias": jnp.ones(5)}}
    micro = [
        jax.tree.map(lambda p, i=i: jnp.sin(jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape) + i), params0)
        for i in range(2 * k)
    ]
    # Two accumulated updates over 2k micro-steps ...
    tx_acc, lr_acc = make_optimizer({**cfg, "grad_accum_steps": k}, total_steps=2 * k)
    params, state = params0, tx_acc.init(params0)
    step_acc = jax.jit(lambda g, s, p: _apply(tx_acc, g, s, p))
    for step, g in enumerate(micro):
        params, state = step_acc(g, state, params)
        if step == 0:  # Micro-steps before the k-th change nothing.
            np.testing.assert_array_equal(params["dense"]["kernel"], params0["dense"]["kernel"])
    # ... equal two plain updates on the mean gradients.
    tx_big, lr_big = make_optimizer(cfg, total_steps=2)
    big, big_state = params0, tx_big.init(params0)
    step_big = jax.jit(lambda g, s, p: _apply(tx_big, g, s, p))
    for u in range(2):
        mean = jax.tree.map(lambda *gs: sum(gs) / k, *micro[u * k : (u + 1) * k])
        big, big_state = step_big(mean, big_state, big)
    assert float(global_norm(jax.tree.map(jnp.subtract, big, params0))) > 0.01
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(big), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    # The reported schedule is the rate of the update each micro-step feeds.
    assert [float(lr_acc(s)) for s in range(2 * k)] == [float(lr_big(0))] * k + [float(lr_big(1))] * k


class _Model(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(16, 8, name="embed")(tokens)
        x = x + self.param("pos_embedding", nn.initializers.zeros, (1, tokens.shape[1], 8))
        x = nn.LayerNorm(name="norm")(x)
        x = nn.Dense(8, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")))(x)
        x = x * self.param("qk_scale", nn.initializers.ones, (2, 4)).reshape(8)
        return nn.Dense(16, name="head")(x)


def test_weight_decay_mask_by_path():
    variables = jax.jit(_Model().init)(jax.random.key(0), jnp.zeros((2, 3), jnp.int32))
    mask = nn.meta.unbox(decay_mask(variables["params"]))
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): v
        for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]
    }
    assert flat == {
        "embed/embedding": False,
        "pos_embedding": False,
        "norm/scale": False,
        "norm/bias": False,
        "Dense_0/kernel": True,
        "Dense_0/bias": False,
        "qk_scale": False,
        "head/kernel": True,
        "head/bias": False,
    }
    # Decay really is masked: with zero gradients only the decayed kernels shrink.
    params = nn.meta.unbox(variables["params"])
    tx, _ = make_optimizer({"learning_rate": 0.1, "weight_decay": 0.5}, total_steps=10)
    state, update = tx.init(params), jax.jit(tx.update)
    for _ in range(2):
        updates, state = update(jax.tree.map(jnp.zeros_like, params), state, params)
    moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
    assert moved["head"]["kernel"] and moved["Dense_0"]["kernel"]
    assert not moved["embed"]["embedding"] and not moved["norm"]["scale"] and not moved["head"]["bias"]


def test_norm_helpers():
    tree = {"a": jnp.full((2, 2), 1.0), "b": jnp.array([2.0], jnp.bfloat16)}
    np.testing.assert_allclose(float(global_norm(tree)), math.sqrt(4 + 4), rtol=1e-6)
    np.testing.assert_allclose(float(param_norm(tree)), float(optax.tree.norm(tree)), rtol=1e-6)
