"""The Dynamical Systems Framework ([68] Sieber, Amo Alonso, Didier, Zeilinger, Orvieto, "Understanding the
differences in Foundation Models: Attention, State Space Models, and Recurrent Neural Networks", NeurIPS 2024):
sequence mixers written as one linear time-varying system,

    h_t = A_t h_{t-1} + B_t x_t,     y_t = C_t h_t,      h_0 = 0,

so that linear attention, its normalised and decayed variants and selective SSMs (S6) can be compared term by term.
This module is a helper, not a mechanism: it builds the system of a mechanism from the quantities the mechanism
computes (its feature-mapped queries and keys, decay, normaliser) and evaluates it in two forms that must agree,
the recurrence above and the parallel ("convolution"/attention-matrix) form

    y_t = sum_{s<=t} C_t A_t A_{t-1} ... A_{s+1} B_s x_s.

Structure (per batch row and head). The input x_t in R^P (the values, P = Dv channels), the state is the matrix
H_t in R^{N x P} (N = the key feature size, the paper's state expansion n; vec(H) is the paper's h in R^{N P}), and

    H_t = a_t ⊙ H_{t-1} + b_t ⊙ x_t[None, :],        y_t = H_t^T c_t

with a_t, b_t in R^{N x P} (each broadcast from [1|N, 1|P]) and c_t in R^N: A_t = diag(vec(a_t)), B_t x_t =
vec(b_t ⊙ x_t), C_t = I_P ⊗ c_t^T. `dense_matrices` returns these A_t, B_t, C_t literally.

The systems (the paper's Sec. 3 mappings, re-derived here; the paper's text was read in summaries and excerpts,
arXiv 2405.15731):

  linear attention      a_t = lambda_t (1 without decay),   b_t = psi(k_t),   c_t = phi(q_t)
  normalised            eta_t = phi(q_t) . z_t + eps,  z_t = lambda_t z_{t-1} + psi(k_t)   (Katharopoulos et al.)
                        a_t = lambda_t eta_{t-1} / eta_t,   b_t = psi(k_t) / eta_t,   c_t = phi(q_t)
                        (the state is the normalised sum H_t = sum_s (prod lambda) psi(k_s) x_s^T / eta_t)
  S6 (Mamba)            a_t[n, p] = exp(Delta_t[p] A[n, p]),   b_t[n, p] = Delta_t[p] b_t[n],   c_t = c_t
                        (input-dependent step Delta_t > 0 per channel, diagonal A < 0, Mamba's B-bar = Delta B)

and the paper's comparison of the two (`linear_attention_as_s6`): a normalised linear attention is the S6 whose
step is shared by all channels, Delta_t = log(eta_t / eta_{t-1}), with A = -1, b_t = psi(k_t) / (eta_t Delta_t) and
c_t = phi(q_t). It is a proper S6 (Delta_t > 0, as Mamba's softplus gives) exactly when the normaliser grows,
eta_t > eta_{t-1}; S6's own per-channel steps and learned A have no counterpart in linear attention, whose recurrent
normalisation is fixed by the keys (and the queries) instead of learned.

Shapes: a, b [B, T, H, N|1, P|1]; c [B, T, H, N]; x [B, T, H, P]; y [B, T, H, P]. The recurrence costs
O(B T H N P) time and O(B H N P) state; the parallel form, which multiplies the transitions of every (t, s) pair,
O(B H T^3 N P) (a reference, for tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from attn.core.validation import check_rank

Array = jax.Array


@struct.dataclass
class DynamicalSystem:
    """h_t = A_t h_{t-1} + B_t x_t, y_t = C_t h_t with A_t = diag(vec(a_t)), B_t x_t = vec(b_t ⊙ x_t),
    C_t = I_P ⊗ c_t^T (see the module docstring). a, b: [B, T, H, N|1, P|1]; c: [B, T, H, N]."""

    a: Array
    b: Array
    c: Array

    def check(self, x: Array) -> None:
        """Raises ValueError unless a, b, c and x [B, T, H, P] have matching shapes."""
        check_rank("a", self.a, 5, "[batch, length, heads, N|1, P|1]")
        check_rank("b", self.b, 5, "[batch, length, heads, N|1, P|1]")
        check_rank("c", self.c, 4, "[batch, length, heads, N]")
        check_rank("x", x, 4, "[batch, length, heads, P]")
        batch, length, heads, n = self.c.shape
        for name, value in (("a", self.a), ("b", self.b)):
            if value.shape[:3] != (batch, length, heads) or value.shape[3] not in (1, n):
                raise ValueError(f"{name} has shape {value.shape}; expected [{batch}, {length}, {heads}, 1|{n}, 1|P]")
            if value.shape[4] not in (1, x.shape[-1]):
                raise ValueError(f"{name} has shape {value.shape}; its last axis must be 1 or P = {x.shape[-1]}")
        if x.shape[:3] != (batch, length, heads):
            raise ValueError(f"x has shape {x.shape}; expected [{batch}, {length}, {heads}, P] to match c")


def recurrent(system: DynamicalSystem, x: Array, initial_state: Array | None = None) -> Array:
    """The recurrence H_t = a_t ⊙ H_{t-1} + b_t ⊙ x_t, y_t = H_t^T c_t (`lax.scan` over t).

    x [B, T, H, P] -> y [B, T, H, P]; initial_state [B, H, N, P] (default 0)."""
    system.check(x)
    batch, _, heads, n = system.c.shape
    dtype = jnp.result_type(system.a, system.b, system.c, x)
    state = jnp.zeros((batch, heads, n, x.shape[-1]), dtype) if initial_state is None else initial_state

    def step(h, inputs):
        a_t, b_t, c_t, x_t = inputs
        h = a_t * h + b_t * x_t[:, :, None, :]
        return h, jnp.einsum("bhnp,bhn->bhp", h, c_t)

    inputs = tuple(jnp.moveaxis(t, 1, 0) for t in (system.a, system.b, system.c, x))
    _, y = jax.lax.scan(step, state, inputs)
    return jnp.moveaxis(y, 0, 1)


def transfer(system: DynamicalSystem, p: int) -> Array:
    """The parallel form's kernel K [B, H, T, S, N, P]: K[t, s] = c_t ⊙ (a_t ... a_{s+1}) ⊙ b_s for s <= t, else 0
    (the block (t, s) of the paper's T x T mixing matrix is sum_n K[t, s, n]: diagonal in the channels)."""
    batch, length, heads, n = system.c.shape
    a = jnp.broadcast_to(system.a, (batch, length, heads, n, p))
    b = jnp.broadcast_to(system.b, (batch, length, heads, n, p))
    t = jnp.arange(length)
    # r in (s, t]: the transitions applied between input s and output t
    between = (t[None, None, :] > t[None, :, None]) & (t[None, None, :] <= t[:, None, None])  # [T, S, R]
    factors = jnp.where(between[None, :, :, :, None, None, None], a[:, None, None], 1.0)  # [B, T, S, R, H, N, P]
    products = jnp.prod(factors, axis=3)  # [B, T, S, H, N, P]
    kernel = system.c[:, :, None, :, :, None] * products * b[:, None]
    causal = (t[:, None] >= t[None, :])[None, :, :, None, None, None]
    return jnp.where(causal, kernel, 0.0).transpose(0, 3, 1, 2, 4, 5)


def parallel(system: DynamicalSystem, x: Array) -> Array:
    """y_t = sum_{s<=t} C_t A_t ... A_{s+1} B_s x_s, materialised (O(T^2)). x [B, T, H, P] -> y [B, T, H, P]."""
    system.check(x)
    return jnp.einsum("bhtsnp,bshp->bthp", transfer(system, x.shape[-1]), x)


def dense_matrices(system: DynamicalSystem, p: int) -> tuple[Array, Array, Array]:
    """The literal DSF matrices for the state vec(H) in R^{N P} (index n P + p'):
    A [B, T, H, NP, NP], B [B, T, H, NP, P], C [B, T, H, P, NP]."""
    batch, length, heads, n = system.c.shape
    a = jnp.broadcast_to(system.a, (batch, length, heads, n, p)).reshape(batch, length, heads, n * p)
    b = jnp.broadcast_to(system.b, (batch, length, heads, n, p))
    eye = jnp.eye(p, dtype=b.dtype)
    big_a = a[..., :, None] * jnp.eye(n * p, dtype=a.dtype)
    big_b = (b[..., :, :, None] * eye).reshape(batch, length, heads, n * p, p)
    big_c = (system.c[..., None, :, None] * eye[:, None, :]).reshape(batch, length, heads, p, n * p)
    return big_a, big_b, big_c


def _repeat_heads(x: Array, heads: int) -> Array:
    """[B, T, KVH, D] -> [B, T, H, D] (each kv head serves heads / KVH query heads, as in GQA)."""
    return jnp.repeat(x, heads // x.shape[2], axis=2)


def _log_decay(decay: Array | None, batch: int, length: int, heads: int, dtype: jnp.dtype) -> Array:
    """log lambda as [B, T, H] from None (no decay), [H] (per head) or [B, T, H] (data-dependent)."""
    if decay is None:
        return jnp.zeros((batch, length, heads), dtype)
    decay = jnp.asarray(decay, dtype)
    if decay.shape == (heads,):
        return jnp.broadcast_to(jnp.log(decay), (batch, length, heads))
    if decay.shape == (batch, length, heads):
        return jnp.log(decay)
    raise ValueError(f"decay has shape {decay.shape}; expected [heads] = ({heads},) or [B, T, H]")


def linear_attention_system(
    q_features: Array,
    k_features: Array,
    *,
    decay: Array | None = None,
    normalize: bool = False,
    eps: float = 1e-6,
) -> DynamicalSystem:
    """The DSF system of causal linear attention on feature-mapped queries and keys (input x = the values).

    q_features [B, T, H, N] (phi(q)), k_features [B, T, KVH, N] (psi(k), repeated to H heads); decay None, [H] or
    [B, T, H] in (0, 1]; normalize: divide by eta_t = phi(q_t) . z_t + eps, z_t the decayed sum of psi(k)
    (attn.functional.linear_attention's normalize / eps). Returns a [B, T, H, 1|N, 1], b [B, T, H, N, 1], c = phi(q).
    """
    check_rank("q_features", q_features, 4, "[batch, length, heads, N]")
    check_rank("k_features", k_features, 4, "[batch, length, kv_heads, N]")
    batch, length, heads, _ = q_features.shape
    if heads % k_features.shape[2]:
        raise ValueError(f"k_features has {k_features.shape[2]} heads; expected a divisor of {heads}")
    keys = _repeat_heads(k_features, heads)
    log_decay = _log_decay(decay, batch, length, heads, q_features.dtype)
    a = jnp.exp(log_decay)[..., None, None]
    b = keys[..., None]
    if not normalize:
        return DynamicalSystem(a=a, b=b, c=q_features)

    def sums(z, inputs):
        lam, k_t = inputs
        z = lam[..., None] * z + k_t
        return z, z

    _, z = jax.lax.scan(sums, jnp.zeros_like(keys[:, 0]), (jnp.moveaxis(a[..., 0, 0], 1, 0), jnp.moveaxis(keys, 1, 0)))
    eta = jnp.einsum("bthn,bthn->bth", q_features, jnp.moveaxis(z, 0, 1)) + eps
    previous = jnp.concatenate([jnp.ones_like(eta[:, :1]), eta[:, :-1]], axis=1)  # eta_0: any value (h_0 = 0)
    return DynamicalSystem(a=a * (previous / eta)[..., None, None], b=b / eta[..., None, None], c=q_features)


def s6_system(delta: Array, a: Array, b: Array, c: Array) -> DynamicalSystem:
    """Mamba's selective SSM (S6) in the DSF, per channel p with Mamba's discretisation B-bar = Delta B:

        h_t[:, p] = exp(Delta_t[p] A[:, p]) ⊙ h_{t-1}[:, p] + Delta_t[p] b_t x_t[p],     y_t[p] = c_t . h_t[:, p]

    delta [B, T, H, P] (the input-dependent step, > 0 in Mamba), a [H, N, P] (the diagonal A, < 0 in Mamba),
    b, c [B, T, H, N] (input-dependent). Heads H group channels that share b and c (H = 1: Mamba-1; one channel group
    per head: Mamba-2 style)."""
    check_rank("delta", delta, 4, "[batch, length, heads, P]")
    check_rank("a", a, 3, "[heads, N, P]")
    check_rank("b", b, 4, "[batch, length, heads, N]")
    check_rank("c", c, 4, "[batch, length, heads, N]")
    step = delta[:, :, :, None, :]
    return DynamicalSystem(a=jnp.exp(step * a[None, None]), b=step * b[..., None], c=c)


def linear_attention_as_s6(
    q_features: Array, k_features: Array, *, eps: float = 1e-6
) -> tuple[Array, Array, Array, Array]:
    """The S6 parameters (delta [B, T, H, 1], a [H, N, 1], b, c [B, T, H, N]) whose `s6_system` is the normalised
    causal linear attention of `linear_attention_system(q_features, k_features, normalize=True, eps=eps)`:
    one step shared by every channel, Delta_t = log(eta_t / eta_{t-1}) (Delta_1 = 1: h_0 = 0, so A_1 is free),
    A = -1, b_t = psi(k_t) / (eta_t Delta_t), c_t = phi(q_t). Delta_t > 0 (a proper S6) iff eta_t > eta_{t-1};
    Delta_t = 0 (eta_t = eta_{t-1}) has no S6 counterpart (b would be infinite)."""
    heads, n = q_features.shape[2], q_features.shape[3]
    keys = _repeat_heads(k_features, heads)
    z = jnp.cumsum(keys, axis=1)
    eta = jnp.einsum("bthn,bthn->bth", q_features, z) + eps
    delta = jnp.concatenate([jnp.ones_like(eta[:, :1]), jnp.log(eta[:, 1:] / eta[:, :-1])], axis=1)
    b = keys / (eta * delta)[..., None]
    return delta[..., None], -jnp.ones((heads, n, 1), q_features.dtype), b, q_features
