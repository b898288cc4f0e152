"""Ring and Ulysses attention on the fake CPU devices equal single-device softmax attention written in numpy
(forward) and in plain jnp (gradients), causal or not, with GQA, segment ids and lengths that do not divide; the
ring's blocks reach the flash kernel with structured masks (pretending to be a GPU, as tests/core/
test_kernel_dispatch.py does), and with the kernel in the Pallas interpreter the results are the same."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from attn.core import dispatch, kernels
from attn.core.context_parallel import ring_attention, ulysses_attention, zigzag_permutation
from attn.core.softmax import softmax_attention
from tests.core.test_kernel_dispatch import fake_gpu  # noqa: F401 (a fixture: GPU platform, interpreted kernels)


def _mesh(parts: int) -> Mesh:
    return Mesh(np.array(jax.devices()[:parts]), ("context",))


def _inputs(batch=2, length=13, heads=4, kv_heads=2, dim=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, length, heads, dim))
    k = jax.random.normal(keys[1], (batch, length, kv_heads, dim))
    v = jax.random.normal(keys[2], (batch, length, kv_heads, dim))
    segments = jnp.asarray(np.repeat([[0] * 6 + [1] * (length - 6)], batch, axis=0), jnp.int32)
    return q, k, v, segments


def numpy_attention(q, k, v, causal, segments):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, length, heads, dim = q.shape
    group = heads // k.shape[2]
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                visible = [
                    j
                    for j in range(length)
                    if (not causal or j <= i) and (segments is None or segments[b, i] == segments[b, j])
                ]
                s = np.array([q[b, i, h] @ k[b, j, h // group] / np.sqrt(dim) for j in visible])
                p = np.exp(s - s.max())
                out[b, i, h] = (p / p.sum()) @ v[b, visible, h // group]
    return out


def jnp_attention(q, k, v, causal, segments):
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    length = q.shape[1]
    allowed = jnp.ones((length, length), bool)
    if causal:
        allowed = jnp.tril(allowed)
    allowed = allowed[None, None] & (segments[:, None, :, None] == segments[:, None, None, :])
    weights = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


CASES = [
    ("ring", 4, True, None, 2),
    ("ring", 2, False, None, 2),
    ("ring", 4, True, False, 1),
    ("ulysses", 4, True, None, 1),
    ("ulysses", 2, False, None, 2),
]


@pytest.mark.parametrize("scheme, parts, causal, balance, kv_heads", CASES)
def test_forward_equals_single_device_attention(scheme, parts, causal, balance, kv_heads):
    q, k, v, segments = _inputs(kv_heads=kv_heads)
    mesh = _mesh(parts)
    if scheme == "ring":
        out = ring_attention(q, k, v, mesh=mesh, causal=causal, segment_ids=segments, load_balance=balance)
    else:
        out = ulysses_attention(q, k, v, mesh=mesh, causal=causal, segment_ids=segments)
    expected = numpy_attention(q, k, v, causal, np.asarray(segments))
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("scheme", ["ring", "ulysses"])
def test_gradients_equal_single_device_attention(scheme):
    q, k, v, segments = _inputs(length=11, kv_heads=2, seed=1)
    cotangent = jax.random.normal(jax.random.key(5), q.shape)
    mesh = _mesh(4)
    parallel = ring_attention if scheme == "ring" else ulysses_attention

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * cotangent)

    ours = jax.grad(
        lambda *a: loss(lambda q, k, v: parallel(q, k, v, mesh=mesh, causal=True, segment_ids=segments), *a),
        argnums=(0, 1, 2),
    )(q, k, v)
    reference = jax.grad(
        lambda *a: loss(lambda q, k, v: jnp_attention(q, k, v, True, segments), *a), argnums=(0, 1, 2)
    )(q, k, v)
    for name, got, want in zip("qkv", ours, reference, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=4e-5, rtol=4e-5, err_msg=name)


@pytest.mark.parametrize("parts, length, causal", [(4, 3, False), (4, 5, True), (3, 7, True)])
def test_short_lengths_whose_padding_fills_whole_chunks(parts, length, causal):
    """T=3 over 4 devices (contiguous) or T=5 in 8 zig-zag chunks: some key chunks are all padding."""
    q, k, v, _ = _inputs(batch=1, length=length, seed=2)
    out = ring_attention(q, k, v, mesh=_mesh(parts), causal=causal)
    np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k, v, causal, None), atol=2e-5, rtol=2e-5)


def _check_ring_against_reference(q, k, v, segments, implementation, tol):
    """Causal ring attention over 2 devices: output against numpy, gradients (one vjp) against plain jnp."""

    def ring(q, k, v):
        mesh = _mesh(2)
        return ring_attention(q, k, v, mesh=mesh, causal=True, segment_ids=segments, implementation=implementation)

    cotangent = jax.random.normal(jax.random.key(7), q.shape)
    out, vjp = jax.vjp(ring, q, k, v)
    np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k, v, True, np.asarray(segments)), atol=tol)
    _, reference = jax.vjp(lambda *a: jnp_attention(*a, True, segments), q, k, v)
    for name, got, want in zip("qkv", vjp(cotangent), reference(cotangent), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2 * tol, rtol=2 * tol, err_msg=name)


def test_ring_blocks_reach_the_flash_kernel_with_structured_masks(monkeypatch):
    """On a GPU platform implementation=None sends every ring block to the flash-kernel entry with a structured Mask
    (causal diagonal / fully visible, segment ids, the padded chunk's key length; never a dense mask). The kernel
    entry here is the XLA reference, which checks the routing quickly; the interpreted kernel itself (its lse
    gradient included) runs in the slow test below."""
    masks = []

    def kernel_entry(q, k, v, mask, *, bias, scale, softcap, sinks, return_lse):
        assert bias is None and softcap is None and sinks is None
        masks.append(mask)
        return softmax_attention(q, k, v, mask=mask, scale=scale, return_lse=return_lse, implementation="xla")

    monkeypatch.setattr(dispatch, "platform", lambda: "gpu")
    monkeypatch.setattr(kernels, "flash_attention_call", kernel_entry)
    q, k, v, segments = _inputs(batch=2, length=11, kv_heads=2, seed=3)
    _check_ring_against_reference(q, k, v, segments, None, 2e-5)
    assert masks and all(m.dense is None and m.q_segment_ids is not None and m.kv_lengths is not None for m in masks)
    assert {m.causal for m in masks} == {True, False}  # the diagonal and the fully visible pairs


def test_ring_pallas_request_raises_where_no_kernel_runs():
    q, k, v, _ = _inputs(length=8)
    with pytest.raises(ValueError, match=r"implementation='pallas' is not available.*platform 'cpu'"):
        ring_attention(q, k, v, mesh=_mesh(2), causal=True, implementation="pallas")


@pytest.mark.slow
def test_ring_with_the_interpreted_flash_kernel_equals_single_device_attention(fake_gpu):  # noqa: F811
    """The Pallas flash kernel (GPU backend in the interpreter, blocks of 16) per ring block: forward and
    gradients of causal GQA attention with segment ids and a length that needs padding (11 over 4 zig-zag chunks)."""
    q, k, v, segments = _inputs(batch=1, length=11, heads=2, kv_heads=1, seed=4)
    _check_ring_against_reference(q, k, v, segments, "pallas", 2e-5)
    assert "flash" in fake_gpu


def test_jit_with_sharded_inputs_keeps_the_sequence_sharded():
    q, k, v, segments = _inputs(length=16)
    mesh = _mesh(4)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "context"))
    q, k, v = (jax.device_put(x, sharding) for x in (q, k, v))
    out = jax.jit(lambda q, k, v: ring_attention(q, k, v, mesh=mesh, causal=True, load_balance=False))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k, v, True, None), atol=2e-5, rtol=2e-5)


def test_zigzag_gives_every_device_the_same_causal_work():
    parts, length = 4, 16
    order = np.asarray(zigzag_permutation(length, parts))
    assert sorted(order.tolist()) == list(range(length))
    blocks = order.reshape(parts, -1)
    visible = [int(sum((kv <= qi) for qi in blocks[d] for kv in range(length))) for d in range(parts)]
    assert len(set(visible)) == 1, visible  # contiguous blocks would give 10, 26, 42, 58 here
    contiguous = np.arange(length).reshape(parts, -1)
    assert len({int(sum((kv <= qi) for qi in row for kv in range(length))) for row in contiguous}) == parts


def test_bad_input_is_named():
    q, k, v, _ = _inputs(heads=6, kv_heads=2)
    with pytest.raises(ValueError, match=r"num_heads must be a multiple of 4"):
        ulysses_attention(q, k, v, mesh=_mesh(4))
    with pytest.raises(ValueError, match=r"axis='sequence' is not an axis of the mesh"):
        ring_attention(q, k, v, mesh=_mesh(2), axis="sequence")
    with pytest.raises(ValueError, match=r"segment_ids of shape \(2, 5\)"):
        ring_attention(q, k, v, mesh=_mesh(2), segment_ids=jnp.zeros((2, 5), jnp.int32))
    explicit = jax.make_mesh(
        (2,), ("context",), axis_types=(jax.sharding.AxisType.Explicit,), devices=jax.devices()[:2]
    )
    with pytest.raises(
        ValueError, match=r"mesh has Explicit axes \('context',\); context-parallel attention needs Auto"
    ):
        ring_attention(q, k, v, mesh=explicit)
    with pytest.raises(ValueError, match=r"length=10 must be a multiple of 2 \* parts = 8"):
        zigzag_permutation(10, 4)


@pytest.mark.parametrize("scheme", ["ring", "ulysses"])
def test_decoder_with_context_parallel_layers_equals_the_plain_decoder(scheme):
    """The softmax layer's context_parallel option under a (data 2, context 4) mesh set with jax.set_mesh: the same
    logits as the unsplit model, jitted, the batch split over "data"; without a mesh, plain attention."""
    from attn.models import DecoderLM

    common = dict(vocab_size=32, num_layers=1, d_model=16, num_heads=4, mlp_dim=32, num_kv_heads=2)
    plain = DecoderLM(**common)
    split = DecoderLM(**common, attention_options={"context_parallel": scheme})
    tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, 32)
    params = plain.init(jax.random.key(4), tokens)
    expected = plain.apply(params, tokens)
    mesh = jax.make_mesh((2, 4), ("data", "context"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        got = jax.jit(split.apply)(params, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-5, rtol=2e-5)
    # without a mesh (shape checks, one device) the layer is plain attention: the same function
    np.testing.assert_array_equal(np.asarray(split.apply(params, tokens)), np.asarray(expected))
