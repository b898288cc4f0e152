"""A Hugging Face checkpoint directory as what an analysis tool reads: `python -m eval.analysis <tool> --checkpoint D`.

    model, params, batches, kind, hf_config = checkpoint_inputs(
        "path/to/gpt2", SinkRate, batch_size=4, num_batches=1, length=64
    )

The directory is loaded by `attn.pretrained.load` (decoders GPT-2 / Llama / Mistral / Qwen2 -> DecoderLM, BERT /
MiniLM -> Encoder, ViT -> ViT). Batches of a text model are the default text corpus (the validation files of the
Python standard library sources: the "text" data source's valid split) tokenised with the checkpoint's tokenizer.json:
consecutive chunks of the text, each encoded with the tokenizer's own special tokens (BERT's [CLS] ... [SEP], a
Llama BOS) and truncated to `length` tokens, so every row is full: {"inputs": int32 [batch_size, length]}. Batches
of a ViT are procedural images (the "images" data source's red/blue-square scenes at the checkpoint's image_size):
{"inputs": float32 [batch_size, H, W, C]}.

Which tools run on which kind (`TOOL_KINDS`): attention-map tools on every kind, tools that read next-token logits
or a causal prediction on decoders only; tools that need the batches of their own synthetic task (passkeys,
arithmetic, ordinal tokens, multiple choice, graphs; generated with a byte-level or compact vocabulary) and the
tools that train their own model take no checkpoint. `check_tool_kind` says so in one line (ValueError).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

DECODER, ENCODER, VISION = "decoder", "encoder", "vision"
_KIND_OF_ARCHITECTURE = {
    "GPT2LMHeadModel": DECODER,
    "LlamaForCausalLM": DECODER,
    "MistralForCausalLM": DECODER,
    "Qwen2ForCausalLM": DECODER,
    "BertModel": ENCODER,
    "ViTModel": VISION,
    "ViTForImageClassification": VISION,
}
_ALL = (DECODER, ENCODER, VISION)
# The kinds of checkpoint each tool runs on; a tool missing here needs its own task's batches or trains its own model.
TOOL_KINDS: dict[str, tuple[str, ...]] = {
    "sink_rate": _ALL,
    "attention_distance": _ALL,
    "arank": _ALL,
    "stiffness": (DECODER, ENCODER),
    "waad_fai": (DECODER,),
    "attn_vs_attribution": (DECODER,),
    "head_ablation": (DECODER,),
    "logit_attribution": (DECODER,),
}
_WHY_NOT = {
    ENCODER: "it reads next-token logits or a causal prediction, which a bidirectional encoder does not make",
    VISION: "it is defined on the token sequences of a text model, not on image patches",
}


def kind_of(hf_config: Mapping[str, Any]) -> str:
    """ "decoder", "encoder" or "vision" for a config.json that attn.pretrained loads (ValueError otherwise)."""
    from attn.pretrained import architecture_of

    name = architecture_of(hf_config).name
    if name not in _KIND_OF_ARCHITECTURE:
        raise ValueError(
            f"checkpoint architecture {name!r} has no analysis batches; expected one of {sorted(_KIND_OF_ARCHITECTURE)}"
        )
    return _KIND_OF_ARCHITECTURE[name]


def check_tool_kind(tool: Any, kind: str) -> None:
    """ValueError (one line) when `tool` (an Evaluator class) cannot run on a checkpoint of `kind`."""
    name = tool.name
    if getattr(tool, "standalone", False):
        raise ValueError(f"{name} trains its own model; it takes no --checkpoint (give --output only)")
    if name == "xattn_saliency":
        raise ValueError(
            "xattn_saliency needs an encoder-decoder with cross-attention; attn.pretrained loads none (decoders, "
            "encoders and ViTs only): run it on a seq2seq run with --workdir"
        )
    if name not in TOOL_KINDS:
        raise ValueError(
            f"{name} needs the batches of its own synthetic task (generated for a byte-level or compact vocabulary), "
            f"not a checkpoint's text; run it on a trained run with --workdir. Tools for --checkpoint: "
            f"{', '.join(TOOL_KINDS)}"
        )
    if kind not in TOOL_KINDS[name]:
        runs_on = ", ".join(TOOL_KINDS[name])
        raise ValueError(f"{name} cannot run on this {kind} checkpoint ({_WHY_NOT[kind]}); it runs on: {runs_on}")


def corpus_text() -> str:
    """The default corpus's validation split (standard library sources) as text, files separated by a newline."""
    from ..trainer_api import corpus_text as held_out

    return held_out(None, "valid")


def text_batches(
    tokenizer: Any, *, batch_size: int, num_batches: int, length: int, vocab_size: int, text: str | None = None
) -> list[dict[str, np.ndarray]]:
    """`num_batches` dicts {"inputs": int32 [batch_size, length]} of `text` (default: `corpus_text()`) tokenised by
    `tokenizer` (a tokenizers.Tokenizer; its special tokens kept), consecutive chunks of the text, one per row.
    ValueError when the text runs out or a token id is >= vocab_size (a tokenizer that does not fit the model)."""
    for name, value in (("batch_size", batch_size), ("num_batches", num_batches), ("length", length)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    text = corpus_text() if text is None else text
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=length)
    rows: list[list[int]] = []
    chunk = 16 * length  # characters: enough for `length` tokens of source code with any subword vocabulary
    start = 0
    while len(rows) < batch_size * num_batches:
        if start >= len(text):
            raise ValueError(
                f"the text gives {len(rows)} rows of {length} tokens; {batch_size * num_batches} requested "
                f"(--batch-size={batch_size} x --num-batches={num_batches})"
            )
        ids = tokenizer.encode(text[start : start + chunk]).ids
        start += chunk
        if len(ids) == length:
            rows.append(ids)
    tokens = np.asarray(rows, np.int32)
    if tokens.max() >= vocab_size:
        raise ValueError(
            f"the checkpoint's tokenizer gives token id {int(tokens.max())} but the model's vocab_size is "
            f"{vocab_size}: tokenizer.json does not belong to this model"
        )
    return [{"inputs": tokens[i * batch_size : (i + 1) * batch_size]} for i in range(num_batches)]


def image_batches(
    *, batch_size: int, num_batches: int, image_size: int, channels: int, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """`num_batches` dicts {"inputs": float32 [batch_size, image_size, image_size, channels]} of procedural scenes
    (the "images" data source's validation stream: two target squares and distractors on a grey background; channels
    tiled or cut from RGB)."""
    from ..trainer_api import make_source

    source = make_source(
        "images",
        split="valid",
        batch_size=batch_size,
        seed=seed,
        image_size=image_size,
        square_size=max(1, image_size // 8),
        num_distractors=3,
        noise_std=0.02,
    )
    out = []
    for _ in range(num_batches):
        images = np.asarray(source.next_batch()["images"], np.float32)
        images = np.tile(images, (1, 1, 1, -(-channels // 3)))[..., :channels]
        out.append({"inputs": np.ascontiguousarray(images)})
    return out


def checkpoint_inputs(
    path: str, tool: Any, *, batch_size: int, num_batches: int, length: int
) -> tuple[Any, Any, list[dict[str, np.ndarray]], str, dict[str, Any]]:
    """(model, params, batches, kind, hf_config) for running `tool` (an Evaluator class) on checkpoint `path`.

    ValueError (one line) for a directory that is not a supported checkpoint, a tool that cannot run on its kind,
    `length` beyond the model's positions, or a text model without tokenizer.json."""
    from attn import pretrained

    if not pathlib.Path(path).is_dir():
        raise ValueError(f"--checkpoint={path!r} is not a directory (a Hugging Face model directory)")
    hf_config = pretrained.read_config(path)
    kind = kind_of(hf_config)
    check_tool_kind(tool, kind)
    model, params, tokenizer, hf_config = pretrained.load(path)
    if kind == VISION:
        batches = image_batches(
            batch_size=batch_size,
            num_batches=num_batches,
            image_size=int(hf_config["image_size"]),
            channels=int(hf_config.get("num_channels", 3)),
        )
        return model, params, batches, kind, hf_config
    if tokenizer is None:
        raise ValueError(f"--checkpoint={path!r} has no tokenizer.json: its text batches cannot be tokenised")
    positions = hf_config.get("max_position_embeddings", hf_config.get("n_positions"))
    if positions is not None and length > int(positions):
        raise ValueError(f"--seq-len={length} exceeds the checkpoint's {positions} positions")
    batches = text_batches(
        tokenizer, batch_size=batch_size, num_batches=num_batches, length=length, vocab_size=model.vocab_size
    )
    return model, params, batches, kind, hf_config


def vision_grid(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """attention_distance's options for a ViT checkpoint: its patch grid, the patch size in pixels, one class token."""
    side = int(hf_config["image_size"]) // int(hf_config["patch_size"])
    return {"grid": (side, side), "patch_size": float(hf_config["patch_size"]), "prefix_tokens": 1}
