"""SeerAttention's gate training by self-distillation on the byte-level decoder LM (attention "seer", distill=True).

Every layer runs dense causal softmax attention (the teacher's output, as the official training forward) and sows
"losses"/"seer_gate": KL(2-D max-pooled attention map || gate block distribution) per query block, the gate's inputs
and the target under stop_gradient. The gate's parameters (gate_query, gate_key) therefore learn from that loss
only, and the rest of the model never receives a gradient from the gate: for the model's weights the run is the
dense-softmax LM, for the gate it is the paper's self-distillation against the (frozen, as far as the gate is
concerned) attention of the model. The official recipe starts from a pretrained LLM and freezes its weights; the
trainer here has no frozen-parameter option, so this config trains the base LM and its gates together from scratch.

    python -m train --config configs/seer_gate.py --workdir runs/seer_gate
    # the sparse model: the same parameters with the gate selecting blocks (top 4 of 8 blocks per query block)
    python -m eval.lm --workdir runs/seer_gate --config.model.attention_options.distill=False

Hardware: CPU (2 cores). 128-byte sequences in 8 blocks of 16; the gate adds one dense T x T softmax per layer for
its target, so a step costs about as much as lm_tiny's plus the max pooling.
Expected result: the full run is not measured yet. The smoke preset (measured, CPU shared with other jobs): 6 steps,
training loss 5.93 -> 4.99, "aux_loss" (the summed seer_gate KL over layers) logged with every step.

Presets (`--config configs/seer_gate.py:<preset>`):
  smoke  a few steps of a 2-layer d_model 32 model (tests, CI).
"""

from __future__ import annotations

from ml_collections import ConfigDict

from configs import lm_tiny

PRESETS = ("", "smoke")


def get_config(arg: str | None = None) -> ConfigDict:
    """The seer_gate config: lm_tiny (or its smoke preset) with SeerAttention in distillation mode."""
    config = lm_tiny.get_config(arg)
    model = config.model
    model.attention = "seer"  # SeerAttention in every layer
    # attn.build options of "seer": 8 blocks of 16 in a 128-byte sequence, a 32-wide gate, the top 4 blocks per query
    # block when distill=False (half of them), and distill=True: dense output + the gate's self-distillation loss
    model.attention_options = ConfigDict({"block_size": 16, "gate_dim": 32, "top_k": 4, "distill": True})
    if arg == "smoke":
        model.attention_options.block_size = 8  # 4 blocks of the smoke preset's 32 bytes
        model.attention_options.gate_dim = 8  # a gate as narrow as the smoke model's heads
        model.attention_options.top_k = 2  # half of the 4 blocks
    return config
