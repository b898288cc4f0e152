"""The vision-language part of `python -m eval.steer` (`--vlm`): the effects of var, vhr, damro, imbalance_fix and
carve on a prefix VLM trained here.

    python -m eval.steer --vlm [--workdir runs/steer_vlm] [--output benchmarks/results/steer_vlm_cpu.json]

The model is the LLaVA-style VLM of configs/steer_vlm.py (image tokens as the decoder's prefix), trained on
image_questions into --workdir when it holds no checkpoint. Measured on held-out questions ("what colour is the
shape at the <left|right>?"), with and without each system, on the same model and rows:

  accuracy        the answer token is the argmax of the last position's logits
  var             sinks from the hidden states entering each decoder layer (D_sink: the 2 most massive normalised
                  dimensions, --var-tau); the visual-sink attention mass of the text queries per layer and head
                  before and after, and accuracy (default layers: all but the last; also every layer)
  vhr             head divergence (VHD) per layer and head; accuracy with the top --vhr-k heads per layer scaled
                  by --vhr-alpha
  damro           outliers: the --damro-k image tokens with the most attention in the last encoder layer;
                  accuracy of the contrastive logits (--damro-alpha, --damro-beta)
  imbalance_fix   the text queries' attention share on the image per layer before and after, and accuracy
                  (--imbalance-gamma)
  carve           the contrast of the question's image attention with that of the general query (the direction
                  word replaced by padding); accuracy on the images masked to the --carve-keep share of patches, and
                  with the attention-level mask instead
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import attn
from attn.interventions import run_with_cache
from attn.steer import Carve, Damro, ImbalanceFix, Var, Vhr
from attn.steer import damro as damro_lib
from attn.steer import var as var_lib
from attn.steer import vhr as vhr_lib
from attn.steer.vision import DECODER_SELF_ATTENTION, num_image_tokens

from .analysis.evaluator import layer_head_heatmap, pyplot
from .steer_harness import accuracy_bars, question_rows, system_records
from .steer_harness import answer_accuracy as accuracy

CONFIG = "configs/steer_vlm.py"
VLM_SYSTEMS = ("var", "vhr", "damro", "imbalance_fix", "carve")
DEFAULTS = ("runs/steer_vlm", CONFIG, "benchmarks/results/steer_vlm_cpu.json")  # --workdir, --config, --output


def attention_maps(model: Any, params: Any, images: jax.Array, tokens: jax.Array, rules: Any = ()) -> list[jax.Array]:
    """The decoder's attention weights per layer [B, H, S, S] with `rules` active (inside a jitted caller)."""
    with attn.intervene(*rules):
        _, cache = run_with_cache(
            model, {"params": params}, images, tokens, names=("attention_weights",), layers=[DECODER_SELF_ATTENTION]
        )
    return [cache[f"decoder/layers_{layer}/attention"]["attention_weights"] for layer in range(model.num_layers)]


def image_share(maps: list[jax.Array], n: int) -> list[list[float]]:
    """Per layer and head, the text queries' attention on the image tokens, mean over rows and queries."""
    return [np.asarray(jnp.mean(jnp.sum(w[:, :, n:, :n], axis=-1), axis=(0, 2))).tolist() for w in maps]


def measure_vlm(args: argparse.Namespace, trained_model: Any) -> dict[str, Any]:
    """Every VLM system's effect (see the module docstring); trained_model(workdir, config) -> (model, params,
    info) is eval.steer's."""
    model, params, info = trained_model(args.workdir, args.config)
    batch = question_rows(info["config_data"], args.rows, args.seed)
    images, tokens = jnp.asarray(batch["images"]), jnp.asarray(batch["inputs"])
    n = num_image_tokens(model, images)
    span = (0, n)
    result: dict[str, Any] = {"tool": "steer --vlm", "model": info, "options": vars(args), "image_tokens": n}
    result["systems"] = system_records(VLM_SYSTEMS)

    def logits(rules: Any = (), images: jax.Array = images) -> jax.Array:
        return jax.jit(lambda p, x, t: _apply(model, p, x, t, rules))(params, images, tokens)

    clean = logits()
    result["baseline"] = {"accuracy": accuracy(clean, batch)}

    # var: sinks on the unsteered pass, visual-sink mass before / after
    hidden = jax.jit(lambda p: var_lib.block_inputs(model, {"params": p}, images, tokens))(params)
    dims = var_lib.sink_dimensions(hidden)
    sinks = var_lib.sink_tokens(hidden, dims, args.var_tau)
    maps = jax.jit(lambda p: attention_maps(model, p, images, tokens))(params)

    def sink_mass(maps: list[jax.Array]) -> list[list[float]]:
        return [np.asarray(var_lib.visual_sink_mass(w, sinks[i], span).mean(0)).tolist() for i, w in enumerate(maps)]

    every = list(range(model.num_layers))
    var_rules = Var(p=args.var_p, tau=args.var_tau, sink_dims=dims).rules(model, sinks, span)
    var_all = Var(p=args.var_p, tau=args.var_tau, sink_dims=dims, layers=every).rules(model, sinks, span)
    after = jax.jit(lambda p: attention_maps(model, p, images, tokens, var_all))(params)
    result["var"] = {
        "sink_dims": list(dims),
        "sinks_per_layer": np.asarray(sinks.sum(-1).mean(-1)).tolist(),
        "image_sinks_per_layer": np.asarray(sinks[:, :, :n].sum(-1).mean(-1)).tolist(),
        "accuracy": accuracy(logits(var_rules), batch),
        "all_layers_accuracy": accuracy(logits(var_all), batch),
        "sink_mass_before": sink_mass(maps),
        "sink_mass_after_all_layers": sink_mass(after),
    }

    # vhr: head divergence, top heads reinforced
    scores = jax.jit(lambda p: vhr_lib.head_divergence(model, {"params": p}, images, tokens))(params)
    result["vhr"] = {
        "vhd": np.asarray(scores.mean(1)).tolist(),
        "accuracy": accuracy(logits(Vhr(args.vhr_alpha, args.vhr_k).rules(model, scores, span)), batch),
    }

    # damro: outlier-only pass, contrastive logits
    damro = Damro(args.damro_alpha, args.damro_beta, args.damro_k)
    outlier_scores = jax.jit(lambda p: damro_lib.outlier_scores(model, p, images))(params)
    outliers = damro.outliers(outlier_scores)
    contrast = damro.combine(clean[:, -1], logits(damro.rules(model, outliers, span))[:, -1])
    result["damro"] = {
        "accuracy": accuracy(contrast, batch),
        "outlier_positions": np.asarray(jnp.argsort(-outlier_scores, axis=-1)[:, : args.damro_k][:8]).tolist(),
        "outlier_score_share": float(jnp.mean(jnp.sum(jnp.where(outliers, outlier_scores, 0.0), -1))),
    }

    # imbalance_fix: image-attention share before / after
    fix = ImbalanceFix(gamma=args.imbalance_gamma)
    sensitivity, selected = jax.jit(lambda p: fix.analyse(model, {"params": p}, images, tokens))(params)
    fix_rules = fix.rules(model, sensitivity, selected, span)
    fixed = jax.jit(lambda p: attention_maps(model, p, images, tokens, fix_rules))(params)
    result["imbalance_fix"] = {
        "accuracy": accuracy(logits(fix_rules), batch),
        "image_share_before": image_share(maps, n),
        "image_share_after": image_share(fixed, n),
        "visual_sensitivity": np.asarray(sensitivity.mean(1)).tolist(),
        "selected_per_layer": np.asarray(selected.sum(-1).mean(-1)).tolist(),
    }

    # carve: contrast with the general query, masked images
    carve = Carve(keep_ratio=args.carve_keep)
    general = tokens.at[:, -2].set(0)  # the direction word (second to last) -> padding
    contrast_map = jax.jit(lambda p: carve.contrast(model, {"params": p}, images, tokens, general))(params)
    keep = carve.keep(contrast_map)
    result["carve"] = {
        "accuracy": accuracy(logits(images=carve.mask_images(model, images, keep)), batch),
        "attention_mask_accuracy": accuracy(logits(carve.rules(model, keep, span)), batch),
        "kept_tokens": int(keep.sum(-1)[0]),
    }
    return result


def _apply(model: Any, params: Any, images: jax.Array, tokens: jax.Array, rules: Any) -> jax.Array:
    with attn.intervene(*rules):
        return model.apply({"params": params}, images, tokens)


def plot_vlm(result: dict[str, Any], path: str) -> None:
    """Accuracy per system, the visual-sink mass before / after VAR and the image share before / after
    imbalance_fix (layer x head)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 5, figsize=(24, 4.2))
    names = [
        "no steering",
        "var",
        "var (all layers)",
        "vhr",
        "damro",
        "imbalance_fix",
        "carve (pixels)",
        "carve (keys)",
    ]
    values = [
        result["baseline"]["accuracy"],
        result["var"]["accuracy"],
        result["var"]["all_layers_accuracy"],
        result["vhr"]["accuracy"],
        result["damro"]["accuracy"],
        result["imbalance_fix"]["accuracy"],
        result["carve"]["accuracy"],
        result["carve"]["attention_mask_accuracy"],
    ]
    colors = ["grey"] + [f"C{i}" for i in range(len(values) - 1)]
    accuracy_bars(axes[0], names, values, colors, rotation=30, ylabel="accuracy", title="image questions (chance 0.25)")
    var = result["var"]
    top = max(max(map(max, var["sink_mass_before"])), 1e-6)
    layer_head_heatmap(axes[1], var["sink_mass_before"], "visual-sink mass, no steering", "mass", vmin=0, vmax=top)
    layer_head_heatmap(axes[2], var["sink_mass_after_all_layers"], "after VAR (all layers)", "mass", vmin=0, vmax=top)
    fix = result["imbalance_fix"]
    layer_head_heatmap(axes[3], fix["image_share_before"], "image share, no steering", "share", vmin=0, vmax=1)
    layer_head_heatmap(axes[4], fix["image_share_after"], "after imbalance_fix", "share", vmin=0, vmax=1)
    fig.suptitle(f"attn.steer on the prefix VLM ({result['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The --vlm part's flags (its workdir/config/output defaults are set by eval.steer when --vlm is given)."""
    group = parser.add_argument_group("vision-language systems (--vlm)")
    group.add_argument("--vlm", action="store_true", help="measure var, vhr, damro, imbalance_fix, carve instead")
    group.add_argument("--var-p", type=float, default=0.6, help="VAR's factor on sink attention")
    group.add_argument("--var-tau", type=float, default=3.0, help="VAR's sink threshold (normalised activation)")
    group.add_argument("--vhr-alpha", type=float, default=2.0, help="VHR's factor on the reinforced heads")
    group.add_argument("--vhr-k", type=int, default=1, help="VHR's heads per layer")
    group.add_argument("--damro-alpha", type=float, default=0.5, help="DAMRO's contrast strength")
    group.add_argument("--damro-beta", type=float, default=0.1, help="DAMRO's plausibility cut")
    group.add_argument("--damro-k", type=int, default=2, help="DAMRO's outlier tokens")
    group.add_argument("--imbalance-gamma", type=float, default=1.0, help="imbalance_fix's largest logit boost")
    group.add_argument("--carve-keep", type=float, default=0.5, help="CARVE's share of image patches kept")
