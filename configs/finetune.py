"""Fine-tuning a Hugging Face decoder checkpoint on the local text corpus, optionally with swapped attention, frozen
parameters, or Hedgehog linearisation ([217]).

The model fields come from the checkpoint's config.json (attn.pretrained's translation), the trainer starts from its
weights (config.init_from) and the data is the default text corpus (Python standard library sources) tokenised with
the checkpoint's tokenizer.json (train.data "tokenized_text"; the "text" bytes when the directory has no tokenizer).
The default checkpoint is the tiny Llama fixture tests/fixtures/hf/llama (2 layers, d_model 48, GQA 4/2, RoPE,
vocabulary 320), so every preset runs offline.

    python -m train --config configs/finetune.py --workdir runs/finetune
    python -m train --config configs/finetune.py:hedgehog --workdir runs/hedgehog
    python -m train --config configs/finetune.py:hedgehog,path=/models/my-llama --workdir runs/hedgehog_llama

The argument is a comma-separated list: at most one preset, optionally "smoke", optionally path=<model directory>.
Presets:
  (none)    full fine-tuning of every parameter (save_hf=True: the result is also written to <workdir>/hf).
  swap      the upper half of the layers swapped to "hedgehog" linear attention (their feature maps start at the
            identity init, listed once by the trainer); every parameter trains.
  hedgehog  Hedgehog linearisation: every layer's attention becomes "hedgehog" with distill=True, so each layer sows
            KL(softmax teacher weights || Hedgehog weights) of its own (stop-gradient) q and k — the paper's attention
            cross-entropy less the teacher's entropy, the same gradients — summed over layers into the objective
            (logged as "aux_loss"); only the feature maps train (trainable=("feature_map",)). The trainer's
            objective keeps the LM loss (the paper's first stage uses the distillation loss alone), weighted 1
            against loss_weights.losses=10 for the distillation.
  smoke     (a modifier) a few steps of short sequences on 64 KiB of tokenised text, for tests and CI.

Hardware: CPU (2 cores). Expected runtime and results (measured on the default fixture, CPU shared with other jobs):
  (none)    300 steps in 1.6 minutes including compilation and tokenising; the fixture's random weights start at
            validation loss 6.10 nats/token (above ln 320 = 5.77) and reach 4.34 at step 300 (perplexity 77).
  hedgehog  300 steps in about 1.5 minutes; validation loss: softmax teacher 6.099, Hedgehog with identity feature
            maps 6.121 (gap +0.021), after 300 steps 6.104 (gap +0.004); distillation loss (2 layers summed) 0.519 ->
            0.306. On a decoder trained here (lm_tiny at 2 layers, d_model 64) the gap goes from +1.116 to +0.194
            nats/byte in 200 steps (the README's fine-tuning section has the script).
  smoke     compiles and runs in well under a minute.
"""

from __future__ import annotations

import os

from ml_collections import ConfigDict

from attn.pretrained import architecture_of, read_config
from configs import common

PRESETS = ("", "swap", "hedgehog")
DEFAULT_CHECKPOINT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests/fixtures/hf/llama"
)
# Model fields the trainer sets itself (dtypes from precision.compute_dtype) or that are no dataclass settings.
_NOT_CONFIG = ("parent", "name", "dtype", "param_dtype")


def parse_arg(arg: str | None) -> tuple[str, bool, str]:
    """(preset, smoke, checkpoint directory) from "<preset>[,smoke][,path=<dir>]" (any order)."""
    preset, smoke, path = "", False, DEFAULT_CHECKPOINT
    for part in (arg or "").split(","):
        part = part.strip()
        if part.startswith("path="):
            path = part[len("path=") :]
        elif part == "smoke":
            smoke = True
        elif part:
            if preset:
                raise ValueError(f"configs/finetune.py:{arg} names two presets ({preset!r}, {part!r}); give one")
            preset = common.check_preset("finetune", part, PRESETS)
    return preset, smoke, path


def model_fields_of(path: str) -> dict:
    """The attn.models fields of the checkpoint at `path` (from its config.json, no weights read)."""
    hf_config = read_config(path)
    model = architecture_of(hf_config).build_model(hf_config, "float32")
    fields = {name: getattr(model, name) for name in model.__dataclass_fields__ if name not in _NOT_CONFIG}
    return {"kind": "decoder", **fields}


def get_config(arg: str | None = None) -> ConfigDict:
    """The finetune config; `arg` as `parse_arg` reads it (see the module docstring)."""
    preset, smoke, path = parse_arg(arg)
    config = common.base_config()
    config.init_from = path  # the checkpoint's weights, unless the workdir already has a checkpoint
    config.save_hf = preset == ""  # only an unswapped model can be written back in the checkpoint's architecture
    config.total_steps = 300  # a short fine-tuning run
    config.batch_size = 16  # 16 x 64 = 1024 tokens per step
    config.seq_len = 64  # tokens per example (the fixture's max_position_embeddings is 64)
    config.log_every = 25  # train-metric logs
    config.eval_every = 100  # three evaluations
    config.checkpoint_every = 100  # a restart loses at most 100 steps
    config.keep_checkpoints = 2  # the latest two

    fields = model_fields_of(path)
    layers = fields["num_layers"]
    if preset == "swap":  # the upper half of the stack becomes Hedgehog linear attention
        fields["attention"] = ["softmax"] * (layers - layers // 2) + ["hedgehog"] * (layers // 2)
    if preset == "hedgehog":  # every layer linear; q/k/v/out come from the checkpoint
        fields["attention"] = "hedgehog"
        # sow the per-layer attention-distillation loss against the softmax weights of the same q, k
        fields["attention_options"] = {**fields["attention_options"], "distill": True}
    config.model = ConfigDict(fields)  # the checkpoint's model (the trainer refuses any difference but attention)
    model = config.model
    model.dropout_rate = 0.0  # no dropout while fine-tuning a tiny model
    has_tokenizer = os.path.isfile(os.path.join(path, "tokenizer.json"))
    config.data.name = "tokenized_text" if has_tokenizer else "text"  # the checkpoint's tokens, else bytes
    config.data.path = None  # None = the Python standard library sources
    if has_tokenizer:
        config.data.tokenizer = path  # the checkpoint's tokenizer.json
        config.data.max_bytes = 1 << 20  # 1 MiB of each split is tokenised (~3 s per MiB)

    config.optimizer.learning_rate = 1e-3  # fine-tuning: lower than lm_tiny's 3e-3
    config.optimizer.warmup_steps = 20  # short warmup from the pretrained weights
    config.optimizer.weight_decay = 0.0  # no pull towards zero away from the checkpoint
    config.eval.num_batches = 16  # 16 x 16 x 64 = 16k validation tokens

    if preset == "hedgehog":
        config.trainable = ("feature_map",)  # query_feature_map / key_feature_map only; the rest stays frozen
        config.loss_weights.losses = 10.0  # the distillation (summed over layers) against the LM loss
        config.optimizer.learning_rate = 1e-2  # only the small identity-initialised feature maps move
    if smoke:
        config.total_steps = 6  # a log, an eval and two checkpoints
        config.batch_size = 8  # divisible by 8 fake CPU devices
        config.seq_len = 16
        config.log_every = 2
        config.eval_every = 3
        config.checkpoint_every = 3
        config.optimizer.warmup_steps = 2
        config.eval.num_batches = 2
        config.eval.stats_batch_size = 2
        if has_tokenizer:
            config.data.max_bytes = 1 << 16  # 64 KiB: tokenised in a fraction of a second
    return config
