"""attn: every attention mechanism of the seed papers in JAX.

import attn
attn.list_mechanisms()                       # registry names
spec = attn.get("softmax")                   # MechanismSpec: family, paper, options, ...
layer = attn.build("softmax", num_heads=8, head_dim=64, position="rope")
y = layer.apply(params, x, mask=attn.Mask(causal=True))
from attn import functional as F             # pure functions: F.softmax_attention(q, k, v, causal=True)
with attn.intervene(attn.interventions.ablate_heads(layers=[1], heads=[0])):   # inference-time interventions
    y = model.apply(variables, tokens)
"""

from attn import functional, interventions
from attn.core.masks import Mask
from attn.interventions import intervene
from attn.registry import MechanismSpec, build, feature_table, get, list_mechanisms

__version__ = "0.1.0"

__all__ = [
    "Mask",
    "MechanismSpec",
    "build",
    "feature_table",
    "functional",
    "get",
    "intervene",
    "interventions",
    "list_mechanisms",
]
