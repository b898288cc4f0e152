"""A small byte-level decoder at a long context, trained on text with hidden passkeys: the model on which
`eval.sparse_quality` swaps in every dynamic sparse system of attn.sparse (quality against density, benchmark 3).

Trains a 2-layer, d_model 128 causal transformer (softmax attention with RoPE, 4 heads of 32) on the bytes of the
Python standard library (train.data "text_passkey": every training row carries a 5-digit passkey at a uniformly
random depth in the 1024 bytes, asked for at the end of the row; the validation split is held-out text):

    python -m train --config configs/sparse_long.py --workdir runs/sparse_long
    python -m eval.sparse_quality --workdir runs/sparse_long --num-batches 2 --passkey-rows 8 --repeats 2

Levers meant to make this model retrieve the passkey on a CPU budget (the needle stays anywhere in the full 1024-byte
context, with the text around it): the five answer digits of each training row weigh `passkey_weight` = 32 in the
loss (otherwise 5 of 1024 targets: 0.5%; with 32 they are ~14% of a step's loss), every training row has a passkey
(passkey_rate 1, was 0.5), and more steps. An earlier run of 221 steps with neither lever (passkey_rate 0.5, weight 1)
did not retrieve it: 0 of 8 keys, digits at chance, eval loss 2.049 nats/byte at step 200.

Hardware: CPU (2 cores shared with other jobs). Context length SEQ_LEN bytes (see the constant's comment for the
choice between 2048 and 1024); a step of 4 rows takes 0.86 CPU-s on a quiet machine, 5-9 s of wall time on the 2
cores shared by five jobs (load 8-14).
Expected: passkey retrieval well above chance (digits at chance are 0.1) once the model has formed its copying
(induction) heads; not reached by the default run, reached for the first digit only by the curriculum below.
Measured (the run above, stopped with SIGTERM at step 281 for lack of CPU time): eval loss 2.159 nats/byte at step
200; passkey on 16 held-out rows (depths 0..1, teacher-forced digits) still at chance: step 150 0/16 keys, digits
0.075, digit NLL 2.39 nats; step 250 0/16 keys, digits 0.100, digit NLL 2.33 (chance 2.30). Resume it with the same
command (add --config.total_steps=N --config.allow_changes=total_steps to train longer).

Curriculum (measured 2026-12-07; the model eval.sparse_quality is meant to read: runs/sparse_long_c1024):

    python -m train --config configs/sparse_long.py:curriculum_short --workdir runs/sparse_long_c256
    python -m train --config configs/sparse_long.py:curriculum --workdir runs/sparse_long_c1024
    python -m eval.sparse_quality --workdir runs/sparse_long_c1024 --num-batches 2 --passkey-rows 8 --repeats 2

Why the default run learns nothing about the passkey (probe: the eval's passkey rows, eval.sparse_quality.passkey_rows,
16 held-out rows at depths 0..1, answer digits teacher-forced, scored per digit; also the NLL of the key's second copy
inside the needle, " Remember it. 48213", a copy from only 18 bytes back): at step 281 the answer digits' NLL is
2.21/2.25/2.28/2.37/2.44 (chance ln 10 = 2.30) and the needle's own repeated key is at chance too (2.35): no copying
circuit has formed at all, not even over 18 bytes. With 4 rows of 1024 bytes a step there are 20 answer digits per
step and the attention to a needle ~500 bytes back starts at ~1/1000 of a row, so the gradient toward copying is weak.
Curriculum (levers, stated honestly): (1) curriculum_short continues the default run's parameters (step 281, fresh
optimizer, lr 3e-3, warmup 40) on 256-byte rows, 16 a step (same 4096 bytes; the needle uniformly anywhere in the
first 152 bytes, so within ~200 bytes of the query; 80 answer digits a step, ~40% of the weighted loss); (2)
curriculum continues that at the full 1024 bytes, 4 rows a step, the needle uniformly anywhere in the row (RoPE has to
see the long distances: the 256-byte model alone does not transfer, see below). Same model (2 layers, d_model 128).
Measured with the probe (depths 0..1; digit accuracy per position of the key; chance 0.1 and NLL 2.30):
  curriculum_short at 256 bytes: step 200 digit NLL 2.20 (digits 3-5 at 0.25-0.31, digit 1 0.06); step 400 2.14;
    step 600 1.95; step 800 1.77 (digit 1 0.53); step 900 1.53 (digit 1 0.97, NLL 0.17; digits 2-5 0.25-0.38); 0/32
    keys. Stopped with SIGTERM at step 981 (CPU time). The same step-900 model on 1024-byte rows: digit NLL 2.95,
    worse than chance (digit 1 NLL 3.88, 0.0): no length transfer, the needle's own repeated key fails too (3.19).
  curriculum at 1024 bytes: step 200 digit NLL 2.15 (digit 1 0.50); step 300 1.96 (digit 1 0.69, NLL 1.03); step
    400 1.99 (digit 1 0.69, NLL 0.95; digits 2-5 at chance 0.0-0.19); step 500 2.01 (digit 1 0.69), eval loss
    1.529 nats/byte (the default run: 2.159 at step 200); step 600 1.92 (digit 1 0.81, NLL 0.75). Stopped with
    SIGTERM at step 621 to leave CPU time for the grid: digit NLL 0.59/2.53/2.27/2.21/2.01, digit accuracy
    0.875/0.0/0.19/0.31/0.19, 0/16 keys. So the first digit is retrieved from anywhere in the 1024 bytes (14 of 16
    rows, depths 0..1) and the other four are not (they need a copy keyed on the previous digit, which formed only
    partly at 256 bytes); key accuracy stays 0. More steps of either stage are the next lever (not tried: a 3-4 layer
    model, the token-level passkey task mixed in).
  The grid on step 621 (the eval command above, 8 rows): dense first digit 0.875 (digit NLL 1.954), the static window
    0.50 / 0.375 / 0.125 at 50 / 25 / 10% with its loss at dense (1.495-1.500 vs 1.494); top_m keeps 0.875 / 0.875 /
    0.75 (benchmarks/results/sparse_quality_cpu.json). seer_gate on it (--config.init_from=runs/sparse_long_c1024,
    workdir runs/sparse_long_c1024_seer, 200 steps, ~2 s a step at load 4; eval loss 1.494 = the base run's), measured
    with --seer-workdir runs/sparse_long_c1024_seer: first digit 0.875 / 0.875 / 0.25, loss 1.4939 / 1.4957 /
    1.5095 (the window: 1.4947 / 1.4966 / 1.5004).
Stage 3, the 2K context (measured 2026-12-07; the model of the 2K grids, eval.sparse_quality and eval.kv):

    python -m train --config configs/sparse_long.py:curriculum_long --workdir runs/sparse_long_c2048

  curriculum_long continues runs/sparse_long_c1024 (step 621) at 2048 bytes, 2 rows a step (the same 4096 bytes), the
  needle uniformly anywhere in the row; 1000 steps in 24 minutes wall (1.44-1.97 s/step, load 4-6). Probe (16 rows,
  depths 0..1): step 150 first digit 0.625 (digit NLL 2.13); step 450 0.875 (1.99); step 1000 0.938, digits
  0.938/0.125/0.25/0.25/0.31, digit NLL 1.79, 0/16 keys: the first digit is retrieved from anywhere in 2048 bytes, the
  other four are still not. Eval loss 1.382 / 1.147 / 1.125 / 1.067 nats/byte at steps 250 / 500 / 750 / 1000.
Load average 4-10 on the 2 cores (k1's training and the lead's test timing); 1.0-1.2 s a step at 256 x 16 and 1.4-2.8 s
at 1024 x 4 when the load was 4-8, 11-16 s while the test suite ran un-niced.

Presets (`--config configs/sparse_long.py:<preset>`):
  smoke      a few steps of a 2-layer d_model 32 model at 128 bytes (tests, CI).
  curriculum_short  stage 1 of the curriculum above: 256-byte rows, 16 a step, from runs/sparse_long (init_from).
  curriculum        stage 2: the full SEQ_LEN, 4 rows a step, from runs/sparse_long_c256 (init_from).
  curriculum_long   stage 3: 2 x SEQ_LEN = 2048 bytes, 2 rows a step, from runs/sparse_long_c1024 (init_from).
  seer_gate  SeerAttention's gates (blocks of 32, gate_dim 32) trained by self-distillation on the trained default
             run, whose weights stay frozen (config.init_from, config.trainable); then the trained gate is measured
             in the grid as "seer" (on the curriculum model: add --config.init_from=runs/sparse_long_c1024 and pass
             --workdir runs/sparse_long_c1024 to the eval):
                 python -m train --config configs/sparse_long.py:seer_gate --workdir runs/sparse_long_seer
                 python -m eval.sparse_quality --workdir runs/sparse_long --seer-workdir runs/sparse_long_seer
"""

from __future__ import annotations

from ml_collections import ConfigDict, config_dict

from configs import common

PRESETS = ("", "smoke", "seer_gate", "curriculum_short", "curriculum", "curriculum_long")
# 1024, not 2048: a training step of 4 rows measured 2.79 CPU-s at 2048 (10.8 s wall at load 10) and 0.86 CPU-s at
# 1024 (2.6 s wall), both above the ~0.5 s that would fit 2048 into the ~8 minutes of CPU the run may take.
SEQ_LEN = 1024


def get_config(arg: str | None = None) -> ConfigDict:
    """The sparse_long config; `arg` picks a preset (see the module docstring)."""
    preset = common.check_preset("sparse_long", arg, PRESETS)
    config = common.base_config()
    config.total_steps = 400  # optimizer steps (5-6 s each on the shared 2 cores: ~40 minutes)
    config.batch_size = 4  # 4 rows of SEQ_LEN bytes per step
    config.seq_len = SEQ_LEN  # bytes per row
    config.log_every = 20  # steps between train-metric logs
    config.eval_every = 200  # two evaluations
    config.checkpoint_every = 50  # a restart loses at most 50 steps
    config.keep_checkpoints = 1  # the evaluator reads the latest

    model = common.decoder_model(config)
    model.num_layers = 2  # transformer blocks
    model.d_model = 128  # residual width
    model.num_heads = 4  # 32-wide heads
    model.mlp_dim = 384  # SwiGLU hidden width
    model.vocab_size = 256  # bytes

    config.data.name = "text_passkey"  # stdlib bytes, a passkey in passkey_rate of the training rows
    config.data.path = config_dict.placeholder(str)  # None = the Python standard library sources
    config.data.passkey_rate = 1.0  # share of training rows with a passkey
    config.data.num_digits = 5  # digits of a passkey
    config.data.passkey_weight = 32.0  # loss weight of each answer digit (the retrieval lever; 1 = plain LM)

    config.optimizer.learning_rate = 3e-3  # as configs/lm_tiny.py
    config.optimizer.warmup_steps = 40  # 10% of the run
    config.optimizer.weight_decay = 0.1  # AdamW decay on matrices

    config.eval.num_batches = 2  # 2 x 4 x SEQ_LEN validation bytes per evaluation
    config.eval.stats_batch_size = 1  # one row for attention entropy / first-key mass

    if preset == "seer_gate":
        # SeerAttention's AttnGate trained by self-distillation on the trained model (as configs/seer_gate.py does on
        # lm_tiny): dense output, the gates fitted to the 2-D max-pooled attention map, only the gates train
        model.attention = "seer"  # in every layer
        model.attention_options = ConfigDict({"block_size": 32, "gate_dim": 32, "top_k": 8, "distill": True})
        config.init_from = "runs/sparse_long"  # the trained default run (its weights stay frozen)
        config.trainable = ("gate_query", "gate_key")  # only the gates learn
        config.total_steps = 200  # gate steps
        config.optimizer.learning_rate = 1e-3  # the gates only
        config.optimizer.warmup_steps = 20  # 10% of the gate run
        config.eval_every = 100  # two evaluations (dense output: equal to the base run's loss)
    if preset == "curriculum_short":
        # Stage 1 of the curriculum: the default run's LM (runs/sparse_long) continued on 256-byte rows, 16 per step
        # (the same 4096 bytes a step): the needle is at most ~150 bytes from the query, so the copying circuit forms
        config.init_from = "runs/sparse_long"  # the default run's parameters (fresh optimizer)
        config.seq_len = 256  # bytes per row (needle + query take 104)
        config.batch_size = 16  # rows per step
        config.total_steps = 1500  # optimizer steps
        config.checkpoint_every = 100  # probed while it trains
        config.eval_every = 500  # held-out loss at 256 bytes
    if preset == "curriculum":
        # Stage 2: stage 1's parameters continued at the full SEQ_LEN (RoPE has to see the long distances)
        config.init_from = "runs/sparse_long_c256"  # the curriculum_short run
        config.total_steps = 1500  # optimizer steps
        config.checkpoint_every = 100  # probed while it trains
        config.eval_every = 500  # held-out loss
    if preset == "curriculum_long":
        # Stage 3: stage 2's parameters continued at 2048 bytes, 2 rows a step (the same 4096 bytes a step): the
        # 2K context of issue 15's quality benchmark (RoPE has to see distances up to 2048)
        config.init_from = "runs/sparse_long_c1024"  # the curriculum run
        config.seq_len = 2 * SEQ_LEN  # bytes per row
        config.batch_size = 2  # rows per step
        config.total_steps = 1000  # optimizer steps
        config.checkpoint_every = 50  # probed while it trains
        config.eval_every = 250  # held-out loss at 2048 bytes
        config.eval.num_batches = 4  # 4 x 2 x 2048 validation bytes per evaluation
    if preset == "smoke":
        config.total_steps = 2
        config.batch_size = 8  # divisible by the 8 fake CPU devices of the tests
        config.seq_len = 128  # the shortest row that holds a 5-digit needle and query (103 bytes)
        config.log_every = 1
        config.eval_every = 2
        config.checkpoint_every = 2
        model.d_model = 32
        model.num_heads = 2
        model.mlp_dim = 64
        config.optimizer.warmup_steps = 1
        config.eval.num_batches = 1
    return config
