"""[170] hd_painter: PAIntA's similarity and logit rescaling against numpy loops, the RASG step, the blended sampler,
the no-op settings and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import interventions as iv
from attn.models import dit
from attn.steer import STEERERS, HdPainter
from attn.steer.hd_painter import (
    check_mask,
    ddim_sigma,
    painta_rules,
    patch_mask,
    prompt_similarity,
    rasg_score,
    rasg_step,
    rescale_logits,
)
from tests.steer.tiny_dit import CAPTIONS, NOISE, TIMES, init_params, tiny_dit


def _similarity_reference(weights, tokens, grid):
    """Loops: head mean, token sum, the official 3x3 kernel (exp(-(d / (2 sigma))^2), sigma 0.5) with zero padding,
    then (s - median) / max clipped to [0, 1]."""
    b, h, n, length = weights.shape
    one = np.exp(-((np.array([-1.0, 0.0, 1.0]) / 1.0) ** 2))
    kernel = np.outer(one, one) / np.outer(one, one).sum()
    out = np.zeros((b, n))
    for i in range(b):
        s = np.zeros(n)
        for p in range(n):
            s[p] = sum(weights[i, :, p, j].mean() for j in range(length) if tokens[i, j])
        grid_s = s.reshape(grid)
        smoothed = np.zeros(grid)
        for r in range(grid[0]):
            for c in range(grid[1]):
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        if 0 <= r + dr < grid[0] and 0 <= c + dc < grid[1]:
                            smoothed[r, c] += kernel[dr + 1, dc + 1] * grid_s[r + dr, c + dc]
        s = smoothed.reshape(-1)
        out[i] = np.clip((s - np.median(s)) / s.max(), 0, 1)
    return out


def test_similarity_and_rescaled_logits_match_loops():
    rng = np.random.default_rng(0)
    weights = rng.random((2, 3, 12, 5)).astype(np.float32)  # [B, H, N = 3 x 4, L]
    tokens = np.array([[1, 1, 0, 0, 0], [0, 1, 1, 1, 0]], np.float32)
    got = np.asarray(jax.jit(prompt_similarity, static_argnums=2)(weights, tokens, (3, 4)))  # one compile
    np.testing.assert_allclose(got, _similarity_reference(weights, tokens, (3, 4)), rtol=1e-5, atol=1e-6)

    logits = rng.normal(size=(2, 2, 4, 4)).astype(np.float32)
    c = rng.random((2, 4)).astype(np.float32)
    masked = np.array([[1, 1, 0, 0], [0, 0, 0, 0]], np.float32)
    expected = logits.copy()
    for b in range(2):
        for i in range(4):
            for j in range(4):
                if masked[b, i] == 1 and masked[b, j] == 0:
                    expected[b, :, i, j] *= c[b, j]
    rescale = jax.jit(rescale_logits)
    out = np.asarray(rescale(logits, c, masked))
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_array_equal(out[1], logits[1])  # empty mask: every logit unchanged
    doubled = np.asarray(rescale(np.concatenate([logits, logits]), c, masked))
    np.testing.assert_array_equal(doubled[2:], out)  # the null-caption half gets the conditional c


def test_masks_score_and_the_rasg_step():
    pixels = np.zeros((4, 4), bool)
    pixels[:, 2:] = True  # right half
    pixels[0, 0] = True  # one pixel of the top-left patch: under half, stays known
    np.testing.assert_array_equal(patch_mask(check_mask(pixels, 1, 4, 4), 2), [[0, 1, 0, 1]])
    with pytest.raises(ValueError, match=r"mask has shape \(3, 4\)"):
        check_mask(np.ones((3, 4)), 1, 4, 4)

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1, 2, 3, 2)).astype(np.float32)  # [B, H, N, L], one block
    masked, tokens = np.array([[1.0, 0.0, 1.0]]), np.array([[0.0, 1.0]])
    s = logits[0].mean(0)[:, 1] - 1.0
    bce = np.mean([np.log1p(np.exp(-x)) if y else np.log1p(np.exp(x)) for x, y in zip(s, masked[0], strict=True)])
    np.testing.assert_allclose(jax.jit(rasg_score)([logits], tokens, masked), [-bce], rtol=1e-5)

    x, v, g = (rng.normal(size=(2, 3)).astype(np.float32) for _ in range(3))
    step = jax.jit(rasg_step)
    t, t_next = jnp.float32(0.7), jnp.float32(0.6)
    np.testing.assert_allclose(step(x, v, g, t, t_next, 0.0), x + (t_next - t) * v, rtol=1e-5, atol=1e-6)
    alpha = lambda u: (1 - u) ** 2 / ((1 - u) ** 2 + u**2)  # noqa: E731
    a, a_next = alpha(0.7), alpha(0.6)
    sigma = np.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
    np.testing.assert_allclose(jax.jit(ddim_sigma)(t, t_next), sigma, rtol=1e-5)
    s_ = 0.5 * np.sqrt(0.4**2 + 0.6**2) * sigma
    x0, eps = x - 0.7 * v, x + 0.3 * v
    np.testing.assert_allclose(
        step(x, v, g, t, t_next, 0.5), 0.4 * x0 + np.sqrt(0.36 - s_**2) * eps + s_ * g, rtol=1e-5, atol=1e-6
    )


def test_bad_settings_and_a_model_without_cross_attention():
    with pytest.raises(ValueError, match="rasg_eta=-1"):
        HdPainter(rasg_eta=-1)
    with pytest.raises(ValueError, match="painta_until=2"):
        HdPainter(painta_until=2)
    with pytest.raises(ValueError, match="model: this DiT has cross_attention=None"):
        HdPainter().velocity(tiny_dit(cross_attention=None), None, CAPTIONS, np.ones((8, 8)))
    with pytest.raises(ValueError, match="model=NoneType"):
        HdPainter().inpaint(None, None, CAPTIONS, NOISE, np.ones((8, 8)), NOISE)
    assert STEERERS["hd_painter"].fidelity == "official-code"


@pytest.mark.slow  # three compiles of the DiT
def test_empty_mask_is_bit_identical_and_a_mask_changes_only_masked_queries():
    model = tiny_dit()
    params = init_params(model)
    steer = HdPainter(painta_until=0.0, tokens=(3, 4))  # all 5 positions would sum every softmax row to 1
    plain = np.asarray(jax.jit(lambda x: model.apply({"params": params}, x, TIMES[:1].repeat(2), CAPTIONS))(NOISE))
    empty = np.zeros((8, 8), bool)
    np.testing.assert_array_equal(np.asarray(steer.velocity(model, params, CAPTIONS, empty)(NOISE, 0.25)), plain)

    right = np.zeros((8, 8), bool)
    right[:, 4:] = True  # patches 1 and 3 of the 2 x 2 grid
    masked = patch_mask(check_mask(right, 2, 8, 8), 4)
    times = jnp.full((2,), 0.25)

    @jax.jit
    def weights_before_and_after(params):
        c = steer.similarities(model, params, NOISE, times, CAPTIONS, masked)[0]
        out = []
        for rules in ((), painta_rules({0: c}, masked)):
            with iv.intervene(*rules):
                _, cache = iv.run_with_cache(
                    model, {"params": params}, NOISE, times, CAPTIONS, names=("attention_weights",), layers=[0]
                )
            out.append(cache["layers_0/attention"]["attention_weights"])
        return c, *out

    c, before, after = (np.asarray(a) for a in weights_before_and_after(params))
    assert c.max() > 0  # some known patch is prompt-like, so its logit is rescaled
    np.testing.assert_allclose(after[:, :, [0, 2]], before[:, :, [0, 2]], rtol=1e-5, atol=1e-9)  # known queries
    assert np.abs(after[:, :, [1, 3]] - before[:, :, [1, 3]]).max() > 1e-4


@pytest.mark.slow  # compiles the sampler's PAIntA and RASG passes (about 15 s)
def test_inpainting_keeps_the_known_region_and_the_no_op_sampler_is_blended_euler():
    model = tiny_dit()
    params = init_params(model)
    source = jnp.tanh(jax.random.normal(jax.random.key(3), NOISE.shape))
    right = np.zeros((8, 8), bool)
    right[:, 4:] = True
    off = HdPainter(painta=False).inpaint(model, params, CAPTIONS, source, right, NOISE, steps=2)
    velocity = jax.jit(dit.guided_velocity(model, {"params": params}, CAPTIONS))
    m = jnp.asarray(right, jnp.float32)[None, :, :, None]
    blend = lambda x, t, step: m * x + (1 - m) * ((1 - t) * source + t * NOISE)  # noqa: E731
    expected = m * dit.euler_sample(velocity, NOISE, 2, latent_update=blend) + (1 - m) * source
    np.testing.assert_array_equal(np.asarray(off), np.asarray(expected))
    for steer in (HdPainter(painta_until=0.0, tokens=(3, 4)), HdPainter(rasg_eta=1.0, painta_until=0.6, tokens=(3, 4))):
        out = np.asarray(steer.inpaint(model, params, CAPTIONS, source, right, NOISE, steps=2))
        np.testing.assert_array_equal(out[:, :, :4], np.asarray(source)[:, :, :4])
        assert np.abs(out[:, :, 4:] - np.asarray(off)[:, :, 4:]).max() > 1e-4
    empty = HdPainter(rasg_eta=1.0).inpaint(model, params, CAPTIONS, source, np.zeros((8, 8)), NOISE, steps=2)
    np.testing.assert_array_equal(np.asarray(empty), np.asarray(source))
