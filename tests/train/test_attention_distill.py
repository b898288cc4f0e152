"""Hedgehog attention distillation as configs/finetune.py:hedgehog trains it: each layer's sown loss equals a numpy
re-implementation (softmax teacher weights of the layer's q, k against the normalised weights of the spiky feature
maps, KL per row = cross-entropy minus the teacher's entropy), and with loss_weights.losses = 0 the trainer's step
is the distill=False step bit for bit."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from configs import finetune
from train import run as run_api

RNG = np.random.default_rng(0)


def numpy_distillation(x, params, *, heads, kv_heads):
    """Mean over (batch, head, query) rows of sum_j p_ij log(p_ij / a_ij), causal: p = softmax(q k / sqrt(D)),
    a_ij = phi(q_i) . phi(k_j) / sum_j' phi(q_i) . phi(k_j'), phi(y) = exp(y W + b) ⊕ exp(-(y W + b))."""
    x = np.asarray(x, np.float64)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    q, k = (np.einsum("bte,ehd->bthd", x, p[name]["kernel"]) for name in ("query", "key"))
    batch, length, _, dim = q.shape

    def phi(y, table, h):
        z = y @ p[table]["kernel"][h] + p[table]["bias"][h]
        return np.concatenate([np.exp(z), np.exp(-z)])

    rows = []
    for b in range(batch):
        for h in range(heads):
            g = h // (heads // kv_heads)
            for i in range(length):
                logits = np.array([q[b, i, h] @ k[b, j, g] / np.sqrt(dim) for j in range(i + 1)])
                teacher = np.exp(logits - logits.max())
                teacher /= teacher.sum()
                scores = np.array(
                    [
                        phi(q[b, i, h], "query_feature_map", h) @ phi(k[b, j, g], "key_feature_map", g)
                        for j in range(i + 1)
                    ]
                )
                student = scores / scores.sum()
                rows.append(np.sum(teacher * np.log(teacher / student)))
    return float(np.mean(rows))


def test_sown_distillation_loss_equals_numpy():
    heads, kv_heads, dim, width = 2, 1, 4, 8
    layer = attn.build("hedgehog", num_heads=heads, num_kv_heads=kv_heads, head_dim=dim, distill=True)
    x = jnp.asarray(RNG.standard_normal((2, 5, width)), jnp.float32)
    shapes = {
        "query": {"kernel": (width, heads, dim)},
        "key": {"kernel": (width, kv_heads, dim)},
        "value": {"kernel": (width, kv_heads, dim)},
        "out": {"kernel": (heads, dim, width)},
        "query_feature_map": {"kernel": (heads, dim, dim), "bias": (heads, dim)},
        "key_feature_map": {"kernel": (kv_heads, dim, dim), "bias": (kv_heads, dim)},
    }
    abstract = jax.eval_shape(lambda: nn.unbox(layer.init(jax.random.key(1), x)["params"]))
    assert jax.tree.map(lambda a: a.shape, abstract) == shapes  # the layer's parameters, drawn at random here
    is_shape = lambda v: isinstance(v, tuple)  # noqa: E731
    params = jax.tree.map(lambda s: jnp.asarray(0.5 * RNG.standard_normal(s), jnp.float32), shapes, is_leaf=is_shape)
    apply = jax.jit(lambda p: layer.apply({"params": p}, x, mask=attn.Mask(causal=True), mutable=["losses"])[1])
    (loss,) = apply(params)["losses"]["hedgehog_distillation"]
    expected = numpy_distillation(x, params, heads=heads, kv_heads=kv_heads)
    assert expected > 1e-3
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)


def _config(distill, weight):
    config = finetune.get_config("hedgehog,smoke")
    config.total_steps = 2
    config.checkpoint_every = 2
    config.log_every = 1
    config.eval_every = 0
    config.eval.stats_batch_size = 0
    config.eval.num_batches = 1
    config.model.attention_options.distill = distill
    config.loss_weights.losses = weight
    return config


@pytest.mark.slow
def test_weight_zero_is_the_baseline_step_bit_for_bit(tmp_path):
    """distill=True with loss_weights.losses=0 trains exactly as distill=False; weight 10 logs 10x the summed
    per-layer losses as aux_loss and changes the feature maps."""
    runs = {}
    for name, distill, weight in (("base", False, 1.0), ("zero", True, 0.0), ("ten", True, 10.0)):
        result = run_api.train(_config(distill, weight), str(tmp_path / name))
        runs[name] = (result, jax.device_get(run_api.load_run(str(tmp_path / name)).params))
    same = jax.tree.map(np.array_equal, runs["base"][1], runs["zero"][1])
    assert all(jax.tree.leaves(same))
    assert runs["zero"][0].train_metrics["train/loss"] == runs["base"][0].train_metrics["train/loss"]
    assert runs["base"][0].train_metrics["train/aux_loss"] == 0.0
    assert runs["ten"][0].train_metrics["train/aux_loss"] > 0.0
    moved = runs["ten"][1]["layers_0"]["attention"]["query_feature_map"]["kernel"]
    assert not np.array_equal(moved, runs["base"][1]["layers_0"]["attention"]["query_feature_map"]["kernel"])
