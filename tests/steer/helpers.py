"""A tiny decoder and its captured attention, shared by the steering tests."""

import jax
import numpy as np

from attn.interventions import run_with_cache
from attn.models import DecoderLM

V, B, T, H = 24, 2, 8, 4
TOKENS = jax.random.randint(jax.random.key(0), (B, T), 0, V)


def tiny_lm(attention="softmax"):
    model = DecoderLM(vocab_size=V, num_layers=2, d_model=16, num_heads=H, mlp_dim=32, attention=attention)
    return model, model.init(jax.random.key(1), TOKENS)


def layer0_weights(model, variables, tokens=TOKENS):
    """Attention weights float64 [B, H, T, T] the first layer used (its input does not depend on any rule)."""
    _, cache = run_with_cache(model, variables, tokens, names=("attention_weights",), layers=[0])
    return np.asarray(cache["layers_0/attention"]["attention_weights"], np.float64)
