"""The Dynamical Systems Framework helper (attn.core.dsf): its recurrent, parallel and literal-matrix forms agree;
every registered mechanism whose token mixer is a finite linear state (linear, lightning, transnormer, hedgehog)
computes, in its own chunked parallel form, the output of its DSF recurrence; and the paper's comparison of
normalised linear attention with a selective SSM (S6).

Left out, and why (the DSF needs one finite state updated by h_t = A_t h_{t-1} + B_t x_t, read by y_t = C_t h_t):
  rala        non-causal only: a global softmax over all keys re-weights the state before any output is read.
  flowformer  its output is linear attention of the competed values v^, whose weights come from four other prefix
              sums and a running softmax: a cascade of DSF systems with a nonlinear coupling, not one system.
  titans      the memory is an MLP updated by gradient steps taken at the chunk-start weights: its chunk-parallel
              form differs from any per-token recurrence by design, and the update is nonlinear in the state.
  seqboat     sparse modular attention: a router picks tokens for a local softmax (GAU) attention; softmax attention
              has no finite DSF state (the paper: its state dimension is infinite).
  arflow      the intra-chunk path is softmax attention (no finite state); its inter-chunk path is a gated state that
              test_arflow.py checks against the authors' equations token by token.
  agent, combiner, sea: softmax attention over agent tokens / blocks / a sparse estimate (no finite state).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn import functional as F
from attn.core import dsf

CAUSAL = attn.Mask(causal=True)


def random_system(rng, batch=2, length=6, heads=2, n=3, p=4):
    a = rng.uniform(0.3, 1.1, (batch, length, heads, n, p))
    b = rng.standard_normal((batch, length, heads, n, 1))
    c = rng.standard_normal((batch, length, heads, n))
    x = rng.standard_normal((batch, length, heads, p))
    return dsf.DynamicalSystem(a=jnp.asarray(a), b=jnp.asarray(b), c=jnp.asarray(c)), jnp.asarray(x)


def literal_recurrence(system, x):
    """h_t = A_t h_{t-1} + B_t x_t, y_t = C_t h_t with the dense matrices, in a numpy loop."""
    big_a, big_b, big_c = (np.asarray(m, np.float64) for m in dsf.dense_matrices(system, x.shape[-1]))
    x = np.asarray(x, np.float64)
    batch, length, heads, _ = x.shape
    y = np.zeros_like(x)
    for bi in range(batch):
        for h in range(heads):
            state = np.zeros(big_a.shape[-1])
            for t in range(length):
                state = big_a[bi, t, h] @ state + big_b[bi, t, h] @ x[bi, t, h]
                y[bi, t, h] = big_c[bi, t, h] @ state
    return y


def test_recurrent_parallel_and_literal_matrices_agree():
    system, x = random_system(np.random.default_rng(0))
    want = literal_recurrence(system, x)
    np.testing.assert_allclose(dsf.recurrent(system, x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dsf.parallel(system, x), want, rtol=1e-5, atol=1e-5)


def test_shapes_are_checked():
    system, x = random_system(np.random.default_rng(1))
    with pytest.raises(ValueError, match="x has shape"):
        dsf.recurrent(system, x[:, :, :1])
    with pytest.raises(ValueError, match="last axis must be 1 or P"):
        dsf.recurrent(system, x[..., :3])
    with pytest.raises(ValueError, match="decay has shape"):
        dsf.linear_attention_system(x, x, decay=jnp.ones(5))


def test_linear_attention_system_is_the_paper_formula():
    """Unnormalised: y_t = sum_{s<=t} (prod_{r=s+1..t} lambda_r) (phi(q_t) . psi(k_s)) v_s; normalised: divided by
    eta_t = phi(q_t) . sum_s (prod lambda) psi(k_s) + eps (explicit loops)."""
    rng = np.random.default_rng(2)
    q, k = (np.abs(rng.standard_normal((1, 5, 2, 3))) for _ in range(2))
    v = rng.standard_normal((1, 5, 2, 4))
    lam = rng.uniform(0.5, 1.0, (1, 5, 2))
    for normalize in (False, True):
        want = np.zeros_like(v)
        for t in range(5):
            for h in range(2):
                weights = [np.prod(lam[0, s + 1 : t + 1, h]) * q[0, t, h] @ k[0, s, h] for s in range(t + 1)]
                out = sum(w * v[0, s, h] for s, w in enumerate(weights))
                want[0, t, h] = out / (sum(weights) + 1e-6) if normalize else out
        system = dsf.linear_attention_system(
            jnp.asarray(q), jnp.asarray(k), decay=jnp.asarray(lam), normalize=normalize
        )
        np.testing.assert_allclose(dsf.recurrent(system, jnp.asarray(v)), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------- registered mechanisms
MECHANISMS = {
    "linear": {},
    "linear-unnormalized": {"normalize": False},
    "linear-gqa": {"num_kv_heads": 2},
    "lightning": {"layer_index": 0, "num_layers": 2},
    "transnormer": {},
    "hedgehog": {},
}


def core_call(name, options, x):
    """Runs the layer (causal) and records the arguments and output of its chunked core (`linear_core`)."""
    layer = attn.build(name.split("-")[0], num_heads=4, head_dim=4, chunk_size=4, **options)
    variables = layer.init(jax.random.key(0), x, mask=CAUSAL)
    calls = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "linear_core":
            calls.append((context.module, args, kwargs, out))
        return out

    with nn.intercept_methods(record):
        layer.apply(variables, x, mask=CAUSAL)
    assert len(calls) == 1, f"{name}: expected one linear_core call, got {len(calls)}"
    return calls[0]


@pytest.mark.parametrize("name", list(MECHANISMS))
def test_mechanism_parallel_form_equals_its_dsf_recurrence(name):
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 10, 16)), jnp.float32)
    module, (q, k, v), kwargs, y = core_call(name, MECHANISMS[name], x)
    assert kwargs["causal"]
    system = dsf.linear_attention_system(
        q.astype(jnp.float32),
        k.astype(jnp.float32),
        decay=kwargs["decay"],
        normalize=module.uses_denominator(),
        eps=module.eps,
    )
    values = jnp.repeat(v, q.shape[2] // v.shape[2], axis=2).astype(jnp.float32)
    np.testing.assert_allclose(dsf.recurrent(system, values), y, rtol=2e-4, atol=2e-5)
    if name == "lightning":  # the decay is real: dropping it changes the output
        undecayed = dsf.linear_attention_system(q, k, normalize=module.uses_denominator(), eps=module.eps)
        assert float(jnp.max(jnp.abs(dsf.recurrent(undecayed, values) - y))) > 1e-3


# ----------------------------------------------------------------------------------- linear attention vs S6
def test_normalised_linear_attention_is_an_s6_with_a_shared_step():
    rng = np.random.default_rng(4)
    q = jnp.asarray(np.abs(rng.standard_normal((2, 7, 2, 3))) + 0.1)
    k = jnp.asarray(np.abs(rng.standard_normal((2, 7, 2, 3))) + 0.1)
    v = jnp.asarray(rng.standard_normal((2, 7, 2, 4)))
    want = F.linear_attention(q, k, v, causal=True, normalize=True, eps=1e-6, implementation="xla")
    delta, a, b, c = dsf.linear_attention_as_s6(q, k, eps=1e-6)
    system = dsf.s6_system(jnp.broadcast_to(delta, v.shape), jnp.broadcast_to(a, (2, 3, 4)), b, c)
    np.testing.assert_allclose(dsf.recurrent(system, v), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dsf.parallel(system, v), want, rtol=1e-4, atol=1e-5)


def test_the_s6_step_is_positive_when_the_normaliser_grows():
    """With one query for every step (eta_t = phi(q) . z_t grows with each positive key) the step is a proper
    Mamba step Delta > 0; with queries that shrink eta it is not, and no S6 with Delta > 0 gives that attention."""
    rng = np.random.default_rng(5)
    k = jnp.asarray(np.abs(rng.standard_normal((1, 6, 1, 3))) + 0.1)
    same_query = jnp.broadcast_to(jnp.asarray(np.abs(rng.standard_normal((1, 1, 1, 3))) + 0.1), k.shape)
    assert bool(jnp.all(dsf.linear_attention_as_s6(same_query, k)[0] > 0))
    shrinking = same_query * jnp.asarray(0.01 ** np.arange(6))[None, :, None, None]
    assert bool(jnp.any(dsf.linear_attention_as_s6(shrinking, k)[0][:, 1:] < 0))


def test_s6_with_per_channel_steps_is_not_one_linear_attention():
    """S6's per-channel steps make the channels decay differently; linear attention (and its normalised form)
    mixes every channel with the same weights: channel p of the output is sum_s w_ts x_s[p] with one w."""
    rng = np.random.default_rng(6)
    delta = jnp.asarray(rng.uniform(0.1, 1.0, (1, 5, 1, 2)))
    a = -jnp.asarray(rng.uniform(0.5, 2.0, (1, 3, 2)))
    b, c = (jnp.asarray(rng.standard_normal((1, 5, 1, 3))) for _ in range(2))
    kernel = dsf.transfer(dsf.s6_system(delta, a, b, c), 2).sum(axis=-2)  # [B, H, T, S, P]
    assert float(jnp.max(jnp.abs(kernel[..., 0] - kernel[..., 1]))) > 1e-3
    shared = dsf.transfer(dsf.s6_system(delta[..., :1].repeat(2, -1), a[..., :1].repeat(2, -1), b, c), 2).sum(-2)
    np.testing.assert_allclose(shared[..., 0], shared[..., 1], rtol=1e-6)
