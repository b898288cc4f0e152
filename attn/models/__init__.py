"""Models whose attention is any registered mechanism, chosen by name (per layer if wanted).

DecoderLM            tokens int [B, T] -> logits float32 [B, T, vocab_size] (causal; KV-cache decoding)
Encoder              tokens int [B, T], lengths int [B] -> float32 [B, num_classes] or [B, T, vocab_size]
EncoderDecoder       src int [B, Ts] (+ src_lengths), tgt int [B, Tt] -> logits float32 [B, Tt, vocab_size]
VisionLanguageModel  images float [B, H, W, C], tokens int [B, T] -> logits float32 [B, T, vocab_size]
ViT                  images float [B, H, W, C] -> float32 [B, num_classes]
CNN                  images float [B, H, W, C] -> float32 [B, num_classes] (channel attention mechanisms)
AttentionMIL         instances float [B, N, F] (+ lengths) -> MILOutput(logits [B, num_classes], attention [B, N])
CTRModel             behaviours int [B, L], target int [B] -> click logits float32 [B, 2] (target attention + MLP)
Detector             images float [B, H, W, C] -> per-patch float32 [B, N, 1 + classes + 2] (objectness/class, centre)
DiT                  images x_t float [B, H, W, C], times [B], captions int [B, L] -> velocity float32 [B, H, W, C]
generate             greedy / top-k sampling with the KV cache; init_cache builds a zero cache
generate_encoder_decoder  the same for EncoderDecoder and VisionLanguageModel(fusion="cross")
build_model          build_model("decoder" | "encoder" | "encoder_decoder" | "vlm" | "vit" | "cnn" | "dit", **fields)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from attn.models.cnn import CNN
from attn.models.ctr import CTRModel
from attn.models.decoder import DecoderLM
from attn.models.detector import Detector
from attn.models.dit import DiT
from attn.models.encoder import Encoder
from attn.models.encoder_decoder import EncoderDecoder
from attn.models.generate import generate, generate_encoder_decoder, init_cache
from attn.models.mil import AttentionMIL
from attn.models.vit import ViT
from attn.models.vlm import VisionLanguageModel

MODELS: dict[str, type[nn.Module]] = {
    "decoder": DecoderLM,
    "encoder": Encoder,
    "encoder_decoder": EncoderDecoder,
    "vlm": VisionLanguageModel,
    "vit": ViT,
    "cnn": CNN,
    "dit": DiT,
    "mil": AttentionMIL,
    "ctr": CTRModel,
    "detector": Detector,
}


def build_model(kind: str, **fields: Any) -> nn.Module:
    """The model of `kind` (a key of MODELS) built from its dataclass `fields`."""
    if kind not in MODELS:
        raise ValueError(f"kind={kind!r} is not a model; expected one of {sorted(MODELS)}")
    return MODELS[kind](**fields)


__all__ = [
    "AttentionMIL",
    "CNN",
    "CTRModel",
    "DecoderLM",
    "Detector",
    "DiT",
    "Encoder",
    "EncoderDecoder",
    "ViT",
    "VisionLanguageModel",
    "build_model",
    "generate",
    "generate_encoder_decoder",
    "init_cache",
]
