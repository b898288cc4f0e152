"""SeerAttention's gate training by self-distillation on the byte-level decoder LM (attention "seer", distill=True).

Every layer runs dense causal softmax attention (the teacher's output, as the official training forward) and sows
"losses"/"seer_gate": KL(2-D max-pooled attention map || gate block distribution) per query block, the gate's inputs
and the target under stop_gradient. The gate's parameters (gate_query, gate_key) therefore learn from that loss
only, and the rest of the model never receives a gradient from the gate: for the model's weights the run is the
dense-softmax LM, for the gate it is the paper's self-distillation against the (frozen, as far as the gate is
concerned) attention of the model. As in the official recipe, the base model is a trained LM whose weights stay
frozen: the run starts from the lm_tiny run's parameters (config.init_from; the gates keep their fresh init) and only
the gate parameters train (config.trainable). The smoke preset trains the gates of a freshly initialised model.

    python -m train --config configs/lm_tiny.py --workdir runs/lm_tiny          # the base LM, first
    python -m train --config configs/seer_gate.py --workdir runs/seer_gate
    # the sparse model: the same parameters with the gate selecting blocks (top 4 of 8 blocks per query block)
    python -m eval.lm --workdir runs/seer_gate --config.model.attention_options.distill=False

Hardware: CPU (2 cores). 128-byte sequences in 8 blocks of 16; the gate adds one dense T x T softmax per layer for
its target, so a step costs about as much as lm_tiny's plus the max pooling.
Expected result: the full run is not measured yet. The smoke preset (measured, CPU shared with other jobs): 6 steps,
only the gates train, so the LM is unchanged (validation loss 5.82 at steps 3 and 6); "aux_loss" (the summed
seer_gate KL over layers) is logged with every step (0.116, 0.141, 0.137 at steps 2, 4, 6: 6 steps at the warmup's
low rates do not move it yet).

Presets (`--config configs/seer_gate.py:<preset>`):
  smoke  a few steps of a 2-layer d_model 32 model, freshly initialised, training only its gates (tests, CI).
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
    config.init_from = "runs/lm_tiny"  # the trained base LM (its query/key/value/out are the layers' own)
    config.trainable = ("gate_query", "gate_key")  # only the gates learn; the base LM stays frozen
    if arg == "smoke":
        model.attention_options.block_size = 8  # 4 blocks of the smoke preset's 32 bytes
        model.attention_options.gate_dim = 8  # a gate as narrow as the smoke model's heads
        model.attention_options.top_k = 2  # half of the 4 blocks
        config.init_from = ""  # a fresh base model (no lm_tiny run needed)
    return config
