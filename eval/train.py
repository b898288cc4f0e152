"""`python -m eval.train --config configs/x.py[:preset] --workdir runs/x [--config.a.b=value ...]`: a training run with
the analysis tools as its config.evals evaluators.

The training package never imports eval, so `python -m train` refuses a config whose `evals` name a tool (in one line
that names this route). This entry point takes the same --config (file, preset, `--config.<field>=` overrides) and
--workdir, resumes from the workdir's latest checkpoint like `python -m train`, and trains through the run API
(`train.run.train`) with `eval.analysis.cadence_evaluators()`: every config.evals entry {tool, every, options,
batch_size, num_batches} runs at its cadence, results appended to <workdir>/evals.jsonl and scalars logged as
evals/<tool>/<name>. Config and run errors end in one line (exit status 1). SIGTERM behaves as under `python -m train`:
the trainer's PreemptionGuard (train/preemption.py) is installed before absl, the config file and JAX load, so a
SIGTERM during training finishes the step, saves a checkpoint and exits 0 (during start-up or compilation: exits 0
having saved nothing); rerunning the same command resumes. Example:

    python -m eval.train --config configs/lm_tiny.py:smoke --workdir /tmp/lm_evals --config.total_steps=4 \\
        "--config.evals=({'tool': 'sink_rate', 'every': 2},)"
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib import import_module

from . import TRAIN_PACKAGE

# train.preemption imports no JAX; train/run.py (eval's way to the trainer) would load it, too late for a signal.
_GUARD = import_module(f"{TRAIN_PACKAGE}.preemption").PreemptionGuard()
if __name__ == "__main__":
    # Installed before absl, the config file and JAX load: a SIGTERM at any point of start-up only sets a flag.
    _GUARD.__enter__()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a preset: configs/lm_tiny.py or configs/lm_tiny.py:smoke."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, TensorBoard events, evals.jsonl.")
flags.mark_flags_as_required(["config", "workdir"])


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing; a bad flag, config file or override ends in one line."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        sys.exit(f"error: {lines[-1] if lines else error}")


def main(argv: Sequence[str]) -> None:
    """Trains --config in --workdir with the cadence evaluators (see the module docstring)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from .analysis import cadence_evaluators
    from .trainer_api import RUN_ERRORS, train

    try:
        config = _CONFIG.value
        config.keys()  # config_flags defers a config-file load failure to the first access
        # The guard is entered only when this module runs as the program; otherwise trainer.run installs its own.
        guard = _GUARD if __name__ == "__main__" else None
        result = train(config, _WORKDIR.value, evaluators=cadence_evaluators(), guard=guard)
    except (*RUN_ERRORS, ValueError, OSError) as error:
        sys.exit(f"error: {str(error).strip().splitlines()[-1]}")
    if result.stopped_before_first_step:
        print("stopped before the first step; nothing to save", flush=True)
    elif result.preempted:
        print(f"stopped by SIGTERM at step {result.step}; resume with the same command", flush=True)
    else:
        print(f"done: step {result.step}; checkpoint {result.checkpoint}", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
