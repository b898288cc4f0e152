"""The cases of the registry-wide test matrix (tests/registry/test_matrix.py): tiny options and inputs per mechanism.

Every registered name gets a case without being listed here: `cases()` builds one from the defaults of its input
kind (DEFAULT_OPTIONS, SHAPES). OPTIONS shrinks the options whose defaults do not fit the tiny inputs (windows,
chunks, blocks larger than the 8-token sequence or the 4x4 grid). VARIANTS adds cases for variants whose code
differs in a checked claim; a variant case runs only the checks it names.

Inputs: sequence, pooling and cross kinds x [2, 8, 16] (cross: context [2, 6, 16]); spatial kind x [2, 4, 4, 16]
(tokens in raster order for causality); channels kind x [2, 4, 4, 16] (NHWC). Sequence layers use 4 heads of size
4. Every input value is a bfloat16 number (so the bf16 check feeds both precisions the same input).

Gradients (check_grads in float64, reverse mode, w.r.t. x and every parameter). Mechanisms with a discrete
selection are differentiable only away from ties of the selection; the fixed inputs below are away from them,
and GRAD_NOTES says for each such case why the check is still meaningful (or what it leaves out).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

import attn

BATCH, LENGTH, FEATURES, GRID, CONTEXT_LENGTH = 2, 8, 16, (4, 4), 6
HEADS, HEAD_DIM = 4, 4

SHAPES = {
    "sequence": (BATCH, LENGTH, FEATURES),
    "pooling": (BATCH, LENGTH, FEATURES),
    "cross": (BATCH, LENGTH, FEATURES),
    "spatial": (BATCH, *GRID, FEATURES),
    "channels": (BATCH, *GRID, FEATURES),
}
DEFAULT_OPTIONS = {
    "sequence": {"num_heads": HEADS, "head_dim": HEAD_DIM},
    "pooling": {"num_heads": HEADS, "head_dim": HEAD_DIM},
    "cross": {"num_heads": HEADS, "head_dim": HEAD_DIM},
    "spatial": {"num_heads": HEADS, "head_dim": HEAD_DIM},
    "channels": {},
}

# Options that fit the tiny inputs (each default named here is larger than the 8 tokens or the 4x4 grid).
OPTIONS: dict[str, dict[str, Any]] = {
    "agent": {"num_agents": 4, "bias_resolution": 4},
    "arflow": {"chunk_size": 3},
    "arrow": {"local_window": 4},
    "cca": {"group_size": 2, "local_window": 4},
    "combiner": {"block_size": 4},
    "s2_attention": {"block_size": 2, "local_blocks": 2, "vert_stride": 2},
    "sea": {"top_k": 4, "compressed_length": 8, "chunk_size": 4},
    "seqboat": {"window": 4, "ema_dim": 4},
    # a budget below the 8 tokens, so decoding evicts; without the position shift, decoding equals the forward
    "streaming": {"sinks": 1, "budget": 4, "shift_positions": False},
    # exact storage (bits=16) with a residual below the 8 tokens: decoding moves entries and equals the forward
    "kivi": {"bits": 16, "group_size": 2, "residual": 4},
    # exact float32 stores and a window of 2 below the 8 tokens: decoding compresses and equals the forward
    "zipcache": {"bits_high": 16, "bits_low": 16, "gap": 2},
    "zipvl_cache": {"bits_high": 16, "bits_low": 16, "gap": 2},
    # prompts within the budget and the decode slots hold the 8 tokens: decoding equals the forward
    "snapkv": {"budget": 6, "observation_window": 2, "kernel_size": 3, "decode_budget": 2},
    "pyramidkv": {"budget": 6, "observation_window": 2, "kernel_size": 3, "decode_budget": 2},
    "adakv": {"budget": 6, "observation_window": 2, "kernel_size": 3, "decode_budget": 2},
    "titans": {"chunk_size": 4, "window": 4, "segment_size": 4, "num_persistent": 2, "memory_expansion": 1},
    "lightning": {"chunk_size": 4},
    "linear": {"chunk_size": 4},
    "hedgehog": {"chunk_size": 4},
    "flowformer": {"chunk_size": 4},
    "transnormer": {"chunk_size": 4},
    "rala": {"chunk_size": 4},
    # gamma_init=0 would make the layer the identity at init; 0.5 lets the attention path show in every check.
    "criss_cross": {"qk_reduction": 1, "gamma_init": 0.5},
    "cswin": {"stripe_width": 2},
    "davit": {"window_size": 2},
    "dilated_neighborhood": {"kernel_size": 3, "dilation": 1},
    "generalized_neighborhood": {"kernel_size": 3},
    "neighborhood": {"kernel_size": 3},
    "halo": {"block_size": 2, "halo_size": 1},
    # 4 key blocks of 2 tokens: HiP keeps 2 per query block after one halving round; FlexPrefill's budgets select
    "hip": {"block_size": 2, "top_k": 2},
    "flexprefill": {"block_size": 2},
    # 4 key blocks of 2 tokens, 2 kept per query block by the gate (gate_dim 4: small gate parameters)
    "seer": {"block_size": 2, "top_k": 2, "gate_dim": 4},
    # 8 one-token chunks, 4 kept (first, previous, own + 1 chosen): strictly causal, and a real choice from row 4 on
    "longheads": {"block_size": 1, "num_chunks": 4},
    # stride 1: every decode step is full attention, the only setting where decoding equals the forward (the claim)
    "recycled": {"capacity": 8, "top_k": 2, "stride": 1},
    "top_m": {"m": 3},  # per-token top 3 of 8 keys: strictly causal
    "dma": {"window_size": 3},  # 3 of 8 keys per query (A = 0 at init: the earliest visible ones)
    "hcam": {"block_size": 1, "top_k": 3},  # one-token chunks: per-token selection (strictly causal), 3 of 8
    "landmark": {"block_size": 3},  # landmarks at positions 2 and 5; every earlier block read (strictly causal)
    "hyper": {"block_size": 2, "sample_size": 2, "min_seq_len": 2},  # two recursion levels, sortLSH + samples
    # 4 hashes of 2 bits: no signature of the fixed input is within the finite-difference steps of a sign change
    "sdim": {"num_hashes": 4, "hash_bits": 2},
    "sparsifiner": {"keep_rate": 0.5, "reduce_n_factor": 2},  # 4 of 8 keys per query (causal: of the visible)
    "hilo": {"window_size": 2},
    "spatial_sparse": {"compression_block": 2, "selection_block": 2, "topk": 2, "window_size": 2},
    "swap": {"window_size": 2},
    "window": {"window_size": 2},
    "cape": {"pool": 2, "modes": 1, "width": 8, "kernel_size": 3},
    "medusa": {"grid": 2, "body_heads": 2, "body_head_dim": 4},
    "attentive_pooling": {"num_queries": 2},
    "low_rank_pooling": {"rank": 4},
    # the 6 context tokens as 3 frames of 2, so the causal cross-attention mask masks something
    "video_ccam": {"num_frames": 3},
    # 2 pooled visual tokens (one per frame of 3 context tokens) re-attend their frame; 6 text rows attend all
    "crosslmm": {"visual_tokens": 2, "num_frames": 2},
    # attention channels 4 heads x 2 = 8 of the 16, the other 8 are the representation (values)
    "dare": {"head_dim": 2},
    # offsets per visual position (the official form); each text row drops 2 of its 6 visual tokens
    "adem": {"context_length": 6, "drop_ratio": 0.34},
    # 6 concept slots (the keys of its attention weights, like the 6 context tokens) written in 2 slot rounds
    "concept_centric": {"num_concepts": 6, "slot_iterations": 2},
}

# Extra call arguments besides x (arrays as numpy; the tests cast them to the run's dtype).
CALL_ARGUMENTS: dict[str, dict[str, np.ndarray]] = {
    "cape": {"condition": np.array([[0.5, 2.0], [1.0, 0.1]])},
}

# Why the gradient check of a mechanism with a discrete choice is meaningful at the fixed inputs.
GRAD_NOTES: dict[str, str] = {
    "attention_gate": "hard eviction flags with a straight-through gradient into the gate (by design not the "
    "finite difference); checked w.r.t. query, key, value and out (GRAD_WRT), which leave the flags unchanged",
    "tcpa": "hard top-k prompt matching by cosine similarity: the fixed input's similarities are apart by more "
    "than the 1e-3 step at every selection boundary",
    "adem": "drops the 2 lowest of 6 similarities per row: at the fixed input no score is within a 1e-3 step of its "
    "row's threshold",
    "moh": "top-k head routing: the router scores of the fixed input are apart by far more than eps",
    "sea": "top-k of the estimated attention: its decoder upsamples columns x4, so they tie exactly in groups of 4 "
    "until decoder_norm_out's per-column affine separates them, and q, k pass the causal Performer's ReLU features "
    "(kinks within the 1e-3 step); checked w.r.t. the other parameters (GRAD_WRT); tests/linear/test_sea.py checks "
    "query and key with a 1e-4 step",
    "seqboat": "argmax router: checked w.r.t. the parameters after the routing (GRAD_WRT), where it is smooth",
    "spatial_sparse": "top-k block selection from q and k: checked w.r.t. value, out and gate (GRAD_WRT), which "
    "leave the selection unchanged",
    "flexprefill": "cumulative-attention budgets (gamma) from q and k: a 1e-3 step of x, query or key moves a count "
    "across its threshold; checked w.r.t. value and out (GRAD_WRT), which leave the selection unchanged",
    "seer": "top-k of the gate's block scores from q and k: a 1e-3 step of x, query, key or the gate can swap two "
    "blocks; checked w.r.t. value and out (GRAD_WRT), which leave the selection unchanged",
    "longheads": "top-k of the chunk scores from q and k: a 1e-3 step of x, query or key can swap two chunks; checked "
    "w.r.t. value and out (GRAD_WRT), which leave the selection of one-token chunks unchanged",
    "top_m": "top-m of the logits: a 1e-3 step of x, query or key can swap two keys; checked w.r.t. value and out "
    "(GRAD_WRT), which leave the selection unchanged",
    "hcam": "top-k of the chunk relevance from q and k: a 1e-3 step of x, query or key can swap two chunks; checked "
    "w.r.t. value and out (GRAD_WRT), which leave the selection unchanged",
    "dma": "top-k of the key bias A softplus(v W): at A = 0 (its initial value) every bias is 0, and a 1e-3 step of A "
    "breaks the ties into another selection; checked w.r.t. the other parameters (GRAD_WRT), which keep the bias 0",
    "hyper": "angular-LSH buckets (signs of q . p, k . p) and the sorted blocks they give: a 1e-3 step of x, query "
    "or key can move a token to another bucket; checked w.r.t. value and out (GRAD_WRT), which leave the hashing "
    "unchanged (the samples come from the fixed seed)",
    "sparsifiner": "top-k of the predictor's approximate attention (sparse basis with exact ties at 0): a 1e-3 step "
    "of x, query, key or the predictor can swap two keys; checked w.r.t. value and out (GRAD_WRT)",
    "sdim": "SimHash signatures (signs of x . R, no projections): a 1e-3 step of x moves a token to another bucket; "
    "checked w.r.t. out (GRAD_WRT), which leaves the hashing unchanged",
    "focus_detr": "top-k foreground tokens by the scorer, with a straight-through gate into the scorer (by design "
    "not the finite difference); checked w.r.t. query, key, value and out (GRAD_WRT), which leave the selection "
    "unchanged; tests/cross/test_focus_detr.py checks that the scorer gets a gradient",
}
# Mechanisms whose gradient check is restricted to these top-level parameters (x and the others held fixed):
# perturbing the rest moves a discrete selection across a tie within the finite-difference step.
GRAD_WRT: dict[str, tuple[str, ...]] = {
    "attention_gate": ("query", "key", "value", "out"),
    "sea": (
        "value",
        "out",
        "encoder",
        "encoder_norm",
        "decoder_rows",
        "decoder_norm_in",
        "decoder_conv1",
        "decoder_conv2",
        "decoder_conv_out",
        "scales",
        "value_positions",
    ),
    "seqboat": ("gau_out_kernel", "gau_out_bias", "skip_kernel", "skip_bias"),
    "spatial_sparse": ("value", "out", "gate"),
    "flexprefill": ("value", "out"),
    "seer": ("value", "out"),
    "longheads": ("value", "out"),
    "top_m": ("value", "out"),
    "dma": ("query", "key", "value", "out", "dt_proj"),
    "hcam": ("value", "out"),
    "hyper": ("value", "out"),
    "sparsifiner": ("value", "out"),
    "focus_detr": ("query", "key", "value", "out"),
    "sdim": ("out",),
}

# Mechanisms whose GQA is by design not MHA with repeated kv heads (the GQA identity check is left out for them).
GQA_NOT_REPEATED_MHA: dict[str, str] = {
    "spatial_sparse": "block selection is shared by the query heads of a kv group (scores summed over the group)",
    "s2_attention": "the query heads of a kv group share its kv head's sparsity pattern",
}

# Mechanisms whose captured attention_weights rows do not sum to 1 by design (checked to lie in [0, 1] instead).
WEIGHTS_NOT_NORMALIZED: dict[str, str] = {
    "clipped_softmax": "clip((zeta - gamma) p + gamma, 0, 1) stretches and clips the softmax rows",
    "sdim": "SimHash collision counts over their l2 norm (the paper) or over the number of hashes, not a softmax",
}

# Mechanisms whose dropout_rate (a common option, set by the models for every layer) has nothing to act on: they
# compute no attention probabilities, and their papers define no dropout inside the layer. The test checks they
# stay deterministic; it does not ask dropout to change their output.
DROPOUT_HAS_NO_TARGET: dict[str, str] = {
    "linear": "kernelised linear attention: no probability matrix",
    "flowformer": "flow attention: no probability matrix",
    "hedgehog": "feature-map linear attention: no probability matrix",
    "lightning": "decayed linear attention: no probability matrix",
    "rala": "rank-augmented linear attention: no probability matrix",
    "transnormer": "NormAttention (the default): no probability matrix",
    "titans-lmm": "the memory-only variant has no attention at all",
    "hyper": "HyperAttention defines no attention dropout (official code); its block part runs in the block-sparse "
    "core, which has none",
}

# Known, open failures of a check for one case: (check, case id) -> why. The test is marked xfail(strict=True), so
# it keeps running and fails loudly once the mechanism is fixed (then delete the entry).
KNOWN_FAILURES: dict[tuple[str, str], str] = {
    ("causal", "hyper"): "by design: the lower half's queries are sorted by their LSH buckets into blocks, so a later "
    "query's bucket moves an earlier query of that half to another block of keys (a prefill method, as the official "
    "code); later keys and values never reach earlier queries (tests/sparse/test_hyper.py)",
    ("bf16", "spatial_sparse"): "relative error 0.07 vs the baseline's 0.005: likely the top-k block selection on "
    "bf16 scores picking other blocks (not verified)",
    ("bf16", "flexprefill"): "relative error 0.03 vs the baseline's 0.005: bf16 q and k move the cumulative-attention "
    "budgets across their thresholds (verified: with min_budget=4, every block kept, the error is 0.003)",
    ("bf16", "top_m"): "relative error 0.045 vs the baseline's 0.005: likely bf16 q and k reordering close logits so "
    "another top 3 of the 8 keys is kept (not verified)",
    ("bf16", "hcam"): "relative error 0.045, the same as top_m's: with one-token chunks and top_k 3 hcam is top-3 "
    "attention (chunk means are the keys, the mixture weights the softmax over the 3 logits), same likely cause",
    ("causal", "seer"): "by design: a query block's gate score pools all its queries and every key of a visible key "
    "block (avg/max/min), so later tokens change which blocks earlier queries of the block see (a prefill method, as "
    "the official code); the attention itself is causal at token level (tests/sparse/test_seer.py)",
    ("causal", "flexprefill"): "by design: every query block's pattern is chosen from the last query block's "
    "attention (a prefill method), so later tokens change which blocks earlier queries see; the attention itself is "
    "causal at token level (tests/sparse/test_flexprefill.py)",
}

# Smaller finite-difference steps where the default 1e-3 measures the step, not the gradient: for mechanisms with
# kinks (ReLU, max-pooling) a step crosses a kink and the quotient is off by 1% (class_semantic's ReLUs) or 9%
# (dual_attention's max-pooled guide); density_adaptive's product of Gaussian densities is so curved that the
# central difference's O(h^2) error is 0.2% at 1e-3. At 1e-4 / 1e-5 (float64, rounding ~1e-11) the checks pass.
GRAD_EPS: dict[str, float] = {"class_semantic": 1e-5, "dual_attention": 1e-5, "density_adaptive": 1e-4}

# Mechanisms with some stage computed in float32 even when the layer is asked for float64 (measured by
# test_float64_is_computed_in_float64, which fails if a mechanism not listed here does it, or a listed one stops).
FLOAT32_STAGES = frozenset(
    "agent attentive_pooling cape cca combiner criss_cross deberta dilated_neighborhood ela "
    "generalized_neighborhood gin_attention halo hedgehog hilo lightning low_rank_pooling moh "
    "neighborhood polarized rala rcmha relative_music ripo seqboat softplus spatial_sparse "
    "tensor_attention transnormer ulsam "
    # measured, not yet traced to their float32 stage
    "attention_gate focus_detr moda".split()
)

ALL_CHECKS = ("causal", "decode", "gqa", "jit", "dropout", "bf16", "grads", "axis_names", "interventions")


@dataclasses.dataclass(frozen=True)
class Case:
    """One mechanism configuration of the matrix.

    Attributes:
      name: registry name.
      options: build options beyond the input kind's defaults.
      label: test id suffix of a variant (None for the mechanism's default case).
      checks: which checks run (a variant case names the claims its variant changes).
    """

    name: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    label: str | None = None
    checks: tuple[str, ...] = ALL_CHECKS

    @property
    def id(self) -> str:
        return self.name if self.label is None else f"{self.name}-{self.label}"

    def __str__(self) -> str:
        return self.id

    @property
    def spec(self) -> attn.registry.MechanismSpec:
        return attn.get(self.name)

    @property
    def kind(self) -> str:
        return self.spec.input_kind

    @property
    def shape(self) -> tuple[int, ...]:
        return SHAPES[self.kind]

    def build_options(self, **overrides: Any) -> dict[str, Any]:
        """Options for attn.build: kind defaults, then OPTIONS[name], then this case's options, then overrides."""
        return {**DEFAULT_OPTIONS[self.kind], **OPTIONS.get(self.name, {}), **self.options, **overrides}


# Variants whose code paths differ in a checked claim.
VARIANTS = (
    # titans: mac and mal/lmm take another route through memory and attention (and dropout).
    Case("titans", {"variant": "mac"}, "mac", ("causal", "jit", "dropout")),
    Case("titans", {"variant": "mal"}, "mal", ("causal", "decode", "dropout")),
    Case("titans", {"variant": "lmm"}, "lmm", ("causal", "dropout")),
    # attentive_pooling's multihead variant is a separate code path from efficient probing.
    Case("attentive_pooling", {"variant": "multihead"}, "multihead", ("jit", "dropout", "bf16", "grads")),
    # modality_mutual with an image (tokens 1..3) that sees the prompt (4..5): image rows see later tokens by design
    Case(
        "modality_mutual",
        {"image_start": 1, "image_tokens": 3, "prompt_tokens": 2},
        "image",
        ("gqa", "jit", "dropout", "bf16", "grads", "interventions"),
    ),
    # moda with visual tokens 1..3 whose keys take the Gram of all text keys (later text too, as in the official
    # code) and a mask that hides them from text queries
    Case(
        "moda",
        {"image_start": 1, "image_tokens": 3, "modality_mask": (True, False, True, True)},
        "image",
        ("gqa", "jit", "dropout", "bf16", "grads", "axis_names", "interventions"),
    ),
)


def cases() -> list[Case]:
    """One case per registered mechanism, then the variant cases."""
    return [Case(name) for name in attn.list_mechanisms()] + list(VARIANTS)


def bf16_values(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Standard normal float32 values that are exactly representable in bfloat16 (top 16 bits kept)."""
    values = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return (values.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
