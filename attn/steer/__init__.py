"""Inference-time steering and calibration of attention, built on `attn.interventions` (no parameter changes):

    pasta       PASTA (Zhang et al. 2023): scale attention to the non-emphasised prompt tokens by alpha in chosen heads
    autopasta   [161] AutoPASTA: the model names the key sentence itself, then PASTA steers toward it
    act         [61] ACT: hidden attention sinks found on the input are scaled down and their mass redistributed
    soft_injection  [58] task embeddings (mean head outputs of task prompts) mixed into the last token's heads

Each system's `rules(...)` returns rules for `attn.intervene`; `STEERERS[name]` records its paper, fidelity and
exact no-op setting. `python -m eval.steer` measures their effects on a decoder trained on the emphasis_qa task.

    steer = Pasta(head_config={1: [0, 2]}, alpha=0.01)
    with attn.intervene(*steer.rules(model, spans=[(4, 8), (12, 16)], seq_len=26)):
        logits = model.apply(variables, tokens)
"""

from attn.steer.act import Act
from attn.steer.autopasta import AutoPasta
from attn.steer.pasta import Pasta
from attn.steer.registry import STEERERS, SteererSpec, register
from attn.steer.soft_injection import SoftInjection

__all__ = ["STEERERS", "Act", "AutoPasta", "Pasta", "SoftInjection", "SteererSpec", "register"]
