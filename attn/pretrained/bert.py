"""BERT-family (`BertModel`, e.g. MiniLM / all-MiniLM-L6-v2) checkpoints as an `attn.models.Encoder`.

    tokens -> word + position + token_type embeddings -> LayerNorm (embedding_norm)
    -> num_hidden_layers post-norm blocks:
         x = LayerNorm(x + output.dense(attention(query(x), key(x), value(x))))          biases everywhere
         x = LayerNorm(x + output.dense(gelu(intermediate.dense(x))))                     erf gelu
    -> last_hidden_state [B, T, E] (head="hidden"); pooler tanh(dense(h[:, 0])) sown as intermediates/pooler_output

`head="embedding"` gives the masked mean of the last hidden states, sentence-transformers' mean pooling (its
all-MiniLM-L6-v2 pipeline then L2-normalises). Padding: `lengths` (BERT's attention_mask as a valid prefix per row).
Only `position_embedding_type="absolute"` encoders are supported (no decoder / cross-attention variants).
A BertModel saved without its pooler (`add_pooling_layer=False`, which config.json does not record) is recognised by
its tensors (no pooler.dense.*) and loads with cls_pooler=False; saving it writes no pooler.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attn.models.encoder import Encoder
from attn.pretrained.architecture import Architecture, check_keys, fit_pooler, positive_int, require
from attn.pretrained.layouts import TensorRule, linear_rules, norm_rules

NAME = "BertModel"

_TRANSLATED = {
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "position_embedding_type",
    "is_decoder",
    "add_cross_attention",
    # No effect on the forward pass at inference.
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",
    "tie_word_embeddings",
}


def build_model(config: Mapping[str, Any], dtype: Any) -> Encoder:
    """Encoder with BERT's structure from its config.json; ValueError for a setting it cannot reproduce."""
    check_keys(config, NAME, _TRANSLATED)
    require(config, "hidden_act", ("gelu",), NAME, "the MLP uses the erf gelu")
    require(config, "position_embedding_type", ("absolute", None), NAME, "positions are a learned absolute table")
    require(config, "is_decoder", (False, None), NAME, "the encoder is bidirectional")
    require(config, "add_cross_attention", (False, None), NAME, "an encoder has no cross-attention")
    d_model = positive_int(config, "hidden_size", NAME)
    heads = positive_int(config, "num_attention_heads", NAME)
    if d_model % heads:
        raise ValueError(
            f"config.json hidden_size={d_model} of {NAME} is not a multiple of num_attention_heads={heads}"
        )
    return Encoder(
        vocab_size=positive_int(config, "vocab_size", NAME),
        num_layers=positive_int(config, "num_hidden_layers", NAME),
        d_model=d_model,
        num_heads=heads,
        mlp_dim=positive_int(config, "intermediate_size", NAME),
        attention="softmax",
        attention_options={"position": "none", "use_bias": True},
        norm="layernorm",
        norm_eps=float(config.get("layer_norm_eps", 1e-12)),
        mlp="gelu_exact",
        mlp_bias=True,
        position_embedding="learned",
        max_len=positive_int(config, "max_position_embeddings", NAME),
        norm_position="post",
        embedding_norm=True,
        token_types=positive_int(config, "type_vocab_size", NAME) if config.get("type_vocab_size", 2) else 0,
        head="hidden",
        cls_pooler=True,
        dtype=dtype,
        param_dtype=dtype,
    )


def tensor_rules(model: Encoder, config: Mapping[str, Any]) -> list[TensorRule]:
    """Where each Encoder parameter sits in a BertModel checkpoint (pooler.dense only with `cls_pooler`)."""
    rules = [
        TensorRule("embeddings.word_embeddings.weight", ("embedding", "embedding"), groups=(1, 1)),
        TensorRule("embeddings.position_embeddings.weight", ("position_embedding", "embedding"), groups=(1, 1)),
        *norm_rules("embeddings.LayerNorm", ("embedding_norm",)),
    ]
    if model.cls_pooler:
        rules += linear_rules("pooler.dense", ("pooler",), (1, 1), bias=True)
    if model.token_types:
        rules.append(
            TensorRule("embeddings.token_type_embeddings.weight", ("token_type_embedding", "embedding"), groups=(1, 1))
        )
    for i in range(model.num_layers):
        hf, ours = f"encoder.layer.{i}", f"layers_{i}"
        attention = (ours, "attention")
        for projection in ("query", "key", "value"):
            rules += linear_rules(f"{hf}.attention.self.{projection}", (*attention, projection), (1, 2), bias=True)
        rules += linear_rules(f"{hf}.attention.output.dense", (*attention, "out"), (2, 1), bias=True)
        rules += norm_rules(f"{hf}.attention.output.LayerNorm", (ours, "attention_norm"))
        rules += linear_rules(f"{hf}.intermediate.dense", (ours, "feed_forward", "wi"), (1, 1), bias=True)
        rules += linear_rules(f"{hf}.output.dense", (ours, "feed_forward", "wo"), (1, 1), bias=True)
        rules += norm_rules(f"{hf}.output.LayerNorm", (ours, "mlp_norm"))
    return rules


def _no_parameter(name: str) -> bool:
    """The position-id buffer older checkpoints store (`embeddings.position_ids`)."""
    return name == "embeddings.position_ids"


BERT = Architecture(
    name=NAME,
    model_type="bert",
    build_model=build_model,
    tensor_rules=tensor_rules,
    no_parameter=_no_parameter,
    fit_to_tensors=fit_pooler,
)
