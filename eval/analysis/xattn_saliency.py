"""`python -m eval.analysis xattn_saliency`: cross-attention against input saliency in an encoder-decoder ([32]).

"Cross-Attention is Half Explanation in Speech-to-Text Models" (Papi, Fucci, Gaido, Negri, Bentivogli; arXiv
2509.18010) compares, for every generated token i, the cross-attention row CA^{l,h}[i, :] = softmax(Q K^T / sqrt(d))
over the encoder frames with a saliency map of the same token over the input, per layer and head and aggregated
(the mean of the attention matrices over a set S of layers and heads, CA^(S) = 1/|S| sum_{(l,h) in S} CA^{l,h}), by
Pearson correlation; it finds moderate-to-strong correlations, best when aggregated, and compares with a second
saliency taken on the encoder output (how the decoder uses the encoder's representations). Its saliency (SPES) is
perturbation based: many forward passes with parts of the input masked, each scored by how much the output
distribution of the token moves (SPES's official code, hlt-mt/FBK-fairseq: scorer "KL", the KL divergence of the
original from the perturbed distribution, or "predicted_token_diff", the drop of the predicted token's probability).

Here, on an `attn.models.EncoderDecoder` with teacher forcing (batch {"sources" int [B, S], "source_lengths" int
[B] (optional), "inputs" int [B, T] (decoder input), "targets" int [B, T], "weights" [B, T] (optional)}), for the
target token y_i at decoder position i with output distribution P_i:

    input saliency     s_in[i, j]  = score(P_i, P_i(source token j replaced by `occlusion_token`))
    encoder saliency   s_enc[i, j] = score(P_i, P_i(encoder output frame j set to zero))

with score = `scorer`: "kl" (default, KL(P_i || P_i(occluded))) or "predicted_token_diff" (P_i[y_i] minus
P_i(occluded)[y_i]), the two scorers of SPES's code (`occlusion_score`).

over the valid source positions j < source_lengths. Reported: `pearson_input` / `pearson_encoder` [L][H] (mean over
the scored (row, i) of the Pearson correlation between CA^{l,h}[i, :] and s[i, :]; a (row, i) where either is
constant is left out), `layer_pearson_input` / `layer_pearson_encoder` [L] (CA averaged over the heads of the layer
first), `all_pearson_input` / `all_pearson_encoder` (CA averaged over every layer and head: the paper's best
aggregate), `top1_input` [L][H] (fraction of (row, i) whose most-attended frame is the most salient one) and
`scored` (how many (row, i) were compared).

Fidelity: reconstructed (the paper's CA definition, head/layer aggregation and Pearson comparison with input and
encoder-output saliency from its text and a review of it; the occlusion scorers follow SPES's official code (the
saliency method the paper uses); SPES's random multi-segment spectrogram masks are replaced by occluding one source
token or one encoder frame at a time, the text analogue of its perturbation; the paper's own analysis code was not
found).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn.interventions import run_with_cache

from .evaluator import Evaluator, is_task, layer_head_heatmap, pyplot

SCORERS = ("kl", "predicted_token_diff")
_CROSS = re.compile(r"(?:^|/)layers_(\d+)/cross_attention$")


def pearson_rows(a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Pearson correlation of a[..., j] and b[..., j] over the j with valid[..., j]: [..., S] -> [...]; nan where
    fewer than two positions are valid or either vector is constant there."""
    a, b, valid = np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(valid, bool)
    count = valid.sum(-1)
    safe = np.maximum(count, 1)
    da = np.where(valid, a - (np.where(valid, a, 0).sum(-1) / safe)[..., None], 0)
    db = np.where(valid, b - (np.where(valid, b, 0).sum(-1) / safe)[..., None], 0)
    norm = np.sqrt((da * da).sum(-1) * (db * db).sum(-1))
    scale = np.maximum(np.abs(np.where(valid, a, 0)).max(-1), np.abs(np.where(valid, b, 0)).max(-1))
    ok = (count >= 2) & (norm > 1e-12 * np.maximum(scale, 1e-300) ** 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, (da * db).sum(-1) / np.where(ok, norm, 1), np.nan)


def occlusion_score(base: jax.Array, perturbed: jax.Array, targets: jax.Array, scorer: str) -> jax.Array:
    """Saliency of one occlusion at every target position: logits [..., T, V] of the intact and the occluded input,
    targets int [..., T] -> [..., T]. The two scorers of SPES's official code (hlt-mt/FBK-fairseq, occlusion_explanation
    scorers), with p = softmax(base) and q = softmax(perturbed):

      "kl"                    KL(p || q) = sum_v p_v (log p_v - log q_v)
      "predicted_token_diff"  p_y - q_y for the target token y (signed: negative where the occlusion helps)
    """
    log_p = jax.nn.log_softmax(base.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(perturbed.astype(jnp.float32), axis=-1)
    if scorer == "kl":
        return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    if scorer == "predicted_token_diff":
        index = targets[..., None]
        return jnp.exp(jnp.take_along_axis(log_p, index, -1)[..., 0]) - jnp.exp(
            jnp.take_along_axis(log_q, index, -1)[..., 0]
        )
    raise ValueError(f"scorer={scorer!r} must be one of {SCORERS}")


def _encoder_decoder(model: Any) -> Any:
    from attn.models import EncoderDecoder

    module = model.model if is_task(model) else model
    if not isinstance(module, EncoderDecoder):
        raise ValueError(
            f"xattn_saliency needs an encoder-decoder (attn.models.EncoderDecoder, e.g. configs/seq2seq_tiny.py); "
            f"got {type(module).__name__}, which has no cross-attention"
        )
    return module


def _check_batch(index: int, batch: Mapping[str, Any]) -> None:
    for key in ("sources", "inputs", "targets"):
        if key not in batch:
            raise ValueError(
                f"batches[{index}] has no {key!r}: xattn_saliency needs seq2seq batches (sources [B, S], inputs and "
                "targets [B, T], optional source_lengths [B] and weights [B, T])"
            )


@dataclasses.dataclass(frozen=True)
class XAttnSaliency(Evaluator):
    """Options: occlusion_token, the source token id that replaces an occluded source token (0: the seq2seq task's
    padding token); scorer, how an occlusion's effect is measured ("kl" or "predicted_token_diff", see
    `occlusion_score`)."""

    occlusion_token: int = 0
    scorer: str = "kl"

    name = "xattn_saliency"
    paper = "[32] Cross-Attention is Half Explanation in Speech-to-Text Models (arXiv 2509.18010)"
    fidelity = "reconstructed"
    reference = (
        "the paper's text (arXiv 2509.18010: CA^{l,h} rows per generated token, the mean over sets of layers and "
        "heads, Pearson correlation with input and encoder-output saliency) and a review of it; the occlusion scorers "
        "(KL, predicted_token_diff) of SPES's official code (hlt-mt/FBK-fairseq examples/speech_to_text/"
        "occlusion_explanation/scorers); occlusion of one source token / encoder frame stands in for SPES's random "
        "multi-segment spectrogram masks; the paper's analysis code not found"
    )

    def __post_init__(self) -> None:
        if not (isinstance(self.occlusion_token, int) and self.occlusion_token >= 0):
            raise ValueError(f"occlusion_token={self.occlusion_token!r} must be a non-negative token id")
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer={self.scorer!r} must be one of {SCORERS}")

    def run(self, model: Any, params: Any, batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        module = _encoder_decoder(model)
        if isinstance(params, Mapping) and "techniques" in params:
            raise ValueError(
                "xattn_saliency calls the encoder-decoder directly: a run with training techniques "
                "(params['techniques']) is not supported"
            )
        source_vocab = module.source_vocab_size or module.vocab_size
        if self.occlusion_token >= source_vocab:
            raise ValueError(
                f"occlusion_token={self.occlusion_token} is outside the source vocabulary of {source_vocab}"
            )
        variables = {"params": params}

        @jax.jit
        def measure(sources, lengths, inputs, targets):
            logits, cache = run_with_cache(
                module, variables, sources, inputs, src_lengths=lengths, names=("attention_weights",)
            )
            maps = {
                int(_CROSS.search(p).group(1)): e["attention_weights"] for p, e in cache.items() if _CROSS.search(p)
            }
            positions = jnp.arange(sources.shape[1])

            def occlude_token(j):
                occluded = jnp.where(positions[None, :] == j, self.occlusion_token, sources)
                perturbed = module.apply(variables, occluded, inputs, src_lengths=lengths)
                return occlusion_score(logits, perturbed, targets, self.scorer)

            encoded = module.apply(variables, sources, lengths, method="encode")

            def occlude_frame(j):
                frames = jnp.where((positions == j)[None, :, None], 0.0, encoded).astype(encoded.dtype)
                perturbed = module.apply(variables, inputs, frames, lengths, method="decode")
                return occlusion_score(logits, perturbed, targets, self.scorer)

            s_in = jax.lax.map(occlude_token, positions)  # [S, B, T]
            s_enc = jax.lax.map(occlude_frame, positions)
            return maps, jnp.moveaxis(s_in, 0, -1), jnp.moveaxis(s_enc, 0, -1)

        per_head = {"input": [], "encoder": []}
        per_layer = {"input": [], "encoder": []}
        overall = {"input": [], "encoder": []}
        top1 = []
        for index, batch in enumerate(batches):
            _check_batch(index, batch)
            sources = jnp.asarray(batch["sources"], jnp.int32)
            inputs = jnp.asarray(batch["inputs"], jnp.int32)
            targets = jnp.asarray(batch["targets"], jnp.int32)
            b, s = sources.shape
            lengths = batch.get("source_lengths")
            lengths = jnp.full((b,), s, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
            weights = np.asarray(batch.get("weights", np.ones(targets.shape)), np.float64)
            maps, s_in, s_enc = jax.device_get(measure(sources, lengths, inputs, targets))
            layers = sorted(maps)
            if not layers:
                raise ValueError(
                    "the model's cross-attention records no attention weights (a mechanism without a "
                    "probability matrix cannot be compared with saliency)"
                )
            ca = np.stack([np.asarray(maps[layer], np.float64) for layer in layers], 1)  # [B, L, H, T, S]
            valid = np.arange(s)[None, None, :] < np.asarray(lengths)[:, None, None]  # [B, 1, S]
            scored = weights > 0  # [B, T]
            for kind, saliency in (("input", s_in), ("encoder", s_enc)):
                sal = np.asarray(saliency, np.float64)  # [B, T, S]
                heads = pearson_rows(ca, sal[:, None, None], valid[:, None, None])  # [B, L, H, T]
                per_head[kind].append(np.moveaxis(heads, -1, 1)[scored])  # [n, L, H]
                layer = pearson_rows(ca.mean(2), sal[:, None], valid[:, None])  # [B, L, T]
                per_layer[kind].append(np.moveaxis(layer, -1, 1)[scored])
                overall[kind].append(pearson_rows(ca.mean((1, 2)), sal, valid)[scored])
            masked = np.where(valid[:, None, None], ca, -np.inf).argmax(-1)  # [B, L, H, T]
            salient = np.where(valid, s_in, -np.inf).argmax(-1)  # [B, T]
            top1.append(np.moveaxis(masked == salient[:, None, None], -1, 1)[scored])
        out: dict[str, Any] = {"layers": layers, "scored": int(sum(len(t) for t in top1))}
        for kind in ("input", "encoder"):
            out[f"pearson_{kind}"] = _nanmean(np.concatenate(per_head[kind])).tolist()
            out[f"layer_pearson_{kind}"] = _nanmean(np.concatenate(per_layer[kind])).tolist()
            out[f"all_pearson_{kind}"] = float(_nanmean(np.concatenate(overall[kind])))
        out["top1_input"] = np.concatenate(top1).mean(0).tolist()
        return out

    def plot(self, result: dict[str, Any], path: str) -> None:
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for axis, kind in zip(axes, ("input", "encoder"), strict=True):
            title = f"Pearson(CA, {kind} saliency); all layers+heads {result[f'all_pearson_{kind}']:.2f}"
            layer_head_heatmap(axis, result[f"pearson_{kind}"], title, "Pearson r", vmin=-1, vmax=1, cmap="coolwarm")
        fig.suptitle("xattn_saliency [32]: cross-attention against occlusion saliency")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _nanmean(values: np.ndarray) -> np.ndarray:
    """Mean over axis 0 ignoring nan; nan (no warning) where every entry is nan."""
    count = np.sum(~np.isnan(values), axis=0)
    total = np.nansum(values, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)
