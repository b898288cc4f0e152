"""A tiny prefix vision-language model (image encoder with a class token) and its inputs, shared by the visual
token-reduction tests (vtc_cls, zipvl, g_search, vmtc_cmai)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn.interventions import run_with_cache
from attn.models import VisionLanguageModel

B, T, N = 2, 4, 16  # batch, question tokens, image tokens (8x8 images, 2x2 patches)
IMAGES = jax.random.uniform(jax.random.key(0), (B, 8, 8, 3))
TOKENS = jax.random.randint(jax.random.key(1), (B, T), 0, 11)


_FIELDS = dict(
    vocab_size=11,
    num_layers=2,
    d_model=16,
    num_heads=2,
    mlp_dim=32,
    patch_size=2,
    vision_layers=2,
    fusion="prefix",
    vision_cls_token=True,
)
_MODELS = {}


def tiny_vlm(**fields):
    """(model, params) of a 2+2-layer prefix VLM with vision_cls_token=True (fields override); built once per
    field set."""
    key = tuple(sorted(fields.items()))
    if key not in _MODELS:
        _MODELS[key] = _build(**fields)
    return _MODELS[key]


def model_only(**fields):
    """The tiny model's definition with `fields` changed, not initialised (for checks made before running it)."""
    return VisionLanguageModel(**{**_FIELDS, **fields})


def _build(**fields):
    """Parameters of the model's shapes drawn from N(0, 0.3^2) (traced with eval_shape, never compiled: an eager or
    jitted init would cost a compile per test process)."""
    model = model_only(**fields)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(2), IMAGES, TOKENS)["params"])
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape), s.dtype), shapes)
    return model, nn.meta.unbox(params)


def encoder_weights(model, params):
    """float64 [L, B, H, 1 + N, 1 + N]: the image encoder's attention weights, captured with attn.interventions."""
    _, cache = run_with_cache(
        model, {"params": params}, IMAGES, names=("attention_weights",), layers=["image_encoder/*"], method="encode"
    )
    paths = sorted(p for p in cache if p.startswith("image_encoder/"))
    return np.stack([np.asarray(cache[p]["attention_weights"], np.float64) for p in paths])


@functools.partial(jax.jit, static_argnums=0)
def image_tokens(model, params):
    return model.apply({"params": params}, IMAGES, method="encode")


@functools.partial(jax.jit, static_argnums=0)
def decode(model, params, prefix, tokens=TOKENS):
    """The decoder's logits on `prefix`, no rules (what a reduction must equal when it drops tokens physically)."""
    return model.apply({"params": params}, tokens, prefix, method="decode")


@functools.partial(jax.jit, static_argnums=0)
def full_logits(model, params):
    return model.apply({"params": params}, IMAGES, TOKENS)
