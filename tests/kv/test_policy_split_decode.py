"""Policy layers' decode attention through split-KV (PolicyAttention.split_decode): equal to an explicit numpy loop
(H2O's heavy hitters + recent window, GQA, float and 8-bit storage), and equal to the explicit stages (today's path,
implementation="xla") for several policies, outputs and every cache leaf (kept entries, positions, statistics).
Which route ran is recorded by a debug callback inside the split branch (it fires only when that branch runs)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.kv.policy_layer import PolicyAttention
from tests.kv.decoding import np_mass_policy_decode

B, T, E, H, KVH, D = 2, 9, 16, 4, 2, 8
BUDGET, RECENT = 4, 1


@pytest.fixture
def split_calls(monkeypatch):
    """A list that grows by one every time a split-KV decode call runs (not merely traced)."""
    calls = []
    original = PolicyAttention.split_decode

    def recorded(self, *args, **kwargs):
        jax.debug.callback(lambda: calls.append(1))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PolicyAttention, "split_decode", recorded)
    return calls


def random_params(layer, x, seed):
    """Parameters of the layer's shapes drawn from N(0, 1 / fan_in) with numpy: no compiled init (which costs
    seconds of XLA compile per configuration on CPU)."""
    shapes = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(seed)
    draw = lambda a: jnp.asarray(rng.standard_normal(a.shape) / np.sqrt(a.shape[0] if a.ndim else 1), a.dtype)  # noqa: E731
    return {"params": jax.tree.map(draw, shapes)}


def decode(layer, params, x, pieces):
    """The creating call on x, then x again in chunks `pieces`: (y [B, T, E], the final cache)."""
    apply = jax.jit(functools.partial(layer.apply, decode=True, mutable=["cache"]))
    _, state = apply(params, x)
    cache, outs, start = state["cache"], [], 0
    for size in pieces:
        y, state = apply({**params, "cache": cache}, x[:, start : start + size])
        jax.block_until_ready(y)
        outs.append(np.asarray(y))
        cache, start = state["cache"], start + size
    return np.concatenate(outs, axis=1), cache


# ---------------------------------------------------------------------------------------------- numpy reference
def np_quantize(x, bits):
    """Per-token asymmetric min/max codes over the last axis, dequantised (float32 arithmetic, round half to even)."""
    x = np.asarray(x, np.float32)
    low, high = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    scale = np.where(high > low, (high - low) / np.float32(2**bits - 1), np.float32(1.0)).astype(np.float32)
    codes = np.clip(np.round((x - low) / scale), 0, 2**bits - 1)
    return codes * scale + low


def h2o_reference(params, x, bits=None):
    """One token per decode call: per (batch, kv head) the kept tokens and their accumulated attention; each step
    attends over kept + itself (RoPE at original positions), then keeps the RECENT latest and the BUDGET - RECENT
    heaviest others (ties: the earlier token)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float32), nn.meta.unbox(params)["params"])
    x32 = np.asarray(x, np.float32)
    q = np.einsum("bte,ehd->bthd", x32, p["query"]["kernel"]).astype(np.float64)
    k = np.einsum("bte,ehd->bthd", x32, p["key"]["kernel"])
    v = np.einsum("bte,ehd->bthd", x32, p["value"]["kernel"])
    if bits is not None:
        k, v = np_quantize(k, bits), np_quantize(v, bits)
    k, v = k.astype(np.float64), v.astype(np.float64)

    def keep(cands, mass, t):  # H2O: the recent window plus the heaviest older entries
        recent = [j for j in cands if j >= t + 1 - RECENT]
        older = sorted((j for j in cands if j not in recent), key=lambda j: (-mass[j], j))
        return sorted(recent + older[: BUDGET - RECENT])

    out, kept, mass = np_mass_policy_decode(q, k, v, keep)
    y = np.einsum("bthd,hde->bte", out, p["out"]["kernel"].astype(np.float64))
    return y, kept, mass


@pytest.mark.parametrize("bits", [None, pytest.param(8, marks=pytest.mark.slow)])
def test_h2o_split_decode_equals_numpy_loop(bits, split_calls):
    layer = attn.build(
        "h2o", num_heads=H, head_dim=D, num_kv_heads=KVH, budget=BUDGET, recent=RECENT, cache_bits=bits,
        implementation="split_kv",
    )  # fmt: skip
    x = 3.0 * jax.random.normal(jax.random.key(0), (B, T, E))  # sharp: the heads keep different tokens
    params = random_params(layer, x, 1)
    y, cache = decode(layer, params, x, [1] * T)
    assert len(split_calls) == T, "every one-token call should take split-KV"
    expected, kept, mass = h2o_reference(params, x, bits)
    np.testing.assert_allclose(y, expected, atol=3e-5, rtol=1e-4)
    positions, lengths = np.asarray(cache["cache_positions"]), np.asarray(cache["cache_lengths"])
    assert any(kept[b][0] != kept[b][1] for b in range(B)), "the kv heads should keep different tokens"
    for b in range(B):
        for g in range(KVH):
            assert lengths[b, g] == len(kept[b][g])
            np.testing.assert_array_equal(positions[b, g, : lengths[b, g]], kept[b][g])
            np.testing.assert_allclose(
                cache["cache_key_mass"][b, g, : lengths[b, g]], [mass[b][g][j] for j in kept[b][g]], rtol=1e-4
            )


# ---------------------------------------------------------------------------------------------- against today's path
CASES = {
    "h2o_gqa_int4": ("h2o", dict(budget=4, recent=1, cache_bits=4)),
    "tova_mqa": ("tova", dict(budget=4, num_kv_heads=1)),
    "scissorhands_int8": ("scissorhands", dict(budget=5, recent=1, drop=2, history=4, cache_bits=8)),
    "a2sf": ("a2sf", dict(budget=4, recent=1, forgetting=0.5)),
    "ems": ("ems", dict(budget=4, recent=1)),
    "d2o": ("d2o", dict(budget=6, recent=1, sinks=1)),
    "snapkv": ("snapkv", dict(budget=6, observation_window=2, kernel_size=3, decode_budget=2)),
    "streaming": ("streaming", dict(budget=4, sinks=1)),
    "attention_gate": ("attention_gate", dict(budget=5, gate_heads=1, gate_dim=4)),  # chunk flags: chunk visibility
    "h2o_no_positions": ("h2o", dict(budget=4, recent=1, position="none", cache_bits=8)),
}
FAST = ("h2o_gqa_int4",)


@pytest.mark.parametrize(
    "case", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES]
)  # fmt: skip
def test_split_decode_equals_explicit_stages(case, split_calls):
    name, options = CASES[case]
    options = {"num_kv_heads": KVH, **options}
    x = 2.0 * jax.random.normal(jax.random.key(2), (B, 8, E))
    # default run: one chunk size (one compile per route); slow: a multi-token prompt, single tokens, a 2-token chunk
    pieces = [2, 2, 2, 2] if case in FAST else [3, 1, 1, 2, 1]
    results = {}
    for implementation in ("xla", "split_kv"):
        layer = attn.build(name, num_heads=H, head_dim=D, implementation=implementation, **options)
        params = random_params(layer, x, 3)
        results[implementation] = decode(layer, params, x, pieces)
    (y_x, cache_x), (y_s, cache_s) = results["xla"], results["split_kv"]
    np.testing.assert_allclose(y_s, y_x, atol=2e-5, rtol=2e-5)
    assert jax.tree.structure(cache_s) == jax.tree.structure(cache_x)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(cache_s), jax.tree.leaves(cache_x), strict=True):
        key, a, b = jax.tree_util.keystr(path), np.asarray(a), np.asarray(b)
        if "cache_key_history" in key:
            # Scissorhands flags a weight below 1 / (entries seen): p = exp(s - lse) and the softmax differ in the last
            # bit, which can flip a flag at that threshold (seen once: one bit of one entry); all else must agree
            assert np.sum(a != b) <= 1, (a, b)
        elif jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5, err_msg=key)
        else:
            np.testing.assert_array_equal(a, b, err_msg=key)
    if name == "streaming":  # its window hides the oldest recent entry once the cache is full: explicit there
        assert 0 < len(split_calls) < len(pieces)
    else:
        assert len(split_calls) == len(pieces)


@pytest.mark.slow
def test_prefill_chunks_keep_the_explicit_stages(split_calls):
    """A chunk of more than 16 queries is a prefill: the explicit stages; the one-token calls after it: split-KV."""
    x = jax.random.normal(jax.random.key(4), (1, 20, E))
    layer = attn.build("h2o", num_heads=H, head_dim=D, budget=24, recent=1, implementation="split_kv")
    decode(layer, random_params(layer, x, 5), x, [17, 1, 1, 1])
    assert len(split_calls) == 3


def test_split_kv_with_a_position_bias_is_an_error():
    """implementation="split_kv" refuses a logits bias (as the softmax layer does); implementation=None keeps such
    a layer on the explicit stages."""
    x = jax.random.normal(jax.random.key(4), (1, 3, E))
    layer = attn.build("h2o", num_heads=H, head_dim=D, budget=4, recent=1, position="alibi", implementation="split_kv")
    with pytest.raises(ValueError, match="split_kv"):
        jax.eval_shape(layer.init, jax.random.key(5), x)
