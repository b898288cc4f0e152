"""implementation=None routes softmax / linear attention to the Pallas kernels on GPU/TPU, XLA otherwise.

CPU has no kernels, so these tests pretend to be a GPU (dispatch.platform) and run the kernels in interpret mode:
the routing, the Mask -> kernel-argument translation and the fallbacks are what is checked, against XLA.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
import pallas_kernels
from attn import functional as F
from attn.core import dispatch, kernels

BLOCKS = {"block_q": 16, "block_k": 16, "block_q_dkv": 16, "block_k_dkv": 16, "block_q_dq": 16, "block_k_dq": 16}


@pytest.fixture
def fake_gpu(monkeypatch):
    """A GPU platform whose kernels run in interpret mode; records each kernel call."""
    calls = []

    def spy(fn, name, **fixed):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs, **fixed)

        return wrapped

    monkeypatch.setattr(dispatch, "platform", lambda: "gpu")
    flash = functools.partial(pallas_kernels.flash_attention, backend="gpu", interpret=True, block_sizes=BLOCKS)
    monkeypatch.setattr(pallas_kernels, "flash_attention", spy(flash, "flash"))
    lightning = functools.partial(pallas_kernels.lightning_attention, backend="gpu", interpret=True, chunk_size=16)
    monkeypatch.setattr(pallas_kernels, "lightning_attention", spy(lightning, "lightning"))
    return calls


def _qkv(key, batch=2, q_len=20, kv_len=20, heads=4, kv_heads=2, dim=16):
    kq, kk, kv = jax.random.split(key, 3)
    return (
        jax.random.normal(kq, (batch, q_len, heads, dim)),
        jax.random.normal(kk, (batch, kv_len, kv_heads, dim)),
        jax.random.normal(kv, (batch, kv_len, kv_heads, dim)),
    )


def test_softmax_attention_uses_flash_kernel_with_every_mask_part(fake_gpu):
    q, k, v = _qkv(jax.random.key(0))
    mask = attn.Mask(
        causal=True,
        window=(8, 0),
        q_lengths=jnp.array([20, 13]),
        kv_lengths=jnp.array([20, 13]),
        q_segment_ids=jnp.array([[0] * 10 + [1] * 10, [0] * 20]),
        kv_segment_ids=jnp.array([[0] * 10 + [1] * 10, [0] * 20]),
    )
    bias = 0.1 * jax.random.normal(jax.random.key(1), (1, 4, 20, 20))
    sinks = jnp.array([0.0, 1.0, -1.0, 0.5])
    kwargs = dict(mask=mask, bias=bias, softcap=5.0, sinks=sinks, return_lse=True)

    out, aux = F.softmax_attention(q, k, v, **kwargs)
    assert fake_gpu == ["flash"]
    ref, ref_aux = F.softmax_attention(q, k, v, implementation="xla", **kwargs)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(aux["lse"], ref_aux["lse"], atol=2e-5, rtol=2e-5)
    assert np.all(np.asarray(out)[1, 13:] == 0)  # padded query rows see nothing

    grad = jax.grad(lambda q_: F.softmax_attention(q_, k, v, mask=mask, bias=bias).sum())(q)
    ref_grad = jax.grad(lambda q_: F.softmax_attention(q_, k, v, mask=mask, bias=bias, implementation="xla").sum())(q)
    np.testing.assert_allclose(grad, ref_grad, atol=4e-5, rtol=4e-5)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(dropout_rate=0.1, dropout_rng=jax.random.key(0)), "dropout"),
        (dict(return_probs=True), "return_probs"),
        (dict(q_offset=3), "query offset"),
        (dict(mask=attn.Mask(causal=True, prefix_lengths=4)), "prefix_lengths"),
    ],
)
def test_softmax_attention_falls_back_to_xla_and_says_why(fake_gpu, caplog, kwargs, reason):
    q, k, v = _qkv(jax.random.key(2), batch=1, q_len=8, kv_len=8)
    dispatch.log_choice_once.cache_clear()
    with caplog.at_level(logging.DEBUG, logger="attn"):
        F.softmax_attention(q, k, v, **kwargs)
    assert fake_gpu == []
    assert reason in caplog.text and "using the xla implementation" in caplog.text
    with pytest.raises(ValueError, match=f"implementation='pallas' is not available.*{reason}"):
        F.softmax_attention(q, k, v, implementation="pallas", **kwargs)


@pytest.mark.parametrize("decay", [None, "per_head"])
def test_linear_attention_uses_lightning_kernel(fake_gpu, decay):
    q, k, v = _qkv(jax.random.key(3), q_len=37, kv_len=37, heads=2, kv_heads=2)
    decay = None if decay is None else jnp.array([0.9, 0.99])
    state = jax.random.normal(jax.random.key(4), (2, 2, 16, 17))
    kwargs = dict(decay=decay, feature_map="elu_plus_one", normalize=True, initial_state=state, return_state=True)
    out, final = F.linear_attention(q, k, v, **kwargs)
    assert fake_gpu == ["lightning"]
    ref, ref_final = F.linear_attention(q, k, v, implementation="xla", **kwargs)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(final, ref_final, atol=2e-5, rtol=2e-5)


def test_linear_attention_fallbacks(fake_gpu):
    q, k, v = _qkv(jax.random.key(5), q_len=12, kv_len=12, heads=2, kv_heads=2)
    data_decay = jax.nn.sigmoid(jax.random.normal(jax.random.key(6), (2, 12, 2)))
    F.linear_attention(q, k, v, causal=False)
    F.linear_attention(q, k, v, decay=data_decay)
    F.linear_attention(q, k, v, form="recurrent")
    assert fake_gpu == []
    assert "data-dependent" in kernels.lightning_unavailable(True, data_decay, None, 2, 16, 16)
    with pytest.raises(ValueError, match="causal only"):
        F.linear_attention(q, k, v, causal=False, implementation="pallas")


def test_environment_switch_keeps_everything_on_xla(fake_gpu, monkeypatch):
    monkeypatch.setenv("ATTN_KERNELS", "0")
    q, k, v = _qkv(jax.random.key(7), batch=1, q_len=8, kv_len=8)
    F.softmax_attention(q, k, v, causal=True)
    F.linear_attention(q, k, v)
    assert fake_gpu == []
    with pytest.raises(ValueError, match="ATTN_KERNELS=0"):
        F.softmax_attention(q, k, v, implementation="pallas")
