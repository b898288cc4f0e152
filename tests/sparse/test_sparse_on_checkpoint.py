"""The training-free dynamic sparse systems on a checkpoint loaded through attn.pretrained (the tiny Llama fixture:
GQA, RoPE, 2 layers): swapped into its layers with the loaded parameters, each equals the checkpoint's own causal
softmax at full density and runs at a lower one; the static window differs from dense at a low density."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import pretrained
from eval import sparse_quality as bsq

LLAMA = pathlib.Path(__file__).parents[1] / "fixtures" / "hf" / "llama"
LENGTH, BLOCK = 64, 16  # the fixture's 64 positions: 4 key blocks of 16


@pytest.fixture(scope="module")
def checkpoint():
    model, params, _, _ = pretrained.load(LLAMA)
    tokens = jax.random.randint(jax.random.key(0), (2, LENGTH), 0, model.vocab_size)
    dense = model.apply({"params": params}, tokens)
    return model, params, tokens, np.asarray(dense)


def swapped_logits(checkpoint, system, density):
    model, params, tokens, _ = checkpoint
    head_dim = model.head_dim or model.d_model // model.num_heads
    options = bsq.system_options(system, density, LENGTH, head_dim, block=BLOCK)
    swapped = bsq.swapped_model(model, system, options)
    full = bsq.with_fresh_extras(swapped, params, tokens[:1]) if system in bsq.FRESH else params
    return np.asarray(swapped.apply({"params": full}, tokens))


@pytest.mark.slow  # 10-50 s a system: two models compiled each
@pytest.mark.parametrize("system", bsq.SYSTEMS)
def test_every_training_free_system_is_the_checkpoints_softmax_at_full_density(checkpoint, system):
    dense = checkpoint[3]
    np.testing.assert_allclose(swapped_logits(checkpoint, system, 1.0), dense, atol=2e-4, rtol=2e-4)
    sparse = swapped_logits(checkpoint, system, 0.25)
    assert sparse.shape == dense.shape and np.isfinite(sparse).all()


def test_a_quarter_of_the_blocks_changes_the_checkpoints_output(checkpoint):
    dense = checkpoint[3]
    sparse = swapped_logits(checkpoint, "top_m", 0.25)  # one key block of four per query block
    assert np.abs(sparse - dense)[:, BLOCK:].max() > 1e-3  # later query blocks lose keys
    np.testing.assert_allclose(sparse[:, :BLOCK], dense[:, :BLOCK], atol=2e-4, rtol=2e-4)  # block 0 sees only itself
    assert jnp.asarray(sparse).dtype == jnp.float32
