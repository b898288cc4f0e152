"""Shared checks for the lightning-attention kernel tests: kernel vs the recurrent reference and vs
attn.functional.linear_attention(form="recurrent"), forward and every gradient."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attn.functional import linear_attention
from pallas_kernels.linear import lightning_attention, lightning_attention_reference

# DESIGN.md: fp32 forward 2e-5 (chunked vs token order of sums), gradients twice that.
FORWARD_TOL = 2e-5
GRAD_TOL = 4e-5


def make_inputs(seed, batch, length, heads, kv_heads, key_dim, value_dim, with_decay, with_state):
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = 0.5 * jax.random.normal(keys[0], (batch, length, heads, key_dim))
    k = 0.5 * jax.random.normal(keys[1], (batch, length, kv_heads, key_dim))
    v = jax.random.normal(keys[2], (batch, length, kv_heads, value_dim))
    decay = jax.random.uniform(keys[3], (heads,), minval=0.6, maxval=0.99) if with_decay else None
    state = 0.3 * jax.random.normal(keys[4], (batch, heads, key_dim, value_dim)) if with_state else None
    return q, k, v, decay, state


def attn_recurrent(q, k, v, *, decay=None, initial_state=None, return_state=False):
    """The project's own recurrent linear attention (no feature map, no normaliser), same signature."""
    return linear_attention(
        q, k, v, causal=True, decay=decay, initial_state=initial_state, return_state=return_state, form="recurrent"
    )


def _loss_grads(fn, q, k, v, decay, state, out_weights, state_weights):
    """Gradients of sum(out * w_out) + sum(final_state * w_state) w.r.t. every float input that is given."""
    names = (
        ["q", "k", "v"] + (["decay"] if decay is not None else []) + (["initial_state"] if state is not None else [])
    )
    args = {"q": q, "k": k, "v": v, "decay": decay, "initial_state": state}

    def loss(*values):
        kwargs = dict(args, **dict(zip(names, values, strict=True)))
        out, final = fn(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"), return_state=True, **kwargs)
        return jnp.sum(out * out_weights) + jnp.sum(final * state_weights)

    grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(names)))))(*[args[n] for n in names])
    return dict(zip(names, grads, strict=True))


def check_against_references(
    backend, batch, length, heads, kv_heads, key_dim, value_dim, chunk, with_decay, with_state
):
    q, k, v, decay, state = make_inputs(
        length, batch, length, heads, kv_heads, key_dim, value_dim, with_decay, with_state
    )
    kernel = functools.partial(lightning_attention, chunk_size=chunk, backend=backend, interpret=True)
    out, final = kernel(q, k, v, decay=decay, initial_state=state, return_state=True)
    assert out.shape == (batch, length, heads, value_dim) and out.dtype == q.dtype
    assert final.shape == (batch, heads, key_dim, value_dim) and final.dtype == jnp.float32
    for reference in (lightning_attention_reference, attn_recurrent):
        ref_out, ref_final = reference(q, k, v, decay=decay, initial_state=state, return_state=True)
        np.testing.assert_allclose(out, ref_out, atol=FORWARD_TOL, rtol=FORWARD_TOL)
        np.testing.assert_allclose(final, ref_final, atol=FORWARD_TOL, rtol=FORWARD_TOL)

    weight_keys = jax.random.split(jax.random.PRNGKey(7), 2)
    out_weights = jax.random.normal(weight_keys[0], out.shape)
    state_weights = jax.random.normal(weight_keys[1], final.shape)
    grads = _loss_grads(kernel, q, k, v, decay, state, out_weights, state_weights)
    for reference in (lightning_attention_reference, attn_recurrent):
        expected = _loss_grads(reference, q, k, v, decay, state, out_weights, state_weights)
        for name, value in expected.items():
            # The decay gradient sums position-weighted terms (t * q_t . dq_t, custom_vjp.py): its rounding error
            # grows with the size of those terms, so its absolute tolerance is relative to the gradient's scale.
            scale = float(jnp.max(jnp.abs(value))) if name == "decay" else 1.0
            np.testing.assert_allclose(
                grads[name], value, atol=GRAD_TOL * max(scale, 1.0), rtol=GRAD_TOL, err_msg=f"d{name}"
            )


def check_state_passing(backend, chunk):
    """Two calls, the second starting from the first's final state, equal one call on the whole sequence."""
    q, k, v, decay, state = make_inputs(1, 2, 45, 2, 2, 8, 8, True, True)
    kernel = functools.partial(lightning_attention, decay=decay, chunk_size=chunk, backend=backend, interpret=True)
    whole, whole_final = kernel(q, k, v, initial_state=state, return_state=True)
    split = 21  # not a chunk multiple
    first, mid = kernel(q[:, :split], k[:, :split], v[:, :split], initial_state=state, return_state=True)
    second, last = kernel(q[:, split:], k[:, split:], v[:, split:], initial_state=mid, return_state=True)
    np.testing.assert_allclose(jnp.concatenate([first, second], axis=1), whole, atol=FORWARD_TOL, rtol=FORWARD_TOL)
    np.testing.assert_allclose(last, whole_final, atol=FORWARD_TOL, rtol=FORWARD_TOL)


def check_low_precision(backend, length, chunk, dtype=jnp.bfloat16, interpret=True):
    """FlashAttention's criterion (DESIGN.md): the kernel's error vs the f32 reference is at most twice the error of
    the XLA reference run on the same low-precision inputs, plus 1e-3."""
    q, k, v, decay, _ = make_inputs(3, 1, length, 4, 2, 64, 64, True, False)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    exact = lightning_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), decay=decay)
    xla = attn_recurrent(q, k, v, decay=decay)
    kernel = lightning_attention(q, k, v, decay=decay, chunk_size=chunk, backend=backend, interpret=interpret)
    assert kernel.dtype == dtype
    kernel_err = float(jnp.max(jnp.abs(kernel.astype(jnp.float32) - exact)))
    xla_err = float(jnp.max(jnp.abs(xla.astype(jnp.float32) - exact)))
    assert kernel_err <= 2 * xla_err + 1e-3, (kernel_err, xla_err)
