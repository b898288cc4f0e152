"""`swap` (VideoFactory Swap-CA): the layer equals its reference built from dense attention under explicit masks
(same frame, same location, same 3-D window, written with loops), and swapping the query stream swaps the roles;
attention dropout is off when deterministic; errors."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from local_reference import loop_window_mask, normal, random_params

import attn
from attn import functional as F


def loop_stream_masks(frames, spatial):
    """bool [N, N] masks of the spatial stream (same frame) and the temporal stream (same location)."""
    coords = list(itertools.product(range(frames), *[range(n) for n in spatial]))
    same_frame = np.array([[a[0] == b[0] for b in coords] for a in coords])
    same_place = np.array([[a[1:] == b[1:] for b in coords] for a in coords])
    return same_frame, same_place


def reference(params, x, window, shift, query_stream):
    """Swap-CA from dense masked attention over all N tokens of x [B, T, *S, E]."""
    p = nn.unbox(params)["params"]
    batch, frames, *spatial, features = x.shape
    flat = x.reshape(batch, -1, features)
    same_frame, same_place = loop_stream_masks(frames, spatial)
    in_window = loop_window_mask((frames, *spatial), window, shift)

    def attention(prefix, source, memory, mask):
        proj = lambda name, t: jnp.einsum("bne,ehd->bnhd", t, p[f"{prefix}_{name}"]["kernel"])
        out = F.softmax_attention(
            proj("query", source), proj("key", memory), proj("value", memory), mask=jnp.asarray(mask)[None, None]
        )
        return jnp.einsum("bnhd,hde->bne", out, p[f"{prefix}_out"]["kernel"])

    f_s = attention("spatial", flat, flat, same_frame)
    f_t = attention("temporal", flat, flat, same_place)
    a, c = (f_s, f_t) if query_stream == "spatial" else (f_t, f_s)
    return (a + attention("swap", a, c, in_window)).reshape(x.shape)


@pytest.mark.parametrize(
    "grid, window, shift",
    [((4, 3, 4), (2, 2, 3), (1, 0, 1)), ((5, 6), (3, 4), 0)],
    ids=["video_3d_windows_shifted", "frames_x_1d_partial_windows"],
)
def test_layer_equals_masked_reference_and_roles_swap(grid, window, shift):
    x = normal((2, *grid, 16), 0)
    options = dict(num_heads=4, head_dim=4, num_kv_heads=2, window_size=window, shift=shift)
    params = random_params(attn.build("swap", **options), x)  # the same weights serve both roles
    outputs = {}
    for stream in ("spatial", "temporal"):
        layer = attn.build("swap", query_stream=stream, **options)
        outputs[stream] = jax.jit(layer.apply)(params, x)
        want = jax.jit(reference, static_argnums=(2, 3, 4))(params, x, window, shift, stream)
        np.testing.assert_allclose(outputs[stream], want, atol=3e-5)
    assert float(jnp.abs(outputs["spatial"] - outputs["temporal"]).max()) > 1e-2


def test_receptive_field():
    """A token's output depends on its frame, its location's frames and (through the window) their neighbours, but
    not on tokens outside all of these."""
    grid = (4, 4, 4)
    layer = attn.build("swap", num_heads=2, head_dim=4, window_size=(2, 2, 2))
    x = normal((1, *grid, 8), 1)
    params = random_params(layer, x)
    # one batch: row r perturbs token r alone, the last row is unperturbed
    tokens = int(np.prod(grid))
    bumps = jnp.concatenate([jnp.eye(tokens), jnp.zeros((1, tokens))]).reshape(tokens + 1, *grid, 1)
    y = jax.jit(layer.apply)(params, x + bumps)
    touched = np.asarray(jnp.abs(y[:-1, 0, 0, 0] - y[-1, 0, 0, 0]).max(-1) > 1e-6).reshape(grid)
    # inputs that reach output token (0, 0, 0): the spatial query at (0,0,0) sees its frame; it reads the temporal
    # features of its window {0,1}^3, each of which sees all frames of its location
    expected = np.zeros(grid, bool)
    expected[0] = True
    expected[:, :2, :2] = True
    np.testing.assert_array_equal(touched, expected)


def test_gradients_match_finite_differences():
    """Reverse-mode gradients w.r.t. x and all 12 parameters (three attentions) equal central differences in
    float64, on a [1, 2, 2, 3, 8] video with shifted 3-D windows."""
    with jax.enable_x64(True):
        layer = attn.build(
            "swap",
            num_heads=2,
            head_dim=4,
            window_size=(2, 2, 2),
            shift=(1, 0, 1),
            dtype=jnp.float64,
            param_dtype=jnp.float64,
        )
        x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 2, 2, 3, 8)))
        params = {"params": nn.unbox(layer.init(jax.random.key(1), x))["params"]}
        assert len(jax.tree.leaves(params)) == 12
        forward = jax.jit(lambda x, p: layer.apply(p, x))
        check_grads(forward, (x, params), order=1, modes=("rev",), eps=1e-4, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "options, shape, message",
    [
        (dict(query_stream="both"), (1, 2, 4, 4, 8), "query_stream='both' must be one of"),
        (dict(), (1, 4, 8), r"x must have rank 4 or 5 \[batch, frames, \*spatial"),
        (dict(window_size=2, shift=2), (1, 2, 4, 4, 8), r"shift=\(2, 2, 2\) must satisfy 0 <= shift < window_size"),
    ],
)
def test_bad_options_name_the_option(options, shape, message):
    with pytest.raises(ValueError, match=message):
        layer = attn.build("swap", num_heads=2, head_dim=4, **options)
        jax.eval_shape(lambda k, x: layer.init(k, x), jax.random.key(0), jnp.zeros(shape))


def test_dropout_is_off_when_deterministic():
    options = dict(num_heads=2, head_dim=4, window_size=(2, 2, 2))
    x = normal((1, 2, 2, 4, 8))
    plain = attn.build("swap", **options)
    dropped = attn.build("swap", dropout_rate=0.5, **options)
    params = random_params(plain, x)
    y = plain.apply(params, x)
    np.testing.assert_array_equal(dropped.apply(params, x, deterministic=True), y)
    noisy = dropped.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert bool(jnp.all(jnp.isfinite(noisy))) and float(jnp.max(jnp.abs(noisy - y))) > 1e-3
