"""Sampling text from a trained byte-level language model or a Hugging Face checkpoint, printed token by token as it
is decoded.

    python -m eval.generate --workdir runs/lm_tiny --prompt "def "
        [--max_new_tokens 200] [--temperature 0.8] [--top_k 40] [--seed 0] [--step N]
    python -m eval.generate --checkpoint path/to/hf_model --prompt "def " [--max-new-tokens N --temperature T
        --top-k K --seed S] [--attention NAME | --attention NAME0,NAME1,...]

With `--checkpoint`, the directory is loaded by `attn.pretrained.load` (GPT-2 or Llama family: config.json,
safetensors weights, tokenizer.json), the prompt is encoded with its tokenizer and the tokens are decoded
incrementally (`tokenizers.decoders.DecodeStream`). `--attention` swaps the attention of every layer (or one name per
layer) for a registered mechanism with the same parameters (`attn.pretrained.swap.with_attention`). Flags may be
spelled with dashes or underscores.

Loads the latest (or `--step`) checkpoint of the workdir with the config saved inside it (`train.run.load_run`),
encodes the prompt as UTF-8 bytes, and decodes with the KV cache (`attn.models.generate.generate_stream`: one
prefill call for the prompt, then one cached step per token). `--temperature 0` is greedy. Bytes that do not form
valid UTF-8 print as U+FFFD. Works for decoder runs on the byte-level `text` data source (vocabulary 256).

From Python, the same run as a model and its parameters:

    from train.run import load_run; run = load_run("runs/lm_tiny"); model, params = run.task.model, run.model_params
"""

from __future__ import annotations

import codecs
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from attn.models.generate import generate_stream

from .trainer_api import Run

if TYPE_CHECKING:
    from tokenizers import Tokenizer


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
            run.model_params,
            jnp.asarray(tokens),
            max_new_tokens,
            temperature=temperature,
            top_k=top_k if temperature > 0 else None,
            rng=rng,
        )
        for token in stream:
            yield decoder.decode(bytes([int(token[0])]))
    yield decoder.decode(b"", final=True)


def check_checkpoint_length(model: Any, prompt_len: int, max_new_tokens: int) -> None:
    """ValueError unless prompt + max_new_tokens tokens fit the checkpoint's positions (`model.max_len`: learned
    positions of GPT-2, max_position_embeddings of Llama, beyond which dynamic RoPE scaling would change)."""
    total = prompt_len + max_new_tokens
    if total > model.max_len:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens={max_new_tokens} = {total} tokens exceed the checkpoint's "
            f"maximum length {model.max_len} (max_position_embeddings / n_positions)"
        )


def stream_checkpoint_text(
    model: Any,
    params: Any,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = 40,
    seed: int = 0,
) -> Iterator[str]:
    """Yields the continuation of `prompt` by a loaded checkpoint as text pieces, one per decoded token (empty while
    the tokenizer's decoder waits for more bytes), then the rest of the text a final incomplete character leaves
    (its replacement characters, as `tokenizer.decode` gives them). ValueError for an empty prompt or one that does
    not fit."""
    from tokenizers.decoders import DecodeStream

    if not prompt:
        raise ValueError("prompt='' is empty; give at least one character to continue")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    ids = tokenizer.encode(prompt).ids
    if not ids:
        raise ValueError(f"prompt={prompt!r} encodes to no tokens")
    check_checkpoint_length(model, len(ids), max_new_tokens)
    stream = generate_stream(
        model,
        params,
        jnp.asarray([ids], jnp.int32),
        max_new_tokens,
        temperature=temperature,
        top_k=top_k if temperature > 0 else None,
        rng=jax.random.key(seed),
    )
    decoder = DecodeStream(skip_special_tokens=False)
    new_ids, text = [], ""
    for token in stream:
        new_ids.append(int(token[0]))
        piece = decoder.step(tokenizer, new_ids[-1]) or ""
        text += piece
        yield piece
    # Bytes the stream still holds (an incomplete character at the end) come out as the full decoding has them.
    full = tokenizer.decode(new_ids, skip_special_tokens=False)
    yield full[len(text) :] if full.startswith(text) else ""


def _checkpoint_pieces(args: Any, top_k: int | None) -> Iterator[str]:
    from attn import pretrained
    from attn.pretrained.swap import with_attention

    model, params, _, _ = pretrained.load(args.checkpoint)
    tokenizer = pretrained.load_tokenizer(args.checkpoint)
    if args.attention:
        names = args.attention.split(",")
        model, params = with_attention(model, params, names[0] if len(names) == 1 else names)
    return stream_checkpoint_text(
        model,
        params,
        tokenizer,
        args.prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=top_k,
        seed=args.seed,
    )


def main(argv: Sequence[str]) -> None:
    """Entry point of `python -m eval.generate` (flags are defined below, only when run as a program)."""
    from absl import flags

    from .lm import open_run, quiet_logs

    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments {' '.join(argv[1:])}")
    args = flags.FLAGS
    top_k = args.top_k if args.top_k > 0 else None
    if (args.workdir is None) == (args.checkpoint is None):
        raise SystemExit(
            "error: give exactly one of --workdir (a training run) and --checkpoint (a Hugging Face model)"
        )
    if args.attention and args.checkpoint is None:
        raise SystemExit("error: --attention swaps the attention of a --checkpoint model")
    quiet_logs()
    try:
        if args.checkpoint is not None:
            pieces = _checkpoint_pieces(args, top_k)
        else:
            run = open_run(args.workdir, args.step)
            check_run(run, len(args.prompt.encode("utf-8")), args.max_new_tokens)
            pieces = stream_text(
                run, args.prompt, args.max_new_tokens, temperature=args.temperature, top_k=top_k, seed=args.seed
            )
        sys.stdout.write(args.prompt)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    sys.stdout.write("\n")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "Run directory with checkpoints/ (or give --checkpoint).")
    flags.DEFINE_string("checkpoint", None, "Hugging Face model directory (or give --workdir).")
    flags.DEFINE_string("prompt", None, "Text to continue (required).")
    flags.DEFINE_integer("max_new_tokens", 200, "Tokens (bytes for --workdir) to generate.")
    flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 = greedy.", lower_bound=0.0)
    flags.DEFINE_integer("top_k", 40, "Sample among the k most likely tokens; 0 = all.", lower_bound=0)
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the latest).")
    flags.DEFINE_string(
        "attention", None, "--checkpoint only: registry name (or comma-separated per layer) to swap in."
    )
    for name in ("max_new_tokens", "top_k"):
        flags.DEFINE_alias(name.replace("_", "-"), name)
    flags.mark_flags_as_required(["prompt"])
    app.run(main)
