"""The trainer's run API for eval: train/run.py, the one module of train/ that eval uses (DESIGN.md, layout).

From a checkout the two packages are `train` and `eval` (`python -m train`, `python -m eval.lm`); installed, they are
`attn_train` and `attn_eval` (setup.py), names that a user's own `train.py` or `eval/` can never shadow. Inside both
packages every import is relative, and this module finds train/run.py under the name its sibling was imported with,
so every module of eval imports the run API as `from .trainer_api import load_run` (`from ..trainer_api` below
eval/).
"""

from __future__ import annotations

from importlib import import_module

from . import TRAIN_PACKAGE

run = import_module(f"{TRAIN_PACKAGE}.run")  # train.run, or attn_train.run when installed

METRICS_FILE = run.METRICS_FILE
RUN_ERRORS = run.RUN_ERRORS
CheckpointDamaged = run.CheckpointDamaged
Run = run.Run
TrainResult = run.TrainResult
TrainingDiverged = run.TrainingDiverged
build_run = run.build_run
corpus_text = run.corpus_text
load_config_file = run.load_config_file
load_run = run.load_run
make_optimizer = run.make_optimizer
make_source = run.make_source
source_class = run.source_class
train = run.train
unknown_override_message = run.unknown_override_message

__all__ = list(run.__all__)
