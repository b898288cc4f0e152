"""Command line: `python -m train --config configs/x.py[:preset] --workdir runs/x [--config.a.b=value ...]`.

Rerunning the same command resumes from the newest checkpoint in the workdir that verifies. Config problems,
divergence (nan/inf loss), checkpoint/config mismatches, a workdir another run holds, damaged checkpoints and a
checkpoint that cannot be written exit non-zero with a one-line message; SIGTERM saves a checkpoint and exits 0
(during start-up or compilation: exits 0 having saved nothing).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from .preemption import PreemptionGuard

_GUARD = PreemptionGuard()
if __name__ == "__main__":
    # Installed before absl, the config file and JAX load: a SIGTERM at any point of start-up only sets a flag.
    _GUARD.__enter__()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a preset: configs/lm_tiny.py or configs/lm_tiny.py:smoke."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, TensorBoard events, metrics.jsonl.")
flags.mark_flags_as_required(["config", "workdir"])


def _load_config_file(argv: Sequence[str]):
    """The config named by --config, without overrides (for explaining a bad override); None if absent."""
    from .config_file import load_config_file

    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        else:
            continue
        return load_config_file(value)
    return None


def _explain_bad_override(argv: Sequence[str]) -> str | None:
    """A one-line message for the first `--config.<field>=...` override that names no config field."""
    from .config_checks import unknown_override_message

    try:
        config = _load_config_file(argv)
    except Exception:  # noqa: BLE001 - the original parse error is reported instead
        return None
    if config is None:
        return None
    for arg in argv:
        if arg.startswith("--config."):
            dotted = arg.removeprefix("--config.").split("=", 1)[0]
            message = unknown_override_message(config, dotted)
            if message:
                return message
    return None


def _one_line(message: str) -> str:
    """A flag error in one line: config_flags embeds the config file's traceback; keep its last line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback" in message:
        return f"--config: {lines[-1]}"
    return lines[0] if lines else message


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, but config mistakes end in one line instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as error:  # config_flags refusing an unknown --config.x override
        sys.exit(f"error: {_explain_bad_override(argv) or error}")
    except flags.Error as error:
        sys.exit(f"error: {_one_line(str(error))}")
    except (ValueError, TypeError, OSError) as error:  # the config file itself (e.g. an unknown preset)
        sys.exit(f"error: --config: {error}")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; --verbosity=0 brings it back
        # A failed save is reported in one line (CheckpointSaveError); orbax's own tracebacks of it are noise.
        logging.get_absl_logger().addFilter(_drop_orbax_errors)
    # Imported here so `--help` and flag errors do not wait for JAX.
    from . import trainer

    try:
        config = _CONFIG.value
        config.keys()  # config_flags defers a config-file load failure to the first access
    except OSError as error:
        sys.exit(f"error: --config: {str(error).strip().splitlines()[-1].strip()}")
    try:
        result = trainer.run(config, _WORKDIR.value, guard=_GUARD)
    except trainer.RUN_ERRORS as error:
        _exit_now(f"error: {error}")
    except OSError as error:  # e.g. metrics.jsonl on a full disk
        _exit_now(f"error: {error}")
    if result.stopped_before_first_step:
        print("stopped before the first step; nothing to save", flush=True)
    elif result.preempted:
        print(f"stopped by SIGTERM at step {result.step}; resume with the same command", flush=True)
    else:
        print(f"done: step {result.step}; checkpoint {result.checkpoint}", flush=True)


def _drop_orbax_errors(record) -> bool:
    """Logging filter: False for orbax's error records (their exceptions reach `main` and are reported)."""
    return not (record.levelno >= 40 and f"{os.sep}orbax{os.sep}" in record.pathname)


def _exit_now(message: str) -> None:
    """Prints `message` to stderr and exits 1 at once. After a failed save, orbax's background threads can wait
    minutes for a directory that will never appear and print tracebacks at interpreter shutdown; the run has
    already closed its writers and checkpointer, so nothing is left to wait for."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
