"""Soft injection of task embeddings [58] ("Soft Injection of Task Embeddings Outperforms Prompt-Based In-Context
Learning", Park & Rhee 2025): a task is conveyed by head activations instead of demonstrations in the prompt.

    1. task embeddings  e_{l,h} = mean over M task prompts of head (l, h)'s output at the last token
                        (the per-head outputs that enter the output projection): [L, H, Dv]
    2. injection        at the last prompt token of every selected layer, for every head,
                        h'_{l,h} = (1 - a_{l,h}) h_{l,h} + a_{l,h} e_{l,h},     a_{l,h} in [0, 1]
    3. head selection   a = sigmoid(z) with z [L, H] initialised at 0 (a = 0.5), optimised by Adam on the cross
                        entropy of the answer token of zero-shot prompts (model frozen), the validation loss
                        choosing the best z (`fit_mixing`)

The heads with large a are the task-relevant heads the paper analyses. No-op: a = 0 everywhere (bit-identical: the
head outputs are (1 - 0) h + 0 e), or no injected layers. Shapes: head_outputs [B, T, H, Dv]; embeddings [L, H, Dv];
mixing [L, H].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import attn
from attn import interventions as iv
from attn.steer.common import SELF_ATTENTION, model_geometry
from attn.steer.registry import register


def task_embeddings(model: Any, params: Any, prompts: Any) -> jax.Array:
    """e [L, H, Dv]: the mean over the rows of prompts int [M, T] of each head's output at the last token."""
    num_layers, _ = model_geometry(model)
    _, cache = iv.run_with_cache(
        model, {"params": params}, jnp.asarray(prompts), names=("head_outputs",), layers=list(range(num_layers))
    )
    paths = [f"layers_{layer}/attention" for layer in range(num_layers)]  # the token models' block naming
    return jnp.stack([cache[path]["head_outputs"][:, -1].mean(axis=0) for path in paths])


def mix_last_token(outputs: jax.Array, embedding: jax.Array, mixing: jax.Array) -> jax.Array:
    """head_outputs [B, T, H, Dv] with the last token's heads mixed toward embedding [H, Dv] by mixing [H]."""
    a = mixing.astype(outputs.dtype)[:, None]
    last = (1 - a) * outputs[:, -1] + a * embedding.astype(outputs.dtype)
    return outputs.at[:, -1].set(last)


@register(
    "soft_injection",
    paper="[58] Soft Injection of Task Embeddings Outperforms Prompt-Based In-Context Learning (arXiv 2507.20906)",
    fidelity="official-code",
    reference=(
        "SNU-DRL/Soft_Injection utils.py: get_last_mean_head_activations (mean last-token head outputs before o_proj), "
        "last_replace_activation_w_avg ((1 - alpha) h + alpha e at the last prompt token), optimize_head_selection "
        "(alpha = sigmoid(logit), logit init 0, Adam on the answer token's cross entropy, best validation kept: the "
        "code never updates its best loss, here the lowest validation loss is kept)"
    ),
    no_op="mixing all 0 (bit-identical), or layers=() (no rules)",
)
@dataclasses.dataclass(frozen=True, eq=False)
class SoftInjection:
    """embeddings [L, H, Dv] (task_embeddings); mixing [L, H] in [0, 1]; layers: the injected layers (None: all)."""

    embeddings: Any
    mixing: Any
    layers: Sequence[int] | None = None

    def rules(self, model: Any) -> tuple[iv.Rule, ...]:
        """Rules for `attn.intervene` injecting into the last token's head outputs of `model`. ValueError for shapes
        that do not fit the model, mixing outside [0, 1], or a layer out of range."""
        num_layers, num_heads = model_geometry(model)
        shape = tuple(jnp.shape(self.embeddings))
        if len(shape) != 3 or shape[:2] != (num_layers, num_heads):
            raise ValueError(f"embeddings has shape {shape}; expected [L, H, Dv] with L={num_layers}, H={num_heads}")
        if tuple(jnp.shape(self.mixing)) != (num_layers, num_heads):
            raise ValueError(
                f"mixing has shape {tuple(jnp.shape(self.mixing))}; expected [L, H]={num_layers, num_heads}"
            )
        try:
            values = np.asarray(self.mixing)
        except jax.errors.TracerArrayConversionError:  # traced (fit_mixing): sigmoid keeps it in [0, 1]
            values = None
        if values is not None and not ((values >= 0) & (values <= 1)).all():
            raise ValueError(f"mixing must lie in [0, 1]; got values in [{values.min()}, {values.max()}]")
        layers = range(num_layers) if self.layers is None else self.layers
        rules = []
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < num_layers:
                raise ValueError(f"layers holds {layer!r}, out of range: the model has {num_layers} layers")
            embedding, mixing = jnp.asarray(self.embeddings)[layer], jnp.asarray(self.mixing)[layer]
            fn = _injector(embedding, mixing)
            rules.append(iv.hook("head_outputs", fn, layers=[int(layer)], module=SELF_ATTENTION))
        return tuple(rules)


def _injector(embedding: jax.Array, mixing: jax.Array) -> Callable[[jax.Array, str], jax.Array]:
    def inject(outputs: jax.Array, path: str) -> jax.Array:
        if outputs.ndim != 4:
            raise ValueError(f"soft injection needs sequence head outputs [B, T, H, Dv]; {path} gave {outputs.shape}")
        return mix_last_token(outputs, embedding, mixing)

    return inject


def fit_mixing(
    model: Any,
    params: Any,
    embeddings: jax.Array,
    train: tuple[Any, Any],
    valid: tuple[Any, Any],
    *,
    steps: int = 100,
    learning_rate: float = 0.1,
    validate_every: int = 25,
) -> tuple[jax.Array, list[float]]:
    """The paper's soft head selection: mixing = sigmoid(z), z [L, H] from 0, Adam on the cross entropy of the
    answer (the last position's target) of train = (prompts int [N, T], answers int [N]); the z with the lowest
    loss on valid (same form) every `validate_every` steps is kept. Returns (mixing [L, H], validation losses)."""
    num_layers, num_heads = model_geometry(model)

    def loss(z: jax.Array, prompts: jax.Array, answers: jax.Array) -> jax.Array:
        with attn.intervene(*SoftInjection(embeddings, jax.nn.sigmoid(z)).rules(model)):
            logits = model.apply({"params": params}, prompts)[:, -1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, answers).mean()

    optimizer = optax.adam(learning_rate)

    @jax.jit
    def step(z, state, prompts, answers):
        value, grad = jax.value_and_grad(loss)(z, prompts, answers)
        updates, state = optimizer.update(grad, state, z)
        return optax.apply_updates(z, updates), state, value

    validate = jax.jit(loss)
    z = jnp.zeros((num_layers, num_heads), jnp.float32)
    state = optimizer.init(z)
    train_x, train_y = (jnp.asarray(a) for a in train)
    valid_x, valid_y = (jnp.asarray(a) for a in valid)
    best, best_z, history = np.inf, z, []
    for index in range(steps):
        z, state, _ = step(z, state, train_x, train_y)
        if (index + 1) % validate_every == 0 or index + 1 == steps:
            history.append(float(validate(z, valid_x, valid_y)))
            if history[-1] < best:
                best, best_z = history[-1], z
    return jax.nn.sigmoid(best_z), history
