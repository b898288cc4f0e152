"""`python -m eval.analysis successor_heads`: succession score of each head's OV circuit on ordinal tokens ([80]).

"Successor Heads: Recurring, Interpretable Attention Heads In The Wild" (Gould, Ong, Ogden, Conmy; ICLR 2024, arXiv
2312.09230) calls a head a successor head when its OV circuit increments ordinal tokens (digits, letters, days,
months): for each token t of an ordinal sequence (all but the last), the head's effective OV circuit maps the
token's effective embedding to logits,

    logits_h(t) = W_U W_OV^h f(t)            f(t) = W_E t + MLP_0(W_E t)   (the "effective embedding", attention-free)

and succession occurs when, among the tokens of t's own sequence, the top logit is succ(t). The succession score of
a head is the fraction of tokens where succession occurs, over all sequences. The paper's mod-10 features (a sparse
autoencoder over MLP_0 outputs) are not part of this tool.

How it is computed here, on any model of this project: each ordinal token is fed alone (a one-token sequence, so
every head attends to it with weight 1 and its head output is exactly W_V applied to its normalised input); for a
head in layer l, the heads of layers < l are ablated (`attn.interventions.ablate_heads`), so the input it sees is
the attention-free residual of the token, W_E t + MLP_0(.) (+ the MLPs of the layers in between, which the paper's
definition leaves out; identical for l <= 1). The head output goes through the head's rows of the output projection,
the final norm's scale (and centring for LayerNorm; its per-token 1 / rms is a positive factor that cannot change
a top-1) and the unembedding (tied or not). A top-1 tie is not a succession.

`orders`: comma-separated ordinal sequences of token ids, each a range "a-b" (inclusive, ascending) or an explicit
list "a:b:c". Default: ASCII digits, upper- and lower-case letters (a byte-level vocabulary).

Reported: `score` [L][H], `order_scores` [O][L][H] (per sequence), `orders` (the token ids), `chance` (the score of
a head with a uniformly random top-1: mean over tokens of 1 / |sequence|), `ranking` (heads, descending score), and
`layer_score` [L]: the same score for the sum of the layer's head outputs (W_U sum_h W_OV^h f(t)), an addition of this
tool that tells a layer whose heads increment together (each holding part of the map) from one that does not.

Fidelity: reconstructed from the paper's abstract and summaries of its method (full text and code not read).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

import attn
from attn.interventions import ablate_heads

from .evaluator import Evaluator, captured, is_task, layer_head_heatmap, pyplot
from .logit_attribution import unembedding

BYTE_ORDERS = "48-57,65-90,97-122"  # '0'..'9', 'A'..'Z', 'a'..'z' in a byte-level vocabulary


def parse_orders(text: str) -> tuple[tuple[int, ...], ...]:
    """'48-57,3:5:9' -> ((48, ..., 57), (3, 5, 9)): ordinal sequences of token ids (each of >= 2 distinct ids)."""
    orders = []
    for part in (p.strip() for p in str(text).split(",")):
        try:
            if "-" in part:
                first, last = (int(v) for v in part.split("-"))
                tokens = tuple(range(first, last + 1))
            else:
                tokens = tuple(int(v) for v in part.split(":"))
        except ValueError:
            tokens = ()
        if len(tokens) < 2 or len(set(tokens)) != len(tokens) or min(tokens) < 0:
            raise ValueError(
                f"orders={text!r}: {part!r} must be an ascending range 'a-b' or a list 'a:b:c' of >= 2 distinct "
                "non-negative token ids"
            )
        orders.append(tokens)
    return tuple(orders)


def succession(logits: np.ndarray, orders: Sequence[Sequence[int]], index: Mapping[int, int]) -> np.ndarray:
    """Succession hits per sequence: logits [N, V] (row index[t]: the logits of token t's OV output) -> bool [O, ...]
    as a list of bool arrays [len(order) - 1], True where the strict top-1 among the order's tokens is succ(t)."""
    hits = []
    for order in orders:
        order = list(order)
        rows = logits[[index[t] for t in order[:-1]]][:, order]  # [len - 1, len]
        top = rows.max(axis=-1, keepdims=True)
        unique = (rows == top).sum(axis=-1) == 1
        hits.append(unique & (rows.argmax(axis=-1) == np.arange(1, len(order))))
    return hits


def _out_kernels(params: Mapping[str, Any]) -> dict[int, np.ndarray]:
    """{layer: out kernel float64 [H, Dv, E]} of the self-attention layers (".../layers_<i>/attention/out/kernel")."""
    found = {}
    for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [str(getattr(entry, "key", entry)) for entry in path]
        if keys[-3:] == ["attention", "out", "kernel"] and len(keys) >= 4 and keys[-4].startswith("layers_"):
            found[int(keys[-4].split("_")[1])] = np.asarray(value, np.float64)
    return found


@dataclasses.dataclass(frozen=True)
class SuccessorHeads(Evaluator):
    """Options: orders (ordinal sequences of token ids; see the module docstring)."""

    orders: tuple[tuple[int, ...], ...] = dataclasses.field(
        default=parse_orders(BYTE_ORDERS), metadata={"parse": parse_orders}
    )

    name = "successor_heads"
    paper = "[80] Successor Heads: Recurring, Interpretable Attention Heads In The Wild (arXiv 2312.09230)"
    fidelity = "reconstructed"
    reference = (
        "the paper's succession score (top-1 within the task's tokens of W_U W_OV applied to the MLP_0 effective "
        "embedding, fraction of tokens) as its abstract and summaries describe it (full text and code not read); "
        "the effective embedding is the attention-free residual of the token alone (exact for heads of layers 0, 1)"
    )

    def __post_init__(self) -> None:
        orders = parse_orders(",".join(":".join(str(t) for t in order) for order in self.orders))
        object.__setattr__(self, "orders", orders)

    def run(self, model: Any, params: Any, batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if is_task(model) and model.kind != "decoder":
            raise ValueError(f"successor_heads reads decoder language models; the run holds a {model.kind!r} model")
        u = unembedding(params)  # [E, V]
        vocab = u.shape[1]
        tokens = sorted({t for order in self.orders for t in order})
        if tokens[-1] >= vocab:
            raise ValueError(f"orders hold token {tokens[-1]}, out of range for the vocabulary of {vocab}")
        index = {t: i for i, t in enumerate(tokens)}
        alone = {"inputs": np.asarray(tokens, np.int32)[:, None]}  # [N, 1]: every token on its own
        kernels = _out_kernels(params)
        layers = sorted(jax.eval_shape(lambda p: captured(model, p, alone, "head_outputs"), params))

        @functools.partial(jax.jit, static_argnums=1)
        def head_outputs(params: Any, before: int) -> jax.Array:
            """Head outputs [N, 1, H, Dv] of layers[before] with the heads of the layers before it ablated."""
            ablate = ablate_heads(layers=layers[:before], module="*/attention")
            with attn.intervene(ablate) if before else contextlib.nullcontext():
                return captured(model, params, alone, "head_outputs")[layers[before]]

        norm = params.get("final_norm", {})
        gamma = np.asarray(norm.get("scale", 1.0), np.float64)
        centred = "bias" in norm

        scores, per_order, layer_scores = [], [], []
        for i, layer in enumerate(layers):
            heads = np.asarray(head_outputs(params, i), np.float64)[:, 0]
            if layer not in kernels:
                raise ValueError(
                    f"layer {layer} has no output projection attention/out/kernel [heads, head_dim, embed]"
                )
            out = np.einsum("nhd,hde->hne", heads, kernels[layer])  # [H, N, E]
            if centred:
                out = out - out.mean(axis=-1, keepdims=True)
            logits = (out * gamma) @ u  # [H, N, V]
            hits = [succession(head_logits, self.orders, index) for head_logits in logits]
            scores.append([float(np.concatenate(h).mean()) for h in hits])
            together = succession((out.sum(axis=0) * gamma) @ u, self.orders, index)  # the heads' outputs summed
            layer_scores.append(float(np.concatenate(together).mean()))
            per_order.append([[float(x.mean()) for x in h] for h in hits])  # [H][O]
        score = np.asarray(scores)
        order = np.argsort(-score, axis=None, kind="stable")
        heads_per_layer = score.shape[1]
        sizes = [len(o) for o in self.orders]
        return {
            "layers": layers,
            "orders": [list(o) for o in self.orders],
            "score": score.tolist(),
            "layer_score": layer_scores,
            "order_scores": np.transpose(np.asarray(per_order), (2, 0, 1)).tolist(),
            "chance": float(sum((n - 1) / n for n in sizes) / sum(n - 1 for n in sizes)),
            "ranking": [[layers[i // heads_per_layer], i % heads_per_layer] for i in order.tolist()],
        }

    def plot(self, result: dict[str, Any], path: str) -> None:
        plt = pyplot()
        fig, axis = plt.subplots(figsize=(6, 4.5))
        layer_head_heatmap(axis, result["score"], "succession score of the OV circuit", "score", vmin=0, vmax=1)
        together = result.get("layer_score") or [None] * len(result["layers"])
        labels = [
            f"{layer}" if t is None else f"{layer}\nall heads {t:.2f}"
            for layer, t in zip(result["layers"], together, strict=True)
        ]
        axis.set(yticks=range(len(result["layers"])), yticklabels=labels)
        fig.suptitle(f"successor_heads [80]: chance {result['chance']:.2f}, {len(result['orders'])} sequences")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
