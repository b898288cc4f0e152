"""The neural long-term memory of Titans ([8] "Titans: Learning to Memorize at Test Time"): an MLP whose weights
are trained at test time, token by token, by gradient descent with momentum and weight decay on an associative
loss. Two forms that agree: a token-by-token `lax.scan` (the reference) and the chunk-parallel form of the paper's
section 3.2, and `continue_memory`, the token scan resumed from a cached state (decoding). Used by
`attn.linear.titans`.

Per head, with keys k_t, values v_t, queries q_t and data-dependent gates alpha_t, eta_t, theta_t:

    loss      l(M; k_t, v_t) = ||M(k_t) - v_t||^2                                        (paper eq. 12)
    surprise  S_t = eta_t S_{t-1} - theta_t grad l(M_{t'}; k_t, v_t)                       (eq. 14 / 18)
    forget    M_t = (1 - alpha_t) M_{t-1} + S_t                                            (eq. 13)
    retrieve  y_t = M_t(q_t)                     (eq. 15; the memory after token t, as in TTT and linear attention)

M is an MLP with L >= 1 layers and no biases, M(x) = (sigma(... sigma(x W_1) ...)) W_L with sigma = SiLU; L = 1
is the linear (matrix-valued) memory M(x) = x W. Rows are vectors: W_l is [in, out].

What the chunking approximates. t' is the start of t's chunk of b tokens (the memory after the previous chunk):
every gradient inside a chunk is taken at the chunk-start memory (mini-batch gradient descent, eq. 16). With b = 1,
t' = t - 1 and this is the online rule of eqs. 13-14 exactly; with b > 1 it is a different (approximate) rule, for a
linear memory as well as a deep one: ||W k - v||^2 has gradient 2 (W k - v) k^T, which depends on W. Given those
gradients, everything else is exact: the momentum recurrence, the forgetting and the per-token memory M_t used for
retrieval (not only the chunk-end memory). So `form="chunked"` with chunk b equals `form="recurrent"` with the same
b for every b (the tests check this), and b = 1 is the paper's token-level rule.

Chunk-parallel form (inside one chunk, tokens 1..b, chunk-start state W_0, S_0; per layer l of the MLP):
the per-token gradient of layer l is rank one, u_i = a_i^T delta_i (a_i the layer input on k_i, delta_i the
back-propagated error at the layer output, both at W_0). With the products inside the chunk

    A_t = prod_{j<=t} (1 - alpha_j),  E_t = prod_{j<=t} eta_j,
    LA[t, s] = prod_{s<j<=t} (1 - alpha_j),  LE[s, i] = prod_{i<j<=s} eta_j          (lower-triangular, b x b)
    c = (LA @ LE) diag(theta),  g = LA @ E                                             (b x b and b)

the recurrences unroll to

    S_t = E_t S_0 - sum_{i<=t} theta_i LE[t, i] u_i
    M_t = A_t W_0 + g_t S_0 - sum_{i<=t} c[t, i] u_i

so the chunk-end state is a few matmuls, and retrieval through the per-token memory is attention-like:
    h W_t = A_t (h W_0) + g_t (h S_0) - sum_{i<=t} c[t, i] (h . a_i) delta_i             (TTT's dual form)
applied layer by layer to the query. The products are `cumprod`s of masked b x b matrices (no division, so gates
of exactly 0 or 1 are fine). Chunks are carried by `lax.scan`; a length that is not a multiple of b ends with one
shorter chunk.

Shapes: q, k [B, T, H, Dk], v [B, T, H, Dv], gates [B, T, H]; memory weights per layer [B|-, H, in, out].
Cost per head: O(T b (Dk + Dv + hidden)) for the intra-chunk part plus O(T P) for the MLP with P parameters
(forward, backward and retrieval); state O(P) per head (weights and momentum). The recurrent form materialises
one gradient per token (O(P) each) and is sequential: a reference.

Reductions: theta = 0 leaves the memory at its initial weights (decayed by prod (1 - alpha), moved by the initial
momentum); with a linear memory, W_0 = 0, eta = 0 and alpha = 0, chunk b = T gives unnormalised linear attention
y_t = sum_{i<=t} 2 theta_i (q_t . k_i) v_i, and b = 1 the delta rule W_t = W_{t-1} - 2 theta_t (W_{t-1} k_t - v_t) k_t^T
(DeltaNet with beta = 2 theta).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Weights = tuple[Array, ...]

FORMS = ("chunked", "recurrent")


def memory_apply(weights: Sequence[Array], x: Array, activation: Callable[[Array], Array] = jax.nn.silu) -> Array:
    """The memory MLP at fixed weights: x [B, H, ..., in] with weights[l] [B, H, in_l, out_l] -> [B, H, ..., out]."""
    h = x
    for layer, w in enumerate(weights):
        h = jnp.einsum("bh...i,bhio->bh...o", h, w)
        if layer < len(weights) - 1:
            h = activation(h)
    return h


def neural_memory(
    q: Array,
    k: Array,
    v: Array,
    alpha: Array,
    eta: Array,
    theta: Array,
    *,
    initial_weights: Sequence[Array],
    initial_momentum: Sequence[Array] | None = None,
    chunk_size: int = 16,
    form: str = "chunked",
    activation: Callable[[Array], Array] = jax.nn.silu,
    return_state: bool = False,
) -> Array | tuple[Array, tuple[Weights, Weights]]:
    """Runs the Titans memory over a sequence (see the module docstring for the equations).

    Args:
      q, k: [B, T, H, Dk] queries and keys of the memory. v: [B, T, H, Dv] values.
      alpha, eta, theta: [B, T, H] forgetting gate, momentum decay ("past surprise") and step size.
      initial_weights: the memory before the first token, one array per MLP layer, [H, in, out] (shared by the
        batch, e.g. learned) or [B, H, in, out]; in of the first is Dk, out of the last is Dv.
      initial_momentum: like initial_weights (default zeros).
      chunk_size: b, tokens whose gradients are taken at the same (chunk-start) memory.
      form: "chunked" (the parallel form) or "recurrent" (token-by-token reference with the same chunk semantics).
      activation: sigma between MLP layers.
      return_state: also return (weights, momentum) after the last token, each a tuple of [B, H, in, out].
    Returns:
      y [B, T, H, Dv] float32, float64 for float64 inputs (y_t = M_t(q_t)), or (y, (weights, momentum)).
    """
    batch, length, heads = q.shape[:3]
    if not (isinstance(chunk_size, (int, np.integer)) and chunk_size > 0):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int")
    if form not in FORMS:
        raise ValueError(f"form={form!r} is not supported; expected one of {FORMS}")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q {q.shape}, k {k.shape} and v {v.shape} must share [batch, length, heads] (and Dk)")
    for name, gate in (("alpha", alpha), ("eta", eta), ("theta", theta)):
        if gate.shape != (batch, length, heads):
            raise ValueError(f"{name} has shape {gate.shape}; expected [batch, length, heads] = {q.shape[:3]}")
    dtype = compute_dtype(q, k, v, *initial_weights)
    weights = tuple(_batched(w, batch, heads, "initial_weights", dtype) for w in initial_weights)
    if not weights:
        raise ValueError("initial_weights must hold at least one layer")
    dims = [weights[0].shape[2]] + [w.shape[3] for w in weights]
    if (
        any(w.shape[2] != d for w, d in zip(weights, dims[:-1], strict=True))
        or dims[0] != q.shape[-1]
        or dims[-1] != v.shape[-1]
    ):
        raise ValueError(
            f"initial_weights shapes {[tuple(w.shape) for w in weights]} must chain Dk={q.shape[-1]} -> "
            f"Dv={v.shape[-1]} ([.., in, out] per layer)"
        )
    if initial_momentum is None:
        momentum = tuple(jnp.zeros_like(w) for w in weights)
    else:
        momentum = tuple(_batched(s, batch, heads, "initial_momentum", dtype) for s in initial_momentum)
        if [s.shape for s in momentum] != [w.shape for w in weights]:
            raise ValueError("initial_momentum must have the shapes of initial_weights")

    # [B, H, T, D] and [B, H, T]
    qh, kh, vh = (jnp.swapaxes(x.astype(dtype), 1, 2) for x in (q, k, v))
    ah, eh, th = (jnp.swapaxes(g.astype(dtype), 1, 2) for g in (alpha, eta, theta))
    run = _recurrent if form == "recurrent" else _chunked
    y, state = run(qh, kh, vh, ah, eh, th, weights, momentum, int(chunk_size), activation)
    y = jnp.swapaxes(y, 1, 2)
    return (y, state) if return_state else y


def compute_dtype(*arrays: Array) -> jnp.dtype:
    """float32, or float64 when an input is float64 (the memory never computes below float32)."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _batched(w: Array, batch: int, heads: int, name: str, dtype: jnp.dtype) -> Array:
    w = jnp.asarray(w, dtype)
    if w.ndim == 3:
        w = jnp.broadcast_to(w[None], (batch,) + w.shape)
    if w.ndim != 4 or w.shape[:2] != (batch, heads):
        raise ValueError(f"{name} arrays must be [heads, in, out] or [batch, heads, in, out]; got {w.shape}")
    return w


def _loss(weights: Weights, k: Array, v: Array, activation) -> Array:
    """Sum over batch and heads of ||M(k) - v||^2 (separable, so its gradient is the per-(b, h) gradient)."""
    return jnp.sum(jnp.square(memory_apply(weights, k, activation) - v))


# ---------------------------------------------------------------------------------------------------- recurrent
def _recurrent(q, k, v, alpha, eta, theta, weights, momentum, chunk, activation):
    """Token-by-token reference: the gradient of token t at the memory snapshot taken at t's chunk start."""
    y, (weights, momentum, _) = _token_scan(
        q, k, v, alpha, eta, theta, (weights, momentum, weights), 0, chunk, activation
    )
    return y, (weights, momentum)


def _token_scan(q, k, v, alpha, eta, theta, state, start, chunk, activation):
    """The recurrent rule over [B, H, T, ..] inputs whose first token sits at position `start` (int or traced
    int32) of the sequence; state = (weights, momentum, chunk-start snapshot). Returns (y [B, H, T, Dv], state)."""
    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v, alpha, eta, theta)) + (start + jnp.arange(q.shape[2]),)
    grad = jax.grad(_loss)

    def step(carry, inputs):
        w, s, snapshot = carry
        qt, kt, vt, at, et, tt, index = inputs
        snapshot = jax.tree.map(lambda cur, old: jnp.where(index % chunk == 0, cur, old), w, snapshot)
        u = grad(snapshot, kt, vt, activation)
        s = tuple(et[..., None, None] * s_ - tt[..., None, None] * u_ for s_, u_ in zip(s, u, strict=True))
        w = tuple((1.0 - at)[..., None, None] * w_ + s_ for w_, s_ in zip(w, s, strict=True))
        return (w, s, snapshot), memory_apply(w, qt, activation)

    state, y = jax.lax.scan(step, tuple(tuple(part) for part in state), xs)
    return jnp.moveaxis(y, 0, 2), state


def continue_memory(
    q: Array,
    k: Array,
    v: Array,
    alpha: Array,
    eta: Array,
    theta: Array,
    *,
    state: tuple[Sequence[Array], Sequence[Array], Sequence[Array]],
    start: Array | int,
    chunk_size: int,
    activation: Callable[[Array], Array] = jax.nn.silu,
) -> tuple[Array, tuple[Weights, Weights, Weights]]:
    """Continues the memory over the next tokens of a sequence (decoding), with `neural_memory`'s chunk semantics.

    Args:
      q, k: [B, L, H, Dk], v: [B, L, H, Dv], alpha, eta, theta: [B, L, H]: tokens at positions start .. start+L-1.
      state: (weights, momentum, snapshot), each one [B, H, in, out] float32 array per MLP layer: the memory
        after position start - 1, its momentum, and the memory at the start of the chunk holding position
        start - 1 (the gradients of that chunk's remaining tokens are taken there). At start = 0 pass
        (M_0, S_0, M_0).
      start: int or traced int32 scalar, the position of the first token; a position that is a multiple of
        `chunk_size` opens a chunk (the snapshot becomes the current memory).
      chunk_size: b of `neural_memory`.
    Returns:
      (y [B, L, H, Dv] float32, the updated (weights, momentum, snapshot)). Feeding a sequence in pieces of any sizes
      gives `neural_memory(..., chunk_size=b)` on the whole sequence (up to float rounding): the token scan is its
      recurrent form.
    """
    if not (isinstance(chunk_size, (int, np.integer)) and chunk_size > 0):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int")
    if len(state) != 3:
        raise ValueError(f"state must be (weights, momentum, snapshot); got {len(state)} parts")
    dtype = compute_dtype(q, k, v, *state[0])
    qh, kh, vh = (jnp.swapaxes(x.astype(dtype), 1, 2) for x in (q, k, v))
    ah, eh, th = (jnp.swapaxes(g.astype(dtype), 1, 2) for g in (alpha, eta, theta))
    state = tuple(tuple(jnp.asarray(w, dtype) for w in part) for part in state)
    y, state = _token_scan(qh, kh, vh, ah, eh, th, state, jnp.asarray(start, jnp.int32), int(chunk_size), activation)
    return jnp.swapaxes(y, 1, 2), state


# ---------------------------------------------------------------------------------------------------- chunked
def _segment_products(x: Array) -> Array:
    """L[.., t, s] = prod_{s<j<=t} x_j for s <= t, else 0: a cumprod of a masked matrix (no division)."""
    size = x.shape[-1]
    rows = jnp.arange(size)[:, None]
    cols = jnp.arange(size)[None, :]
    factors = jnp.where(rows > cols, x[..., :, None], 1.0)
    return jnp.where(rows >= cols, jnp.cumprod(factors, axis=-2), 0.0)


def _per_token_errors(weights: Weights, k: Array, v: Array, activation) -> tuple[list[Array], list[Array]]:
    """Layer inputs a_l [B, H, C, in_l] on the keys and the errors delta_l = dl/dz_l [B, H, C, out_l] at `weights`:
    the per-token gradient of layer l is a_l^T delta_l. The errors are the gradient with respect to zero
    perturbations added to each pre-activation (the loss is a sum over tokens)."""

    def loss(perturbations):
        inputs = []
        h = k
        for layer, (w, p) in enumerate(zip(weights, perturbations, strict=True)):
            inputs.append(h)
            h = jnp.einsum("bhci,bhio->bhco", h, w) + p
            if layer < len(weights) - 1:
                h = activation(h)
        return jnp.sum(jnp.square(h - v)), inputs

    zeros = [jnp.zeros(k.shape[:3] + (w.shape[-1],), k.dtype) for w in weights]
    deltas, inputs = jax.grad(loss, has_aux=True)(zeros)
    return inputs, deltas


def _chunk_step(carry, inputs, activation):
    """One chunk of the parallel form: (W_0, S_0) -> (W_b, S_b) and the retrievals y_t = M_t(q_t)."""
    weights, momentum = carry
    q, k, v, alpha, eta, theta = inputs  # [B, H, C, D] and [B, H, C]
    acts, deltas = _per_token_errors(weights, k, v, activation)
    keep = 1.0 - alpha
    la, le = _segment_products(keep), _segment_products(eta)  # [B, H, C, C]
    a_cum, e_cum = jnp.cumprod(keep, axis=-1), jnp.cumprod(eta, axis=-1)  # [B, H, C]
    coef = jnp.einsum("bhts,bhsi->bhti", la, le) * theta[..., None, :]  # c[t, i]
    g = jnp.einsum("bhts,bhs->bht", la, e_cum)
    to_end = theta * le[..., -1, :]  # theta_i LE[b, i]

    new_weights, new_momentum = [], []
    for w, s, a, d in zip(weights, momentum, acts, deltas, strict=True):
        new_weights.append(
            a_cum[..., -1, None, None] * w
            + g[..., -1, None, None] * s
            - jnp.einsum("bhci,bhc,bhco->bhio", a, coef[..., -1, :], d)
        )
        new_momentum.append(e_cum[..., -1, None, None] * s - jnp.einsum("bhci,bhc,bhco->bhio", a, to_end, d))

    h = q
    for layer, (w, s, a, d) in enumerate(zip(weights, momentum, acts, deltas, strict=True)):
        scores = jnp.einsum("bhti,bhci->bhtc", h, a) * coef
        h = (
            a_cum[..., None] * jnp.einsum("bhti,bhio->bhto", h, w)
            + g[..., None] * jnp.einsum("bhti,bhio->bhto", h, s)
            - jnp.einsum("bhtc,bhco->bhto", scores, d)
        )
        if layer < len(weights) - 1:
            h = activation(h)
    return (tuple(new_weights), tuple(new_momentum)), h


def _chunked(q, k, v, alpha, eta, theta, weights, momentum, chunk, activation):
    length = q.shape[2]
    chunk = min(chunk, length)
    full, rest = divmod(length, chunk)
    step = lambda carry, inputs: _chunk_step(carry, inputs, activation)
    arrays = (q, k, v, alpha, eta, theta)
    outs = []
    carry = (weights, momentum)
    if full:

        def blocks(x):  # [B, H, T, ..] -> [N, B, H, C, ..]
            x = x[:, :, : full * chunk]
            x = x.reshape(x.shape[:2] + (full, chunk) + x.shape[3:])
            return jnp.moveaxis(x, 2, 0)

        carry, y = jax.lax.scan(step, carry, tuple(blocks(x) for x in arrays))
        y = jnp.moveaxis(y, 0, 2)  # [B, H, N, C, Dv]
        outs.append(y.reshape(y.shape[:2] + (full * chunk,) + y.shape[4:]))
    if rest:
        carry, y = step(carry, tuple(x[:, :, full * chunk :] for x in arrays))
        outs.append(y)
    y = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
    return y, carry
