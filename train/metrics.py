"""Metric output: TensorBoard event files (tensorboardX, no TensorFlow), a JSON-lines copy, console progress.

Layout under ``workdir``::

    tensorboard/events.out.tfevents.*   scalars and text, for ``tensorboard --logdir workdir/tensorboard``
    metrics.jsonl                       one line per ``scalars`` call: {"step": 120, "loss": 2.31, ...}

Only the primary process (``jax.process_index() == 0``) writes; the others get a writer that does
nothing, so the training loop calls it unconditionally.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

TENSORBOARD_DIR = "tensorboard"
METRICS_FILE = "metrics.jsonl"
_TEXT_SUFFIX = "/text_summary"  # tensorboardX appends this to text tags


def _to_float(name: str, value: Any) -> float:
    try:
        return float(np.asarray(value))
    except (TypeError, ValueError) as err:
        raise ValueError(f"scalar {name!r} has value {value!r}; expected a number or a 0-d array") from err


class MetricWriter:
    """Writes scalars and text to TensorBoard and ``metrics.jsonl`` (primary process only).

    Args:
      workdir: run directory; ``tensorboard/`` and ``metrics.jsonl`` are created inside it.
      is_primary: whether this process writes (default: ``jax.process_index() == 0``).
      purge_step: drop previously logged events with step >= purge_step from both TensorBoard and
        ``metrics.jsonl``: on resume the step after the restored checkpoint (those steps are logged again),
        0 when a run starts from scratch in a workdir that already has metrics.
      flush_secs: how often the TensorBoard writer flushes on its own.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        is_primary: bool | None = None,
        purge_step: int | None = None,
        flush_secs: int = 30,
    ) -> None:
        self.workdir = os.fspath(workdir)
        self.is_primary = jax.process_index() == 0 if is_primary is None else bool(is_primary)
        self._writer = None
        self._jsonl = None
        if not self.is_primary:
            return
        from tensorboardX import SummaryWriter  # imported lazily: non-primary processes never need it

        os.makedirs(self.workdir, exist_ok=True)
        path = os.path.join(self.workdir, METRICS_FILE)
        if purge_step is not None and os.path.exists(path):
            self._truncate_jsonl(path, int(purge_step))
        self._writer = SummaryWriter(
            os.path.join(self.workdir, TENSORBOARD_DIR),
            purge_step=purge_step,
            flush_secs=flush_secs,
            # Event files are named by the second they were created in; a writer reopened within the
            # same second would overwrite the previous file. The suffix keeps names unique and ordered.
            filename_suffix=f".{time.time_ns():020d}",
        )
        self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    @staticmethod
    def _truncate_jsonl(path: str, purge_step: int) -> None:
        """Keeps the rows of steps < purge_step; a row cut short by a crash (not JSON) is dropped too."""
        kept = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and row.get("step", -1) < purge_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """Logs ``{name: number}`` at ``step`` (jax/numpy scalars are converted; NaN/inf are kept)."""
        if not self.is_primary:
            return
        if "step" in values:
            raise ValueError("values has a metric named 'step', which is reserved for the step in metrics.jsonl")
        step = int(step)
        floats = {name: _to_float(name, value) for name, value in values.items()}
        for name, value in floats.items():
            self._writer.add_scalar(name, value, global_step=step)
        self._jsonl.write(json.dumps({"step": step, **floats}) + "\n")
        self._jsonl.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        """Logs a text (markdown) summary, e.g. the run config at step 0."""
        if not self.is_primary:
            return
        self._writer.add_text(tag, str(text), global_step=int(step))

    def flush(self) -> None:
        if self.is_primary:
            self._writer.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.is_primary and self._writer is not None:
            self._writer.close()
            self._jsonl.close()
            self._writer = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _accumulator(workdir: str | os.PathLike) -> Any:
    from tensorboard.backend.event_processing import event_accumulator

    path = os.path.join(os.fspath(workdir), TENSORBOARD_DIR)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no TensorBoard directory at {path}")
    acc = event_accumulator.EventAccumulator(
        path, size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    return acc


def read_scalars(workdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Scalars of a run from its TensorBoard event files: ``{tag: [(step, value), ...]}`` in write order.

    Values come back as float32-rounded floats (TensorBoard stores float32).
    """
    acc = _accumulator(workdir)
    return {tag: [(int(e.step), float(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_text(workdir: str | os.PathLike) -> dict[str, list[tuple[int, str]]]:
    """Text summaries of a run: ``{tag: [(step, text), ...]}``."""
    acc = _accumulator(workdir)
    out = {}
    for tag in acc.Tags()["tensors"]:
        if tag.endswith(_TEXT_SUFFIX):
            events = acc.Tensors(tag)
            out[tag[: -len(_TEXT_SUFFIX)]] = [
                (int(e.step), e.tensor_proto.string_val[0].decode("utf-8")) for e in events
            ]
    return out


def format_count(value: float) -> str:
    """45200 -> '45.2k', 1.5e6 -> '1.5M', 950 -> '950'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            scaled = value / scale
            return f"{scaled:.3g}{unit}" if scaled < 100 else f"{scaled:.0f}{unit}"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def format_duration(seconds: float) -> str:
    """185 -> '3m05s', 3725 -> '1h02m', 42 -> '42s', 2 days -> '2d00h'; non-finite -> '?'."""
    if not math.isfinite(seconds):
        return "?"
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class ProgressReporter:
    """Console progress line: ``step 120/1000 | loss 2.314 | 45.2k tok/s | 0.21 s/step | ETA 3m05s``.

    Speed is measured between consecutive ``update`` calls (so the first call after a start or resume,
    which includes compilation, only sets the baseline unless ``start`` was called before the loop).

    Args:
      total_steps: the last step of the run.
      tokens_per_step: tokens (or examples) per step, for the throughput.
      start_step: the step the run starts or resumes from.
      clock: seconds since an arbitrary origin (injectable for tests).
    """

    def __init__(
        self,
        total_steps: int,
        tokens_per_step: int,
        *,
        start_step: int = 0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.total_steps = int(total_steps)
        self.tokens_per_step = int(tokens_per_step)
        self._clock = clock
        self._last_step = int(start_step)
        self._last_time = clock()
        self.seconds_per_step = math.nan
        self.tokens_per_second = math.nan

    def start(self, step: int) -> None:
        """Resets the baseline to ``step`` now (e.g. after the first, compiling, step)."""
        self._last_step, self._last_time = int(step), self._clock()

    def update(self, step: int, loss: float, extra: Mapping[str, float] | None = None) -> str:
        """Records that ``step`` finished with ``loss`` and returns the progress line."""
        step, now = int(step), self._clock()
        if step > self._last_step:
            self.seconds_per_step = (now - self._last_time) / (step - self._last_step)
            self.tokens_per_second = (
                self.tokens_per_step / self.seconds_per_step if self.seconds_per_step > 0 else math.inf
            )
        self._last_step, self._last_time = step, now
        eta = (self.total_steps - step) * self.seconds_per_step
        parts = [f"step {step}/{self.total_steps}", f"loss {float(loss):.3f}"]
        if math.isnan(self.seconds_per_step):
            parts += ["? tok/s", "? s/step"]
        else:
            parts += [f"{format_count(self.tokens_per_second)} tok/s", f"{self.seconds_per_step:.2f} s/step"]
        parts += [f"{name} {float(value):.4g}" for name, value in (extra or {}).items()]
        parts.append(f"ETA {format_duration(eta)}")
        return " | ".join(parts)
