"""Tiny decoders whose weights plant a known head behaviour, for the analysis tools' known-answer tests.

Every model here has one-hot token embeddings (token v is the basis vector e_v of the first `vocab` features), zero
feed-forward outputs, and attention heads wired by hand; with learned positions, position p adds e_{vocab + p}.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn.models.decoder import DecoderLM

C = 6.0  # query/key gain: planted logits are large enough that the chosen key takes (nearly) all the weight


def decoder(vocab: int, d_model: int, head_dim: int, length: int | None = None, num_heads: int = 2) -> DecoderLM:
    """2 layers x `num_heads` heads, RMSNorm, tied embeddings; learned positions when `length` is given."""
    return DecoderLM(
        vocab_size=vocab,
        num_layers=2,
        d_model=d_model,
        num_heads=num_heads,
        head_dim=head_dim,
        mlp_dim=8,
        tie_embeddings=True,
        position_embedding="none" if length is None else "learned",
        max_len=length or 8,
        attention_options={"position": "none"},
    )


def blank_params(model: DecoderLM, length: int) -> dict:
    """float64 numpy parameters with one-hot tokens, unit norm scales and every other weight 0 (zero positions,
    feed-forward, attention and output projections: every head writes nothing and attends uniformly until wired)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, length), jnp.int32))["params"]
    params = jax.tree_util.tree_map_with_path(  # norms' scales 1, everything else 0 (no initialiser is run)
        lambda path, leaf: np.full(leaf.shape, 1.0 if path[-1].key == "scale" else 0.0), nn.meta.unbox(shapes)
    )
    params["embedding"]["embedding"][:, : model.vocab_size] = np.eye(model.vocab_size)
    return params


def induction_model(vocab: int, length: int) -> tuple[DecoderLM, dict]:
    """An induction circuit: head (0, 0) attends to the previous position and writes the previous token into
    features [vocab, 2 vocab); head (1, 0) attends from a token x to the position whose previous token is x (the
    successor of x's previous occurrence) and copies that token to the output (gain 4, above the residual's own
    token). Head (0, 1) attends to itself, head (1, 1) to position 0; both write nothing.

    d_model = 2 vocab + length (tokens, previous tokens, positions); head_dim = max(vocab, length)."""
    d_model, head_dim = 2 * vocab + length, max(vocab, length)
    model = decoder(vocab, d_model, head_dim, length)
    params = blank_params(model, length)
    pos = vocab * 2 + np.arange(length)  # position features
    params["position_embedding"]["embedding"][np.arange(length), pos] = 1.0
    first, second = params["layers_0"]["attention"], params["layers_1"]["attention"]
    for p in range(1, length):  # previous-token head: query at p points at key p - 1
        first["query"]["kernel"][pos[p], 0, p - 1] = C
        first["key"]["kernel"][pos[p - 1], 0, p - 1] = C
    first["value"]["kernel"][np.arange(vocab), 0, np.arange(vocab)] = 1.0
    first["out"]["kernel"][0, np.arange(vocab), vocab + np.arange(vocab)] = 1.0
    first["query"]["kernel"][pos, 1, np.arange(length)] = C  # self head (layer 0, head 1)
    first["key"]["kernel"][pos, 1, np.arange(length)] = C
    second["query"]["kernel"][np.arange(vocab), 0, np.arange(vocab)] = 2 * C  # token x meets previous token x
    second["key"]["kernel"][vocab + np.arange(vocab), 0, np.arange(vocab)] = 2 * C
    second["value"]["kernel"][np.arange(vocab), 0, np.arange(vocab)] = 1.0
    second["out"]["kernel"][0, np.arange(vocab), np.arange(vocab)] = 4.0
    second["query"]["kernel"][:, 1, 0] = C  # every query points at position 0 (layer 1, head 1)
    second["key"]["kernel"][pos[0], 1, 0] = C
    return model, params


def ov_model(vocab: int, maps: dict[tuple[int, int], dict[int, int]]) -> tuple[DecoderLM, dict]:
    """No positions, d_model = head_dim = vocab: head (layer, h) has W_V = I and an output projection sending e_t to
    e_{maps[(layer, h)][t]} (tokens absent from its map are sent nowhere); heads not in `maps` write nothing."""
    model = decoder(vocab, vocab, vocab)
    params = blank_params(model, 4)
    for (layer, head), mapping in maps.items():
        attention = params[f"layers_{layer}"]["attention"]
        attention["value"]["kernel"][np.arange(vocab), head, np.arange(vocab)] = 1.0
        for source, target in mapping.items():
            attention["out"]["kernel"][head, source, target] = 1.0
    return model, params


def position_reader_model(vocab: int, length: int) -> tuple[DecoderLM, dict]:
    """Head (1, h) for h in (0, 1) attends from every query to position h and copies that position's token to the
    output (gain 4); the layer-0 heads attend to themselves and write nothing. Only head (1, 0) carries the token at
    position 0 to the last position, only head (1, 1) the token at position 1.

    d_model = vocab + length (tokens, positions); head_dim = max(vocab, length)."""
    model = decoder(vocab, vocab + length, max(vocab, length), length)
    params = blank_params(model, length)
    pos = vocab + np.arange(length)
    params["position_embedding"]["embedding"][np.arange(length), pos] = 1.0
    first, second = params["layers_0"]["attention"], params["layers_1"]["attention"]
    for head in (0, 1):
        first["query"]["kernel"][pos, head, np.arange(length)] = C
        first["key"]["kernel"][pos, head, np.arange(length)] = C
        second["query"]["kernel"][:, head, 0] = C
        second["key"]["kernel"][pos[head], head, 0] = C
        second["value"]["kernel"][np.arange(vocab), head, np.arange(vocab)] = 1.0
        second["out"]["kernel"][head, np.arange(vocab), np.arange(vocab)] = 4.0
    return model, params


def match_model(vocab: int, patterns: list[tuple[str, str]]) -> tuple[DecoderLM, dict]:
    """No positions, d_model = head_dim = vocab, every head writes nothing (the residual stays one-hot);
    patterns[layer][head]: "self" (q . k = C^2 for equal tokens, 0 otherwise: attends to the keys holding the query's
    own token), "sink" (only token 0's key answers every query) or "none" (zero queries and keys: uniform)."""
    model = decoder(vocab, vocab, vocab)
    params = blank_params(model, 4)
    for layer, heads in enumerate(patterns):
        q, k = (params[f"layers_{layer}"]["attention"][name]["kernel"] for name in ("query", "key"))
        for head, pattern in enumerate(heads):
            if pattern == "self":
                q[np.arange(vocab), head, np.arange(vocab)] = C
                k[np.arange(vocab), head, np.arange(vocab)] = C
            elif pattern == "sink":
                q[:, head, 0], k[0, head, 0] = C, C
    return model, params
