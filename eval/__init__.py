"""Evaluation tools of attn: `python -m eval.<tool>` from a checkout, `attn-eval <tool>` or `attn_eval` installed.

The package is `eval` in a checkout and `attn_eval` when installed (setup.py); the trainer beside it is `train` or
`attn_train` accordingly, and TRAIN_PACKAGE names it.
"""

TRAIN_PACKAGE = __name__[: -len("eval")] + "train"
