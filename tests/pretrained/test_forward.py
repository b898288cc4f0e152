"""Loaded checkpoints compute what transformers computed: logits within 1e-4 (float32, eager attention on their side)
and the same greedy continuation through the KV cache."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from attn.models.generate import generate
from tests.pretrained.fixtures import NAMES, loaded, reference


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
    model, params, _, _ = loaded(name)
    ref = reference(name)
    logits = model.apply({"params": params}, jnp.asarray(ref["input_ids"], jnp.int32))
    assert logits.shape == ref["logits"].shape
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_matches_transformers(name):
    model, params, _, _ = loaded(name)
    ref = reference(name)
    prompt = jnp.asarray(ref["input_ids"], jnp.int32)
    new_tokens = ref["greedy"].shape[1] - prompt.shape[1]
    tokens = generate(model, params, prompt, new_tokens)
    np.testing.assert_array_equal(np.asarray(tokens), ref["greedy"])


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_tokenizer_encodes_the_fixture_prompt(name):
    _, _, tokenizer, _ = loaded(name)
    ids = reference(name)["input_ids"][0].tolist()
    assert tokenizer.encode("def fibonacci(n):\n    return").ids == ids
    assert tokenizer.decode(ids) == "def fibonacci(n):\n    return"


def test_models_have_the_checkpoint_structure():
    gpt2, _, _, gpt2_config = loaded("gpt2")
    assert (gpt2.position_embedding, gpt2.max_len, gpt2.tie_embeddings) == ("learned", gpt2_config["n_positions"], True)
    assert (gpt2.norm, gpt2.norm_eps, gpt2.mlp, gpt2.mlp_bias) == ("layernorm", 1e-5, "gelu", True)
    llama, _, _, llama_config = loaded("llama_yarn")
    assert (llama.num_heads, llama.num_kv_heads, llama.head_dim) == (4, 2, 12)
    assert (llama.norm, llama.mlp, llama.tie_embeddings) == ("rmsnorm", "swiglu", False)
    assert llama.attention_options["rope_scaling"] == "yarn"
    assert (
        llama.attention_options["rope_original_max_len"]
        == llama_config["rope_parameters"]["original_max_position_embeddings"]
    )
