"""AutoPASTA [161] ("Model Tells Itself Where to Attend: Faithfulness Meets Automatic Attention Steering", Zhang et
al. 2024): the model names the key sentence of the context itself, then PASTA steers toward it.

    1. identify   ask the model which context sentence answers the question (an identification prompt over the same
                  context) and map its answer back onto the context: the candidate sentence s* it scores highest,
                  s* = argmax_s logits[B, -1, token_s] over the candidates' answer tokens (the paper maps the
                  generated key sentence onto the context; here the model answers with a sentence's id token, and
                  the map keeps only real context sentences, so a row always gets a span of its context);
    2. steer      PASTA (attn.steer.pasta) in the selected heads with G = the tokens of s*:
                  A'_ij = c_ij A_ij / sum_j c_ij A_ij,  c_ij = alpha outside G (prompt keys), 1 inside.
    3. heads      coarse-to-fine profiling on a small labelled set: score each layer with all its heads steered,
                  keep the best `top_layers` layers, then score each of their heads alone and keep the best k.

No-op: alpha = 1 (bit-identical) or an empty head_config. Shapes: identification prompts int [B, T]; candidate
sentences: S spans (start, stop) of the answer prompt and S answer tokens; spans out: a mask [B, P].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn import interventions as iv
from attn.steer.common import HeadConfig, model_geometry, profile_layers, span_mask, top_heads
from attn.steer.pasta import Pasta
from attn.steer.registry import register


@register(
    "autopasta",
    paper="[161] Model Tells Itself Where to Attend: Faithfulness Meets Automatic Attention Steering (AutoPASTA)",
    fidelity="reconstructed",
    reference=(
        "steering operator: QingruZhang/PASTA pastalib/pasta.py (log(alpha) on the non-emphasised prompt keys of the "
        "selected heads); identification, mapping onto the context and coarse-to-fine (layers, then heads) profiling "
        "from the paper's method description; the official QingruZhang/AutoPASTA code could not be read here"
    ),
    no_op="alpha=1 (bit-identical), or head_config={} (no rules)",
)
@dataclasses.dataclass(frozen=True)
class AutoPasta:
    """head_config: {layer: heads} to steer; alpha in (0, 1]; sentences: the candidate key sentences, (start, stop)
    spans of the answer prompt; sentence_tokens: the token the model answers with for each sentence (same order)."""

    head_config: Mapping[int, Sequence[int]]
    sentences: Sequence[tuple[int, int]]
    sentence_tokens: Sequence[int]
    alpha: float = 0.01

    def __post_init__(self) -> None:
        Pasta(self.head_config, self.alpha)  # validates alpha
        if len(self.sentences) != len(self.sentence_tokens) or not self.sentences:
            raise ValueError(
                f"sentences ({len(self.sentences)}) and sentence_tokens ({len(self.sentence_tokens)}) must be "
                "non-empty and of equal length: one answer token per candidate sentence"
            )

    def identify(self, model: Any, params: Any, prompts: jax.Array) -> jax.Array:
        """The key sentence the model names for each row: int32 [B], an index into `sentences`. prompts: the
        identification prompts int [B, T] (the context and a question asking which sentence is key)."""
        vocab = getattr(model, "vocab_size", None)
        bad = [t for t in self.sentence_tokens if not isinstance(vocab, int) or not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"sentence_tokens holds {bad}, outside the model's vocabulary of {vocab} tokens")
        logits = model.apply({"params": params}, prompts)[:, -1]  # [B, V]
        return jnp.argmax(logits[:, jnp.asarray(self.sentence_tokens)], axis=-1).astype(jnp.int32)

    def spans(self, chosen: jax.Array, seq_len: int) -> jax.Array:
        """The emphasis mask float32 [B, seq_len] of the chosen sentences (int [B], indices into `sentences`)."""
        for i, (start, stop) in enumerate(self.sentences):
            if not 0 <= start < stop <= seq_len:
                raise ValueError(
                    f"sentences[{i}]=({start}, {stop}) lies outside the sequence: need 0 <= start < stop <= "
                    f"seq_len={seq_len}"
                )
        table = span_mask([[s] for s in self.sentences], len(self.sentences), seq_len, name="sentences")  # [S, T]
        return table[chosen]

    def rules(self, model: Any, params: Any, prompts: jax.Array, seq_len: int) -> tuple[iv.Rule, ...]:
        """Identify the key sentence of each row with the model, then PASTA rules toward it (see the module
        docstring). seq_len: the length P of the answer prompt the rules will steer."""
        chosen = self.identify(model, params, prompts)
        return Pasta(self.head_config, self.alpha).rules(model, self.spans(chosen, seq_len))


def select_heads(
    score: Callable[[HeadConfig], float], model: Any, *, top_layers: int, k: int
) -> tuple[HeadConfig, dict[str, Any]]:
    """Coarse-to-fine profiling: the best `top_layers` layers by score({layer: all heads}), then the best k of their
    heads by score({layer: (head,)}). Returns ({layer: heads}, {"layer_scores" [L], "head_scores" [L, H] with NaN
    for heads not scored})."""
    num_layers, num_heads = model_geometry(model)
    if not isinstance(top_layers, int) or not 1 <= top_layers <= num_layers:
        raise ValueError(f"top_layers={top_layers!r} must be an int in [1, {num_layers}] (the model's layers)")
    layer_scores = profile_layers(score, num_layers, num_heads)
    keep = sorted(sorted(range(num_layers), key=lambda i: (-layer_scores[i], i))[:top_layers])
    if not isinstance(k, int) or not 0 <= k <= top_layers * num_heads:
        raise ValueError(f"k={k!r} must be an int in [0, top_layers * num_heads = {top_layers * num_heads}]")
    head_scores = np.full((num_layers, num_heads), np.nan)
    for layer in keep:
        head_scores[layer] = [score({layer: (head,)}) for head in range(num_heads)]
    ranked = top_heads(np.where(np.isnan(head_scores), -np.inf, head_scores), k)
    return ranked, {"layer_scores": layer_scores, "head_scores": head_scores}
