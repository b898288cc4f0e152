"""Attention-Gate's training: the kv_retrieval decoder (MQAR recall at 128 tokens) with an Attention-Gate in every
layer (attention "attention_gate"), tuned from the trained softmax run by continual training, as the paper tunes its
gates on a pre-trained LLM.

Objective: the LM loss (on the recalled values, kv_retrieval's task) plus the eviction loss every layer sows,
(mean soft eviction rate - target_rate)^2, weighted by `loss_weights.losses`. The forward is the hard eviction (a
flagged token is seen by its own query only) with straight-through gradients into the gate, so the model learns to
recall through what the gate keeps. The whole model trains (the base LM adapts to its gates); the gates start fresh
(their parameters are not in the kv_retrieval run; `init_from` loads the others).

    python -m train --config configs/kv_retrieval.py --workdir runs/kv_retrieval          # the base model, first
    python -m train --config configs/kv_attention_gate.py --workdir runs/kv_attention_gate
    python -m eval.kv --workdir runs/kv_attention_gate --policies attention_gate --budgets 0.5,0.2,0.1 --rows 16 \
        --prompt 16 --output benchmarks/results/kv_attention_gate_cpu.json

Hardware: CPU (2 cores); a step costs about a kv_retrieval step plus one small T x T attention per layer for the gate.
Measured (2 cores shared with other jobs; from kv_retrieval's 1400-step run, recall accuracy 0.309): the full 300
steps in about 4 minutes wall (0.35-1.1 s/step); eval recall accuracy 0.329, loss 1.628 at step 300 (the base model
keeps learning while the gates train). eval.kv on 16 sequences (benchmarks/results/kv_attention_gate_cpu.json):
accuracy 0.375 with no cap, 0.352 / 0.328 / 0.273 at budgets 0.5 / 0.2 / 0.1, holding 0.60 / 0.36 / 0.28 of the
full cache's bytes.

Presets (`--config configs/kv_attention_gate.py:<preset>`):
  smoke  a few steps of kv_retrieval's toy model at 64 tokens, freshly initialised (tests).
"""

from __future__ import annotations

from ml_collections import ConfigDict

from configs import common, kv_retrieval

PRESETS = ("", "smoke")


def get_config(arg: str | None = None) -> ConfigDict:
    """The kv_attention_gate config: kv_retrieval (or its smoke preset) with Attention-Gates in every layer."""
    preset = common.check_preset("kv_attention_gate", arg, PRESETS)
    config = kv_retrieval.get_config(preset or None)
    config.total_steps = 300  # continual training: half the base run
    config.optimizer.warmup_steps = 30  # 10% of the run
    config.optimizer.learning_rate = 1e-3  # below the base run's 5e-3: the LM is tuned, the gates learn
    model = config.model
    model.attention = "attention_gate"
    # attn.build options of "attention_gate": half of the context as the decode budget, a one-head gate of width 16,
    # and the eviction loss pulling towards half of the tokens evicted
    budget = config.seq_len // 2
    model.attention_options = ConfigDict({"budget": budget, "gate_heads": 1, "gate_dim": 16, "target_rate": 0.5})
    config.loss_weights.losses = 1.0  # the sown eviction losses, summed over layers, join the LM loss as they are
    config.init_from = "runs/kv_retrieval"  # the trained softmax decoder; the gates keep their fresh init
    if preset == "smoke":
        config.total_steps = 3
        model.attention_options.gate_dim = 8
        config.optimizer.warmup_steps = 1
        config.init_from = ""  # a fresh model (no kv_retrieval run needed)
    return config
