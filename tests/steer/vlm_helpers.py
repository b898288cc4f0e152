"""The tiny prefix VLM of tests/steer/prefix_vlm.py as the VLM steering tests use it (4 heads, 4x4 patches: N = 4
image tokens, no class token, one encoder layer), a jitted forward with rules, and small attention maps."""

import jax
import numpy as np

import attn
from attn.interventions import run_with_cache
from tests.steer import prefix_vlm
from tests.steer.prefix_vlm import IMAGES, TOKENS, T

H = 4
N = 4  # image tokens: 8x8 images, 4x4 patches
SPAN = (0, N)


def tiny_vlm(**fields):
    """(model, variables) of the shared tiny VLM with this file's sizes (fields override)."""
    sizes = dict(num_heads=H, patch_size=4, vision_layers=1, vision_cls_token=False)
    model, params = prefix_vlm.tiny_vlm(**{**sizes, **fields})
    return model, {"params": params}


def forward(model, variables, rules=(), layer=0, images=IMAGES, tokens=TOKENS):
    """One jitted call with `rules` active: (logits float32 [B, T, V], the attention weights float64
    [B, H, N + T, N + T] that decoder layer `layer` used)."""
    path = f"decoder/layers_{layer}/attention"

    @jax.jit
    def run(variables, images, tokens):
        with attn.intervene(*rules):
            logits, cache = run_with_cache(
                model, variables, images, tokens, names=("attention_weights",), layers=[path]
            )
        return logits, cache[path]["attention_weights"]

    logits, weights = run(variables, images, tokens)
    return np.asarray(logits), np.asarray(weights, np.float64)


def logits_under(model, variables, *rule_sets):
    """The logits float32 [B, T, V] under each rule set, all in one jitted call (one compile): a list."""

    @jax.jit
    def run(variables):
        out = []
        for rules in rule_sets:
            with attn.intervene(*rules):
                out.append(model.apply(variables, IMAGES, TOKENS))
        return out

    return [np.asarray(x) for x in run(variables)]


def prefix_map(seed, t=N + T, n=N, boost=None):
    """A prefix-LM softmax map [1, 2, t, t] (keys < n visible to all queries, the rest causal); `boost` adds 3 to
    the logits of key `boost` in head 0."""
    logits = np.asarray(jax.random.normal(jax.random.key(seed), (1, 2, t, t)), np.float64)
    if boost is not None:
        logits[0, 0, :, boost] += 3.0
    allowed = np.tril(np.ones((t, t), bool)) | (np.arange(t)[None, :] < n)
    logits = np.where(allowed, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True)
