"""Backend selection for attention ops: one place that decides between XLA, cuDNN and Pallas kernels.

`implementation=None` picks the fastest available backend and logs the reason once at debug level;
"xla" forces the jnp reference; "pallas" forces a Pallas kernel and raises where the platform has none.
"""

from __future__ import annotations

import functools
import logging

import jax

logger = logging.getLogger("attn")

# "split_kv": split-KV decoding of a decode call against a KV cache (attn.core.kv_cache.decode_attention)
IMPLEMENTATIONS = (None, "xla", "pallas", "cudnn", "split_kv")


def platform() -> str:
    return jax.devices()[0].platform


@functools.cache
def log_choice_once(op: str, choice: str, reason: str) -> None:
    logger.debug("%s: using the %s implementation (%s)", op, choice, reason)


def select(op: str, requested: str | None, available: dict[str, str | None]) -> str:
    """Chooses a backend for `op`.

    Args:
      requested: None, "xla", "pallas" or "cudnn".
      available: backend -> None if usable here, else the reason it is not (in the preference order).
    """
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={requested!r} is not supported; expected one of {IMPLEMENTATIONS}")
    if requested is not None:
        reason = available.get(requested, f"{op} has no {requested} implementation")
        if reason is not None:
            raise ValueError(f"implementation={requested!r} is not available for {op}: {reason}")
        log_choice_once(op, requested, "requested")
        return requested
    skipped = []
    for backend, reason in available.items():
        if reason is None:
            log_choice_once(op, backend, "fastest available" + (f"; skipped {'; '.join(skipped)}" if skipped else ""))
            return backend
        skipped.append(f"{backend}: {reason}")
    raise ValueError(f"no implementation of {op} is available here: {'; '.join(skipped)}")
