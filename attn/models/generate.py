"""Autoregressive generation with the KV cache: one prefill call for the prompt, then one token per step.

    cache = init_cache(model, params, batch_size, max_len)        # zeros, shapes from jax.eval_shape
    tokens = generate(model, params, prompt, 32)                  # greedy, int [B, P + 32]
    tokens = generate(model, params, prompt, 32, temperature=0.8, top_k=40, rng=jax.random.key(0))
    target = generate_encoder_decoder(model, params, src, 32, lengths=src_lengths)   # int [B, 32]
    for token in generate_stream(model, params, prompt, 32): ...  # int32 [B] per step, as generate's tokens

`generate_encoder_decoder` drives a model with `encode(inputs, lengths)` and `decode(tokens, encoded, lengths,
decode=...)` methods (`EncoderDecoder`; `VisionLanguageModel` with fusion="cross", inputs = images): it encodes
once, then decodes from a start token with the decoder's cache.

`params` is either the "params" collection or a whole variables dict with a "params" entry (as returned by
`model.init`); boxed (logically partitioned) parameters work as they are.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _variables(params: Any) -> dict[str, Any]:
    """A variables dict without any "cache" from either a params tree or a variables dict."""
    if isinstance(params, Mapping) and "params" in params:
        return {name: value for name, value in params.items() if name not in ("cache", "intermediates")}
    return {"params": params}


def init_cache(model: nn.Module, params: Any, batch_size: int, max_len: int) -> Any:
    """A zero "cache" collection for decoding up to `max_len` tokens in rows of `batch_size`.

    Shapes come from `jax.eval_shape` of the cache-creating decode call, so no forward pass runs.
    Returns the pytree to pass as variables["cache"] (dense KV caches [B, max_len, ...], caches managed by a policy
    at its budget, e.g. `streaming`'s [B, budget, ...] whatever max_len, and int32 indices at 0).
    """
    if batch_size <= 0 or max_len <= 0:
        raise ValueError(f"batch_size={batch_size} and max_len={max_len} must both be positive")
    variables = _variables(params)

    def create(variables: dict[str, Any], tokens: jax.Array) -> Any:
        _, state = model.apply(variables, tokens, decode=True, mutable=["cache"])
        return state["cache"]

    tokens = jax.ShapeDtypeStruct((batch_size, max_len), jnp.int32)
    shapes = jax.eval_shape(create, variables, tokens)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _next_token(logits: jax.Array, temperature: float, top_k: int | None, key: jax.Array) -> jax.Array:
    """Next token int32 [B] from logits float32 [B, V]: argmax, or a (top-k) sample at `temperature`."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k"))
def generate(
    model: nn.Module,
    params: Any,
    prompt: jax.Array,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Extend `prompt` int [B, P] by `max_new_tokens` tokens; returns int32 [B, P + max_new_tokens].

    Every row shares the prompt length P. temperature == 0 is greedy (argmax); temperature > 0 samples
    from softmax(logits / temperature), restricted to the `top_k` largest logits when top_k is set, and
    needs `rng` (step i uses fold_in(rng, i), so a fixed rng reproduces the same tokens).
    Jitted, with model, max_new_tokens, temperature and top_k static.
    """
    if prompt.ndim != 2 or prompt.shape[1] == 0 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must be int [batch, length>=1]; got {prompt.dtype} {prompt.shape}")
    _check_sampling(model, max_new_tokens, temperature, top_k, rng)
    prompt = prompt.astype(jnp.int32)
    if max_new_tokens == 0:
        return prompt
    batch, prompt_len = prompt.shape
    total = prompt_len + max_new_tokens
    variables = _variables(params)

    def decode(cache: Any, tokens: jax.Array) -> tuple[jax.Array, Any]:
        logits, state = model.apply({**variables, "cache": cache}, tokens, decode=True, mutable=["cache"])
        return logits[:, -1], state["cache"]

    cache = init_cache(model, variables, batch, total)
    return _decode_loop(decode, cache, prompt, max_new_tokens, temperature, top_k, rng)


@functools.partial(jax.jit, static_argnames=("model", "temperature", "top_k"))
def _decode_step(
    model: nn.Module,
    variables: Any,
    cache: Any,
    tokens: jax.Array,
    key: jax.Array,
    temperature: float,
    top_k: int | None,
) -> tuple[jax.Array, Any]:
    """One cached decode call on tokens int32 [B, T] -> (next token int32 [B], updated cache)."""
    logits, state = model.apply({**variables, "cache": cache}, tokens, decode=True, mutable=["cache"])
    return _next_token(logits[:, -1], temperature, top_k, key), state["cache"]


def generate_stream(
    model: nn.Module,
    params: Any,
    prompt: jax.Array,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    rng: jax.Array | None = None,
) -> Iterator[jax.Array]:
    """Yields the `max_new_tokens` tokens that `generate` appends to `prompt` int [B, P], one int32 [B] per step,
    each as soon as it is decoded (for printing while sampling).

    Same arguments and draws as `generate` (step i uses fold_in(rng, i)); the prefill and the single-token step are
    each compiled once, and the loop runs in Python, one dispatch per token.
    """
    if prompt.ndim != 2 or prompt.shape[1] == 0 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must be int [batch, length>=1]; got {prompt.dtype} {prompt.shape}")
    _check_sampling(model, max_new_tokens, temperature, top_k, rng)
    if max_new_tokens == 0:
        return
    variables = _variables(params)
    rng = jax.random.key(0) if rng is None else rng  # unused by greedy decoding, as in _decode_loop
    cache = init_cache(model, variables, prompt.shape[0], prompt.shape[1] + max_new_tokens)
    tokens = prompt.astype(jnp.int32)
    for i in range(max_new_tokens):
        token, cache = _decode_step(model, variables, cache, tokens, jax.random.fold_in(rng, i), temperature, top_k)
        yield token
        tokens = token[:, None]


def _check_sampling(model: nn.Module, max_new_tokens: int, temperature: float, top_k: int | None, rng: Any) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy)")
    if top_k is not None and not 1 <= top_k <= getattr(model, "vocab_size", top_k):
        raise ValueError(f"top_k={top_k} must be None or in [1, vocab_size]")
    if temperature > 0 and rng is None:
        raise ValueError(f"temperature={temperature} samples tokens and needs rng (a jax.random key)")


def _decode_loop(
    decode: Callable[[Any, jax.Array], tuple[jax.Array, Any]],
    cache: Any,
    prompt: jax.Array,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    rng: jax.Array | None,
    prefill: Callable[[Any, jax.Array], tuple[jax.Array, Any]] | None = None,
) -> jax.Array:
    """Prefill `prompt` int32 [B, P] through `prefill` (default `decode`), `(cache, tokens) -> (last logits [B, V],
    cache)`, then one token per step with `decode`; returns int32 [B, P + max_new_tokens]. Step i draws with
    fold_in(rng, i)."""
    batch, prompt_len = prompt.shape
    total = prompt_len + max_new_tokens
    if rng is None:
        rng = jax.random.key(0)  # unused by greedy decoding; keeps one code path
    logits, cache = (prefill or decode)(cache, prompt)
    first = _next_token(logits, temperature, top_k, jax.random.fold_in(rng, 0))
    out = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(prompt).at[:, prompt_len].set(first)

    def step(i: jax.Array, carry: tuple[jax.Array, Any]) -> tuple[jax.Array, Any]:
        out, cache = carry
        last = jax.lax.dynamic_slice_in_dim(out, prompt_len + i - 1, 1, axis=1)
        logits, cache = decode(cache, last)
        token = _next_token(logits, temperature, top_k, jax.random.fold_in(rng, i))
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], prompt_len + i, axis=1)
        return out, cache

    out, _ = jax.lax.fori_loop(1, max_new_tokens, step, (out, cache))
    return out


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "start_token", "temperature", "top_k"))
def generate_encoder_decoder(
    model: nn.Module,
    params: Any,
    inputs: jax.Array,
    max_new_tokens: int,
    *,
    lengths: jax.Array | None = None,
    start_token: int = 0,
    temperature: float = 0.0,
    top_k: int | None = None,
    rng: jax.Array | None = None,
) -> jax.Array:
    """The decoder's continuation int32 [B, max_new_tokens] of `start_token`, conditioned on `inputs`.

    inputs: what `model.encode` takes (source tokens int [B, Ts] with valid `lengths` int [B] for an
    `EncoderDecoder`; images [B, H, W, C] for a `VisionLanguageModel`). The encoder runs once; the decoder's cache
    is created by a real decode call over max_new_tokens positions (so a cross-attention layer that keeps the
    projected context in its cache has it), then the start token is prefilled and every further token costs one
    cached decoder step. A model whose `fusion` is "prefix" gets the encoded tokens on the creating call and the
    prefill only (they are then in the cache) and None afterwards. Sampling as in `generate`. Jitted, with model,
    max_new_tokens, start_token, temperature and top_k static.
    """
    _check_sampling(model, max_new_tokens, temperature, top_k, rng)
    if max_new_tokens == 0:
        return jnp.zeros((inputs.shape[0], 0), jnp.int32)
    variables = _variables(params)
    encoded = model.apply(variables, inputs, lengths, method="encode")
    batch = inputs.shape[0]

    prefix = getattr(model, "fusion", None) == "prefix"

    def step(cache: Any, tokens: jax.Array, context: jax.Array | None) -> tuple[jax.Array, Any]:
        logits, state = model.apply(
            {**variables, "cache": cache}, tokens, context, lengths, decode=True, mutable=["cache"], method="decode"
        )
        return logits[:, -1], state["cache"]

    created = jnp.zeros((batch, max_new_tokens), jnp.int32)
    _, state = model.apply(variables, created, encoded, lengths, decode=True, mutable=["cache"], method="decode")
    prompt = jnp.full((batch, 1), start_token, jnp.int32)
    out = _decode_loop(
        lambda cache, tokens: step(cache, tokens, None if prefix else encoded),
        state["cache"],
        prompt,
        max_new_tokens,
        temperature,
        top_k,
        rng,
        prefill=lambda cache, tokens: step(cache, tokens, encoded),
    )
    return out[:, 1:]
