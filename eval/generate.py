"""Sampling text from a trained byte-level language model, printed token by token as it is decoded.

    python -m eval.generate --workdir runs/lm_tiny --prompt "def "
        [--max_new_tokens 200] [--temperature 0.8] [--top_k 40] [--seed 0] [--step N]

Loads the latest (or `--step`) checkpoint of the workdir with the config saved inside it (`train.run.load_run`),
encodes the prompt as UTF-8 bytes, and decodes with the KV cache (`attn.models.generate.generate_stream`: one
prefill call for the prompt, then one cached step per token). `--temperature 0` is greedy. Bytes that do not form
valid UTF-8 print as U+FFFD. Works for decoder runs on the byte-level `text` data source (vocabulary 256).

From Python, the same run as a model and its parameters:

    from train.run import load_run; run = load_run("runs/lm_tiny"); model, params = run.task.model, run.params
"""

from __future__ import annotations

import codecs
import sys
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attn.models.generate import generate_stream
from train.run import Run


def encode(text: str) -> np.ndarray:
    """The byte-level tokens of `text`: int32 [1, len(text.encode('utf-8'))]."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)[None]


def check_run(run: Run, prompt_len: int, max_new_tokens: int) -> None:
    """ValueError (one line) unless `run` is a byte-level decoder that can hold prompt + max_new_tokens tokens."""
    if run.task.kind != "decoder" or run.config.data.name != "text":
        raise ValueError(
            f"eval.generate samples from byte-level decoders (model.kind='decoder', data.name='text'); this run has "
            f"model.kind={run.task.kind!r}, data.name={run.config.data.name!r}"
        )
    model = run.task.model
    total = prompt_len + max_new_tokens
    if getattr(model, "position_embedding", "none") == "learned" and total > model.max_len:
        raise ValueError(
            f"prompt ({prompt_len} bytes) + max_new_tokens={max_new_tokens} = {total} tokens exceed the run's "
            f"learned positions (model.max_len={model.max_len})"
        )


def stream_text(
    run: Run, prompt: str, max_new_tokens: int, *, temperature: float = 0.8, top_k: int | None = 40, seed: int = 0
) -> Iterator[str]:
    """Yields the continuation of `prompt` as text pieces, one per decoded byte (empty while a multi-byte UTF-8
    character is incomplete). Raises ValueError for a run or prompt it cannot sample (see `check_run`)."""
    if not prompt:
        raise ValueError("prompt='' is empty; give at least one character to continue")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    tokens = encode(prompt)
    check_run(run, tokens.shape[1], max_new_tokens)
    rng = jax.random.key(seed)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with run.tracing():
        stream = generate_stream(
            run.task.model,
            run.params,
            jnp.asarray(tokens),
            max_new_tokens,
            temperature=temperature,
            top_k=top_k if temperature > 0 else None,
            rng=rng,
        )
        for token in stream:
            yield decoder.decode(bytes([int(token[0])]))
    yield decoder.decode(b"", final=True)


def main(argv: Sequence[str]) -> None:
    """Entry point of `python -m eval.generate` (flags are defined below, only when run as a program)."""
    from absl import flags

    from eval.lm import open_run, quiet_logs

    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments {' '.join(argv[1:])}")
    args = flags.FLAGS
    top_k = args.top_k if args.top_k > 0 else None
    quiet_logs()
    run = open_run(args.workdir, args.step)
    try:
        check_run(run, len(args.prompt.encode("utf-8")), args.max_new_tokens)
        pieces = stream_text(
            run, args.prompt, args.max_new_tokens, temperature=args.temperature, top_k=top_k, seed=args.seed
        )
        sys.stdout.write(args.prompt)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    sys.stdout.write("\n")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "Run directory with checkpoints/ (required).")
    flags.DEFINE_string("prompt", None, "Text to continue (required).")
    flags.DEFINE_integer("max_new_tokens", 200, "Bytes to generate.")
    flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 = greedy.", lower_bound=0.0)
    flags.DEFINE_integer("top_k", 40, "Sample among the k most likely bytes; 0 = all.", lower_bound=0)
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.mark_flags_as_required(["workdir", "prompt"])
    app.run(main)
