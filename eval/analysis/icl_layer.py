"""One softmax attention layer trained on in-context prompts: the plumbing `icl_regression` ([50]) and
`softmax_regression_icl` ([177]) share.

A prompt is tokens [B, T, d + 1]: the first `context` tokens are examples (x and its label in the last entry), the
others queries (label entry 0). The layer (`context_layer`: this project's `softmax` mechanism, no positions, logit
scale 1) lets every token attend to the examples only, and its prediction at a query is the last entry of its output
there (`predict`). Its circuits are KQ^h = W_q^h W_k^h^T and OV^h = W_v^h W_o^h [H, d + 1, d + 1] (`circuits`), read
as per-head patterns (`head_patterns`: KQ diagonal, OV last entry).

`InContextLayerTool` is the base of the two evaluators: it trains the layer from random initialisation with Adam
on fresh prompts (`fit`, tracing each head's KQ diagonal and OV last entry), evaluates it on held-out prompts
(`standalone_run`), checks what `run` is given, and draws the common figure (training loss or held-out bars, head
dynamics, KQ and OV per head).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from attn.core.masks import Mask
from attn.softmax.multi_head import MultiHeadAttention

from .evaluator import Evaluator, is_task, pyplot, unboxed


def context_layer(num_heads: int, head_dim: int) -> nn.Module:
    """The paper's model: one `softmax` attention layer without positions and with logit scale 1."""
    return MultiHeadAttention(num_heads=num_heads, head_dim=head_dim, position="none", scale=1.0)


@functools.partial(jax.jit, static_argnums=(0, 3))
def predict(model: nn.Module, params: Any, inputs: jax.Array, context: int) -> jax.Array:
    """Last output entry at the query tokens: inputs [B, T, E] (the first `context` tokens are the examples, every
    token attends to them only) -> [B, T - context]."""
    if not 0 < context < inputs.shape[1]:
        raise ValueError(
            f"context={context} must lie in [1, {inputs.shape[1] - 1}] for prompts of shape {inputs.shape}"
        )
    lengths = jnp.full((inputs.shape[0],), context, jnp.int32)
    out = model.apply({"params": params}, inputs, mask=Mask(kv_lengths=lengths))
    return out[:, context:, -1]


def circuits(params: Any) -> tuple[np.ndarray, np.ndarray]:
    """(KQ, OV) float64 [H, E, E] of a layer's parameters: KQ^h = W_q^h W_k^h^T (logit = x_q^T KQ x_k) and
    OV^h = W_v^h W_o^h (output = sum of weights x_k^T OV). Needs query/key/value kernels [E, H, D] (no GQA) and the
    out kernel [H, D, E]."""
    params = unboxed(params)
    try:
        wq, wk, wv, wo = (np.asarray(params[name]["kernel"], np.float64) for name in ("query", "key", "value", "out"))
    except (KeyError, TypeError):
        raise ValueError(
            "the layer needs query/key/value/out kernels (a softmax-family layer); got parameters "
            f"{sorted(params) if isinstance(params, Mapping) else type(params).__name__}"
        ) from None
    if wk.shape[1] != wq.shape[1]:
        raise ValueError(f"the layer has {wk.shape[1]} kv heads for {wq.shape[1]} heads; expected one per head")
    return np.einsum("ehd,fhd->hef", wq, wk), np.einsum("ehd,hdf->hef", wv, wo)


def head_patterns(kq: np.ndarray, ov: np.ndarray) -> tuple[list[dict[str, float]], float]:
    """Per-head pattern statistics of KQ, OV [H, E, E] (the last index is y; see icl_regression's docstring) and the
    OV zero-sum ratio."""
    dim = kq.shape[1] - 1
    heads = []
    for h in range(kq.shape[0]):
        block = kq[h, :dim, :dim]
        diag = np.diag(block)
        mean = float(diag.mean())
        off = block - np.diag(diag)
        scale = abs(mean) if mean != 0 else np.nan
        offdiag = float(np.sqrt((off**2).sum() / max(dim * dim - dim, 1))) / scale
        norm = float(np.linalg.norm(ov[h, :, dim]))
        heads.append(
            {
                "kq_diag": mean,
                "kq_spread": float(diag.std()) / scale,
                "kq_offdiag": offdiag,
                "ov_last": float(ov[h, dim, dim]),
                "ov_last_share": abs(float(ov[h, dim, dim])) / norm if norm > 0 else 0.0,
            }
        )
    last = ov[:, dim, dim]
    total = float(np.abs(last).sum())
    return heads, float(last.sum()) / total if total > 0 else 0.0


def pattern_trace(params: Any) -> dict[str, list[float]]:
    """The curve entries traced while training: each head's KQ diagonal and OV last entry (see head_patterns)."""
    heads, _ = head_patterns(*circuits(jax.device_get(params)))
    return {"kq_diag": [h["kq_diag"] for h in heads], "ov_last": [h["ov_last"] for h in heads]}


def fit(
    model: nn.Module,
    params: Any,
    sample: Callable[[jax.Array], Mapping[str, jax.Array]],
    loss: Callable[[Any, Mapping[str, jax.Array]], jax.Array],
    *,
    steps: int,
    learning_rate: float,
    seed: int,
    log_every: int,
    probe: Callable[[Any], dict[str, Any]] | None = None,
) -> tuple[Any, dict[str, list]]:
    """Adam on `loss(params, sample(key))` with a fresh sample per step; returns (params, curve): the curve holds
    "step" and "loss" (the step's training loss) every `log_every` steps and at the last, plus probe(params)'s
    entries."""
    optimizer = optax.adam(learning_rate)

    @jax.jit
    def step(params: Any, state: Any, key: jax.Array) -> tuple[Any, Any, jax.Array]:
        value, grads = jax.value_and_grad(loss)(params, sample(key))
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    state = optimizer.init(params)
    curve: dict[str, list] = {"step": [], "loss": []}
    key = jax.random.key(seed)
    for i in range(1, steps + 1):
        params, state, value = step(params, state, jax.random.fold_in(key, i))
        if i % log_every == 0 or i == steps:
            curve["step"].append(i)
            curve["loss"].append(float(value))
            for name, entry in (probe(params) if probe else {}).items():
                curve.setdefault(name, []).append(entry)
    return params, curve


def check_positive(name: str, value: Any, kind: type = int) -> None:
    """ValueError naming `name` unless `value` is a positive `kind` (an int passes for float)."""
    if not (isinstance(value, kind | int) and value > 0):
        raise ValueError(f"{name}={value!r} must be a positive {kind.__name__}")


# ---------------------------------------------------------------------------------------------------- plots
def dynamics_plot(axis: Any, curve: dict[str, list]) -> None:
    """Each head's KQ diagonal (solid) and OV last entry (dashed) against the training step on `axis`."""
    kq, ov = np.asarray(curve["kq_diag"]), np.asarray(curve["ov_last"])
    for head in range(kq.shape[1]):
        (line,) = axis.plot(curve["step"], kq[:, head], label=f"head {head} KQ diag")
        axis.plot(curve["step"], ov[:, head], ls="--", color=line.get_color(), label=f"head {head} OV[y, y]")
    axis.axhline(0.0, color="k", lw=0.5)
    axis.set(xlabel="step", title="head patterns during training")
    axis.legend(fontsize=6, ncol=2)


def circuit_plot(axes: Any, result: dict[str, Any]) -> None:
    """KQ and OV of every head side by side on axes[0], axes[1]."""
    for axis, key, title in ((axes[0], "kq", "W_KQ per head (x_1..x_d, y)"), (axes[1], "ov", "W_OV per head")):
        matrices = np.asarray(result[key])
        size = matrices.shape[1]
        gap = np.full((size, 1), np.nan)
        row = np.concatenate([part for m in matrices for part in (m, gap)][:-1], axis=1)
        limit = np.nanmax(np.abs(row)) or 1.0
        image = axis.imshow(row, cmap="RdBu_r", vmin=-limit, vmax=limit)
        axis.figure.colorbar(image, ax=axis, shrink=0.7)
        axis.set(title=title, xticks=[h * (size + 1) + size / 2 - 0.5 for h in range(len(matrices))], yticks=[])
        axis.set_xticklabels([f"head {h}" for h in range(len(matrices))])


# ---------------------------------------------------------------------------------------------------- the base
@dataclasses.dataclass(frozen=True)
class InContextLayerTool(Evaluator):
    """Base of the tools that train one attention layer on in-context prompts (`standalone`: no --workdir).

    Subclasses are frozen dataclasses with the options dim, context, num_heads, head_dim, steps, batch,
    learning_rate, log_every, eval_rows and seed (declared there, so each tool keeps its option order), and give:
    `prompt_shape` (T, d + 1) and `prompt_options` (the options named when a prompt has another shape), `sample(key,
    rows)` (prompts: {"inputs" [rows, T, d + 1], "targets", ...}), `training_loss(model, params, batch)` (a scalar),
    `run`, and for `plot`: `loss_key` (the result's dict of held-out losses), `loss_names` (the bars, in order),
    `loss_title` (the bars' title), `loss_label` (the y label), `reference_lines` ((name, line style) drawn over the
    training loss; the last one sets the y range) and `headline(result)` (the figure's title).
    """

    standalone: ClassVar[bool] = True  # `python -m eval.analysis <tool>` trains its own layer: no --workdir
    prompt_options: ClassVar[tuple[str, ...]]
    loss_key: ClassVar[str]
    loss_names: ClassVar[tuple[str, ...]]
    loss_title: ClassVar[str]
    loss_label: ClassVar[str]
    reference_lines: ClassVar[tuple[tuple[str, Any], ...]]

    @property
    def prompt_shape(self) -> tuple[int, int]:
        """(tokens T, width d + 1) of one prompt."""
        raise NotImplementedError

    def sample(self, key: jax.Array, rows: int) -> dict[str, jax.Array]:
        """`rows` prompts of this tool's setting."""
        raise NotImplementedError

    def training_loss(self, model: nn.Module, params: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
        """The scalar training loss of `params` on `batch` (a `sample`)."""
        raise NotImplementedError

    def headline(self, result: dict[str, Any]) -> str:
        """The figure's title for `result`."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ training
    def train(self) -> tuple[nn.Module, Any, dict[str, list]]:
        """(layer, trained params, curve) from random initialisation: Adam on `training_loss` of fresh prompts (see
        `fit`); the curve traces each head's KQ diagonal and OV last entry (`pattern_trace`)."""
        model = context_layer(self.num_heads, self.head_dim)
        params = unboxed(model.init(jax.random.key(self.seed), jnp.zeros((1, *self.prompt_shape)))["params"])
        params, curve = fit(
            model,
            params,
            lambda key: self.sample(key, self.batch),
            lambda params, batch: self.training_loss(model, params, batch),
            steps=self.steps,
            learning_rate=self.learning_rate,
            seed=self.seed + 1,
            log_every=self.log_every,
            probe=pattern_trace,
        )
        return model, params, curve

    def standalone_run(self) -> dict[str, Any]:
        """Trains the layer, then evaluates it on `eval_rows` held-out prompts; the result holds the curve too."""
        model, params, curve = self.train()
        held_out = self.sample(jax.random.key(self.seed + 2), self.eval_rows)
        return {**self.evaluate(model, params, [held_out]), "curve": curve}

    # ------------------------------------------------------------------------------------------ analysis
    def layer_circuits(self, model: Any, params: Any) -> tuple[np.ndarray, np.ndarray]:
        """`circuits(params)` of the layer `run` is given; ValueError for a training run's task."""
        if is_task(model):
            raise ValueError(
                f"{self.name} analyses one attention layer on real-valued prompts, not a training run's task; "
                f"it trains its own: python -m eval.analysis {self.name} --output O"
            )
        return circuits(params)

    def prompt_inputs(self, batch: Mapping[str, Any]) -> jax.Array:
        """The batch's "inputs" as float32 [B, T, d + 1]; ValueError for another shape."""
        inputs = jnp.asarray(batch["inputs"], jnp.float32)
        length, width = self.prompt_shape
        if inputs.ndim != 3 or inputs.shape[1:] != (length, width):
            options = ", ".join(f"{name}={getattr(self, name)}" for name in self.prompt_options)
            raise ValueError(f"prompts of shape {inputs.shape}; expected [B, {length}, {width}] ({options})")
        return inputs

    def plot(self, result: dict[str, Any], path: str) -> None:
        """Training loss with the reference lines and the head dynamics (trained), else bars of the held-out
        losses; then KQ and OV per head."""
        plt = pyplot()
        fig, axes = plt.subplots(1, 4, figsize=(22, 4.5), gridspec_kw={"width_ratios": [1, 1, 1.3, 1.3]})
        loss, names = result[self.loss_key], self.loss_names
        if "curve" in result:
            axes[0].plot(result["curve"]["step"], result["curve"]["loss"], label="training loss (model)")
            for name, style in self.reference_lines:
                axes[0].axhline(loss[name], ls=style, color="k", lw=0.8, label=f"{name} {loss[name]:.3g}")
            ceiling = 1.1 * loss[self.reference_lines[-1][0]]
            axes[0].set(xlabel="step", ylabel=self.loss_label, ylim=(0, ceiling), title="training loss")
            axes[0].legend(fontsize=7)
            dynamics_plot(axes[1], result["curve"])
        else:
            axes[1].axis("off")
            axes[0].bar(range(len(names)), [loss[name] for name in names])
            axes[0].set(xticks=range(len(names)), ylabel=self.loss_label, title=self.loss_title)
            axes[0].set_xticklabels(names, rotation=30, fontsize=7)
        circuit_plot(axes[2:], result)
        fig.suptitle(self.headline(result))
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
