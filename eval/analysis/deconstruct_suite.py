"""`python -m eval.analysis deconstruct_suite --output O [--steps N]`: controlled variants of attention that relax one
design principle each, applied to all layers or in hybrids with standard attention, trained on the same task and
compared ([33]).

"Deconstructing Attention: Investigating Design Principles for Effective Language Modeling" (Xue, Moosavi, Aletras;
arXiv 2510.11602). Standard attention interweaves four principles: token mixing across positions, sequence-dependent
weights, the dot-product + softmax form, and queries/keys coupled to the current layer's hidden state h. The variants
(every one a small subclass of the `softmax` layer, `attn.softmax.multi_head.MultiHeadAttention`, that overrides one
stage of the pipeline in attn/core; values always come from h):

    standard         w = softmax(q k^T / sqrt(D) + causal),  q = h W_q, k = h W_k
    no_mixing        w = I: every token attends to itself only (token mixing removed)
    rnd_emb_qk       q, k from frozen random token embeddings R[x_t] + p_t   (not coupled to h, not learned)
    static_emb_qk    q, k from the model's input embeddings E[x_t] + p_t     (not coupled to the evolving h)
    fixed_seq_qk     q, k from the input embeddings of one fixed token sequence, the same for every input, so the
                     weights do not depend on the sequence (a learned, input-independent causal mixing)
    approximate      softmax replaced by its approximation: w_ij = t(s_ij) / sum_j t(s_ij), t(s) = 1 + s + s^2/2
                     (second-order Taylor expansion of exp, positive for every s)
    non_approximate  a form that is not an approximation of softmax: w_ij = relu(s_ij) / n_i (n_i: keys visible
                     to query i), rows not normalised to one

(s = q k^T / sqrt(D); p_t a learned position embedding.) Placement "all": every layer takes the variant; "hybrid":
even layers (0, 2, ...) keep standard attention, odd layers take the variant.

Task (the paper pre-trains language models on web text; the nearest procedural stand-in here, small enough for a
CPU): next-token prediction on rows of a fixed random first-order Markov chain over `vocab` tokens in which the
first n tokens (n uniform in [T/4, T/2] per row) are repeated right after themselves. The Markov positions need
no mixing beyond the current token; the copied positions need content- or offset-dependent mixing (n varies per
row, so a fixed, input-independent pattern can only spread its weight over the plausible offsets). Reported per
(variant, placement): held-out cross-entropy over all targets (`loss`), over the copied targets (`copy_loss`) and
over the others (`markov_loss`), the final training loss and the training curve; `uniform_loss` = log(vocab).

Shapes: tokens int [B, T] -> logits [B, T, vocab]. A row of the table costs one training run of `steps` Adam steps.

Fidelity: reconstructed. The paper's abstract and summaries (arXiv listing, Hugging Face papers page, arxivlens and
liner summaries) were read; its method section was not reachable here, so the variant names RndEmbQK, FixedSeqQK,
StaticEmbQK, approximate / non-approximate are implemented from what the names and the abstract's four principles
say, and the approximate / non-approximate forms are this tool's choice.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn.core.masks import Mask
from attn.softmax.multi_head import MultiHeadAttention

from .evaluator import Evaluator, is_task, pyplot, unboxed
from .icl_layer import check_positive, fit

Array = jax.Array

PLACEMENTS = ("all", "hybrid")
RANDOM_TABLE_SEED = 1234  # the frozen random embedding table of rnd_emb_qk
FIXED_SEQUENCE_SEED = 4321  # the fixed token sequence of fixed_seq_qk


# ---------------------------------------------------------------------------------------------------- the variants
class EmbeddingQKAttention(MultiHeadAttention):
    """Queries and keys projected from `context` (a source aligned with x: [B, T, Es], e.g. embeddings), values from
    x [B, T, E]; softmax as in `softmax`. x [B, T, E] -> [B, T, E]. The source enters through the layer call's
    `context` argument, so positions apply to neither (use position="none")."""

    def project_qkv(self, x: Array, context: Array | None) -> tuple[Array, Array, Array]:
        if context is None or context.shape[1] != x.shape[1]:
            raise ValueError(
                f"context={None if context is None else context.shape} must be the query/key source aligned with x "
                f"{x.shape}: [batch, {x.shape[1]}, source_embed]"
            )
        q = self.dense_heads(context, self.num_heads, "heads", "query")
        k = self.dense_heads(context, self.kv_heads, "kv_heads", "key")
        v = self.dense_heads(x, self.kv_heads, "kv_heads", "value")
        return q, k, v


class SelfOnlyAttention(MultiHeadAttention):
    """No token mixing: weights = the identity (query i sees key i + Tk - Tq only). x [B, T, E] -> [B, T, E]."""

    def normalize(self, logits: Array) -> tuple[Array, Array | None]:
        q_len, kv_len = logits.shape[-2:]
        eye = jnp.eye(q_len, kv_len, k=kv_len - q_len, dtype=jnp.float32)
        return jnp.broadcast_to(eye, logits.shape), None


class TaylorSoftmaxAttention(MultiHeadAttention):
    """Softmax approximated by its second-order Taylor expansion: w = t(s) / sum t(s), t(s) = 1 + s + s^2 / 2 over
    the visible keys (0 where masked). x [B, T, E] -> [B, T, E]."""

    def normalize(self, logits: Array) -> tuple[Array, Array | None]:
        visible = jnp.isfinite(logits)
        s = jnp.where(visible, logits, 0.0)
        t = jnp.where(visible, 1.0 + s + 0.5 * s * s, 0.0)
        return t / jnp.maximum(jnp.sum(t, axis=-1, keepdims=True), 1e-30), None


class ReluNormalizedAttention(MultiHeadAttention):
    """A non-softmax form: w_ij = relu(s_ij) / n_i, n_i the number of keys query i sees (rows need not sum to one).
    x [B, T, E] -> [B, T, E]."""

    def normalize(self, logits: Array) -> tuple[Array, Array | None]:
        visible = jnp.isfinite(logits)
        relu = jnp.where(visible, jax.nn.relu(jnp.where(visible, logits, 0.0)), 0.0)
        count = jnp.sum(visible, axis=-1, keepdims=True).astype(jnp.float32)
        return relu / jnp.maximum(count, 1.0), None


# name -> (layer class, where its queries and keys come from: "hidden", "random", "static" or "fixed")
VARIANTS: dict[str, tuple[type[MultiHeadAttention], str]] = {
    "standard": (MultiHeadAttention, "hidden"),
    "no_mixing": (SelfOnlyAttention, "hidden"),
    "rnd_emb_qk": (EmbeddingQKAttention, "random"),
    "static_emb_qk": (EmbeddingQKAttention, "static"),
    "fixed_seq_qk": (EmbeddingQKAttention, "fixed"),
    "approximate": (TaylorSoftmaxAttention, "hidden"),
    "non_approximate": (ReluNormalizedAttention, "hidden"),
}


def layer_variants(variant: str, placement: str, num_layers: int) -> tuple[str, ...]:
    """The variant of each layer: all layers `variant` ("all"), or standard in even and `variant` in odd layers
    ("hybrid"). ValueError for an unknown variant or placement."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {list(VARIANTS)}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r} is not one of {list(PLACEMENTS)}")
    return tuple("standard" if placement == "hybrid" and i % 2 == 0 else variant for i in range(num_layers))


def qk_source(kind: str, tokens: Array, embedding: Array, position: Array) -> Array | None:
    """What a variant's queries and keys are projected from, float32 [B, T, E] (None: the layer's own input h):
    "static" E[x_t] + p_t (the model's input embeddings), "random" R[x_t] + p_t (R a frozen random table [V, E],
    seed RANDOM_TABLE_SEED), "fixed" E[f_t] + p_t for one fixed token sequence f (seed FIXED_SEQUENCE_SEED), the
    same for every row. tokens int [B, T], embedding [V, E], position [T, E]."""
    if kind == "hidden":
        return None
    vocab, width = embedding.shape
    if kind == "static":
        return embedding[tokens] + position
    if kind == "random":
        return jax.random.normal(jax.random.key(RANDOM_TABLE_SEED), (vocab, width))[tokens] + position
    if kind == "fixed":
        fixed = jax.random.randint(jax.random.key(FIXED_SEQUENCE_SEED), (tokens.shape[1],), 0, vocab)
        return jnp.broadcast_to(embedding[fixed] + position, (*tokens.shape, width))
    raise ValueError(f"kind={kind!r} must be one of 'hidden', 'static', 'random', 'fixed'")


class DeconstructBlock(nn.Module):
    """Pre-norm block: h += attention(norm(h), qk source), h += mlp(norm(h)); h [B, T, E] -> [B, T, E], source
    [B, T, E] or None (queries and keys from h)."""

    variant: str
    num_heads: int
    head_dim: int

    @nn.compact
    def __call__(self, h: Array, source: Array | None) -> Array:
        layer_class, _ = VARIANTS[self.variant]
        layer = layer_class(num_heads=self.num_heads, head_dim=self.head_dim, position="none", name="attention")
        context = None if source is None else nn.RMSNorm(name="source_norm")(source)
        h = h + layer(nn.RMSNorm(name="attention_norm")(h), context=context, mask=Mask(causal=True))
        mlp = nn.Dense(4 * h.shape[-1], name="mlp_in")(nn.RMSNorm(name="mlp_norm")(h))
        return h + nn.Dense(h.shape[-1], name="mlp_out")(nn.gelu(mlp))


class DeconstructLM(nn.Module):
    """A pre-norm decoder LM whose attention layers are the suite's variants: tokens int [B, T] (T <= seq_len) ->
    logits float32 [B, T, vocab]. Input embedding e_t = E[x_t] + p_t; blocks `layers_{i}` (DeconstructBlock, its
    attention at layers_{i}/attention), final norm, unembedding."""

    vocab: int
    seq_len: int
    variant: str = "standard"
    placement: str = "all"
    num_layers: int = 2
    embed: int = 32
    num_heads: int = 2
    head_dim: int = 16

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        if tokens.ndim != 2 or tokens.shape[1] > self.seq_len:
            raise ValueError(f"tokens of shape {tokens.shape}; expected int [batch, length <= {self.seq_len}]")
        length = tokens.shape[1]
        table = nn.Embed(self.vocab, self.embed, name="embed")
        position = self.param("position", nn.initializers.normal(0.02), (self.seq_len, self.embed))[:length]
        embedded = table(tokens) + position
        h = embedded
        for i, name in enumerate(layer_variants(self.variant, self.placement, self.num_layers)):
            block = DeconstructBlock(name, self.num_heads, self.head_dim, name=f"layers_{i}")
            h = block(h, qk_source(VARIANTS[name][1], tokens, table.embedding, position))
        return nn.Dense(self.vocab, name="unembed")(nn.RMSNorm(name="final_norm")(h)).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------------- the task
def transition_matrix(vocab: int, seed: int) -> np.ndarray:
    """A fixed random Markov transition matrix float32 [vocab, vocab] (rows sum to one; peaked rows)."""
    logits = 2.0 * np.random.default_rng(seed).standard_normal((vocab, vocab))
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)


def copy_markov_rows(key: Array, rows: int, seq_len: int, transition: Array) -> dict[str, Array]:
    """`rows` sequences of seq_len + 1 tokens of the Markov chain `transition` [V, V] whose first n tokens (n uniform
    in [seq_len // 4, seq_len // 2] per row) are repeated at n..2n-1: {"inputs" int32 [rows, seq_len], "targets"
    int32 [rows, seq_len] (inputs shifted by one), "copy" bool [rows, seq_len] (targets that repeat a token seen n
    steps before and whose copy started earlier: predictable by copying), "offset" int32 [rows] (n)}."""
    if seq_len < 8:
        raise ValueError(f"seq_len={seq_len} must be >= 8 (the copied span is seq_len // 4 .. seq_len // 2 tokens)")
    vocab = transition.shape[0]
    k_start, k_chain, k_offset = jax.random.split(key, 3)
    start = jax.random.randint(k_start, (rows,), 0, vocab)
    log_transition = jnp.log(jnp.asarray(transition))

    def step(token: Array, step_key: Array) -> tuple[Array, Array]:
        following = jax.random.categorical(step_key, log_transition[token])
        return following, following

    _, chain = jax.lax.scan(step, start, jax.random.split(k_chain, seq_len))
    chain = jnp.concatenate([start[:, None], chain.T], axis=1)  # [rows, seq_len + 1]
    offset = jax.random.randint(k_offset, (rows,), seq_len // 4, seq_len // 2 + 1)
    t = jnp.arange(seq_len + 1)[None]
    copied = (t >= offset[:, None]) & (t < 2 * offset[:, None])
    tokens = jnp.take_along_axis(chain, jnp.where(copied, t - offset[:, None], t), axis=1).astype(jnp.int32)
    target_copy = (t > offset[:, None]) & (t < 2 * offset[:, None])
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "copy": target_copy[:, 1:], "offset": offset}


def token_losses(model: nn.Module, params: Any, batch: Mapping[str, Array]) -> Array:
    """Cross-entropy float32 [B, T] of the model's next-token logits against batch["targets"]."""
    logits = model.apply({"params": params}, jnp.asarray(batch["inputs"]))
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_probs, jnp.asarray(batch["targets"])[..., None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnums=0)
def _token_losses(model: nn.Module, params: Any, batch: Mapping[str, Array]) -> Array:
    return token_losses(model, params, batch)


# ---------------------------------------------------------------------------------------------------- the tool
def _parse_names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@dataclasses.dataclass(frozen=True)
class DeconstructSuite(Evaluator):
    """Options: variants and placements (comma lists on the command line), steps, batch, learning_rate, log_every
    (training), length (T), vocab, num_layers, embed, num_heads, head_dim (the model), eval_rows, seed."""

    variants: tuple[str, ...] = dataclasses.field(default=tuple(VARIANTS), metadata={"parse": _parse_names})
    placements: tuple[str, ...] = dataclasses.field(default=PLACEMENTS, metadata={"parse": _parse_names})
    steps: int = 300
    batch: int = 32
    learning_rate: float = 0.003
    log_every: int = 25
    length: int = 32
    vocab: int = 16
    num_layers: int = 2
    embed: int = 32
    num_heads: int = 2
    head_dim: int = 16
    eval_rows: int = 256
    seed: int = 0

    name = "deconstruct_suite"
    paper = (
        "[33] Deconstructing Attention: Investigating Design Principles for Effective Language Modeling "
        "(arXiv 2510.11602)"
    )
    fidelity = "reconstructed"
    reference = (
        "arXiv 2510.11602 abstract (four principles: mixing, sequence dependence, dot-product + softmax form, "
        "Q/K coupled to the current hidden state; all-layer and hybrid placements) and summaries naming the "
        "variants RndEmbQK, FixedSeqQK, StaticEmbQK, approximate / non-approximate; method section not read; "
        "no official code found; task: a procedural Markov + copy stand-in for the paper's LM pre-training"
    )
    standalone = True  # `python -m eval.analysis deconstruct_suite` trains its own models: no --workdir

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "log_every", "vocab", "num_layers", "embed", "num_heads", "head_dim"):
            check_positive(name, getattr(self, name))
        check_positive("eval_rows", self.eval_rows)
        check_positive("learning_rate", self.learning_rate, float)
        if not (isinstance(self.length, int) and self.length >= 8):
            raise ValueError(f"length={self.length!r} must be an int >= 8")
        for field, known in (("variants", VARIANTS), ("placements", PLACEMENTS)):
            values = getattr(self, field)
            unknown = [v for v in values if v not in known]
            if not values or unknown:
                raise ValueError(f"{field}={tuple(values)} must be a non-empty selection of {list(known)}")

    # ------------------------------------------------------------------------------------------ training
    def runs(self) -> list[tuple[str, str]]:
        """The (variant, placement) pairs trained: standard once ("all"), the others in each placement."""
        pairs = []
        for variant in self.variants:
            for placement in ("all",) if variant == "standard" else self.placements:
                pairs.append((variant, placement))
        return pairs

    def model(self, variant: str, placement: str) -> DeconstructLM:
        """The suite's LM with `variant` at `placement`."""
        return DeconstructLM(
            vocab=self.vocab,
            seq_len=self.length,
            variant=variant,
            placement=placement,
            num_layers=self.num_layers,
            embed=self.embed,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
        )

    def sample(self, key: Array, rows: int) -> dict[str, Array]:
        """`rows` task rows (see copy_markov_rows) of this suite's chain."""
        return copy_markov_rows(key, rows, self.length, transition_matrix(self.vocab, self.seed))

    def train(self, variant: str, placement: str) -> tuple[DeconstructLM, Any, dict[str, list]]:
        """(model, trained params, curve) from random initialisation; every run sees the same batches."""
        model = self.model(variant, placement)
        params = unboxed(model.init(jax.random.key(self.seed), jnp.zeros((1, self.length), jnp.int32))["params"])
        return (
            model,
            *fit(
                model,
                params,
                lambda key: self.sample(key, self.batch),
                lambda params, batch: jnp.mean(token_losses(model, params, batch)),
                steps=self.steps,
                learning_rate=self.learning_rate,
                seed=self.seed + 1,
                log_every=self.log_every,
            ),
        )

    def standalone_run(self) -> dict[str, Any]:
        """Trains every (variant, placement) of `runs()`, evaluates each on `eval_rows` held-out rows; the result
        holds the header, `uniform_loss` and `table`: one row per run with its losses and curve."""
        held_out = [self.sample(jax.random.key(self.seed + 2), self.eval_rows)]
        table, header = [], {}
        for variant, placement in self.runs():
            model, params, curve = self.train(variant, placement)
            result = self.evaluate(model, params, held_out)
            header = {key: result[key] for key in ("tool", "paper", "fidelity", "reference", "options")}
            table.append(
                {
                    "variant": variant,
                    "placement": placement,
                    "layers": list(layer_variants(variant, placement, self.num_layers)),
                    **{key: result[key] for key in ("loss", "copy_loss", "markov_loss")},
                    "final_train_loss": curve["loss"][-1],
                    "curve": curve,
                }
            )
        return {**header, "uniform_loss": math.log(self.vocab), "table": table}

    # ------------------------------------------------------------------------------------------ analysis
    def run(self, model: Any, params: Any, batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Held-out losses of a model (tokens [B, T] -> logits [B, T, V]) on task rows with "inputs", "targets" and
        "copy" ([B, T] each): mean cross-entropy over all, copied and other targets."""
        if is_task(model):
            raise ValueError(
                "deconstruct_suite trains its own models; it does not read a training run's task: "
                "python -m eval.analysis deconstruct_suite --output O"
            )
        losses, copies = [], []
        for i, batch in enumerate(batches):
            if "targets" not in batch or "copy" not in batch:
                raise ValueError(f"batches[{i}] needs 'inputs', 'targets' and 'copy' (see copy_markov_rows)")
            losses.append(np.asarray(_token_losses(model, params, batch), np.float64))
            copies.append(np.asarray(batch["copy"], bool))
        loss, copy = np.concatenate(losses), np.concatenate(copies)
        return {
            "loss": float(loss.mean()),
            "copy_loss": float(loss[copy].mean()) if copy.any() else float("nan"),
            "markov_loss": float(loss[~copy].mean()),
        }

    def plot(self, result: dict[str, Any], path: str) -> None:
        plt = pyplot()
        fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
        table = result.get("table", [])
        variants = list(dict.fromkeys(row["variant"] for row in table))
        placements = list(dict.fromkeys(row["placement"] for row in table))
        width = 0.8 / max(len(placements), 1)
        for axis, key, title in ((axes[0], "loss", "held-out loss"), (axes[1], "copy_loss", "loss on copied tokens")):
            for p, placement in enumerate(placements):
                rows = {row["variant"]: row[key] for row in table if row["placement"] == placement}
                xs = [i + (p - (len(placements) - 1) / 2) * width for i, v in enumerate(variants) if v in rows]
                axis.bar(xs, [rows[v] for v in variants if v in rows], width, label=f"{placement} layers")
            axis.axhline(result["uniform_loss"], ls="--", color="k", lw=0.8, label="uniform log V")
            axis.set(xticks=range(len(variants)), ylabel="cross-entropy (nats)", title=title)
            axis.set_xticklabels(variants, rotation=30, fontsize=7)
            axis.legend(fontsize=7)
        for row in table:
            style = "-" if row["placement"] == "all" else "--"
            label = f"{row['variant']} ({row['placement']})"
            axes[2].plot(row["curve"]["step"], row["curve"]["loss"], ls=style, label=label)
        axes[2].set(xlabel="step", ylabel="training loss", title="training curves")
        axes[2].legend(fontsize=6, ncol=2)
        fig.suptitle(
            f"deconstruct_suite [33]: {result['options']['steps']} steps, {result['options']['num_layers']} layers"
        )
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
