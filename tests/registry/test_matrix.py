"""Every claim of every registered mechanism's spec, checked over `attn.list_mechanisms()` (cases: matrix_cases.py).

A mechanism is checked the moment it is registered; a check is skipped only where its spec does not make the claim,
and a spec that claims what its mechanism cannot do fails.

1. causal (supports_causal): replacing the tokens from position t on changes no output before t and does change
   some output from t on (spatial layers: option causal=True, tokens in raster order).
2. decode (supports_decode): token-by-token decoding, and a 5-token prefill then single tokens, equal the full causal
   forward (fp32: atol 2e-5 * max(1, max|y|), rtol 1e-5), from the zero cache sized by x that the creating decode
   call makes (Flax convention; attn.models.init_cache makes the same).
3. GQA/MQA (supports_gqa): num_heads=4 with num_kv_heads=2 and 1 runs with the right output shape, every
   parameter with a "kv_heads" axis has kv_heads entries on it, the key/value parameters carry no "heads" axis,
   and the layer equals the num_kv_heads=None layer whose kv-head parameters repeat each kv head for its group
   (query head h reads kv head h // (num_heads // num_kv_heads), the jax.nn.dot_product_attention layout; left out
   where matrix_cases.GQA_NOT_REPEATED_MHA says GQA differs by design).
4. jit: jax.jit of apply equals the eager apply.
5. dropout (every mechanism with a dropout_rate option): dropout_rate=0.5 with deterministic=True equals
   dropout_rate=0 bit for bit with the same parameters; with deterministic=False and a dropout rng it differs.
6. bf16 (every mechanism): dtype=bfloat16 (parameters float32) on the same input (bf16-exact values) returns
   bfloat16, finite, with err = max|y_bf16 - y_fp32| / max|y_fp32| <= 4 * err_softmax + 1e-2, where err_softmax is
   the same ratio of the `softmax` layer (4 heads of 4) on the same tokens. Fairness: FlashAttention's criterion
   (2x the reference run in the same precision, plus 1e-3) compares two implementations of one function; here
   different functions are compared to one baseline, and a mechanism with a few more bf16 stages (gates, norms,
   feature maps, a recurrence) legitimately rounds a few more times, hence 4x plus 1e-2 of the output scale. A layer
   that ignores dtype fails on the output dtype; NaN or inf fails; a layer that computes in a narrower format or
   rounds far more often than its stages warrant fails the bound.
7. grads: jax.test_util.check_grads (order 1, reverse mode, eps 1e-3, tolerance 1e-3) w.r.t. x and every
   parameter with dtype=param_dtype=float64 (matrix_cases.GRAD_WRT restricts it for discrete selections, GRAD_NOTES
   says why). The tolerance is 1e-3, not float64's 1e-5, because stages that compute in float32 whatever the dtype
   leave finite differences float32-exact; test_float64_is_computed_in_float64 lists those mechanisms.
8. logical axis names: init boxes every leaf of "params" in nn.Partitioned with one name per axis, each from
   AXIS_NAMES (or None: replicated).
9. interventions: see the section at the end.

Cost: one eager init per case, cached for the module; the base forward and the cheap checks run eagerly (flax ops
compile once per shape and are shared across mechanisms); decode, dropout with an rng, bf16 and float64 run jitted
(one compile each beats compiling a fresh mechanism's ops one by one).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from matrix_cases import (
    CALL_ARGUMENTS,
    CONTEXT_LENGTH,
    DROPOUT_HAS_NO_TARGET,
    FEATURES,
    FLOAT32_STAGES,
    GQA_NOT_REPEATED_MHA,
    GRAD_EPS,
    GRAD_NOTES,
    GRAD_WRT,
    KNOWN_FAILURES,
    WEIGHTS_NOT_NORMALIZED,
    Case,
    bf16_values,
    cases,
)

import attn

CASES = cases()
BY_ID = {case.id: case for case in CASES}
CAUSAL = attn.Mask(causal=True)

# The project's logical axis vocabulary (DESIGN: embed, heads, kv_heads, head_dim, mlp, vocab, batch, length; the
# channel family's convolution and subspace axes; relative-position tables).
AXIS_NAMES = frozenset(
    {
        "embed",
        "heads",
        "kv_heads",
        "head_dim",
        "mlp",
        "vocab",
        "batch",
        "length",
        "channels",
        "hidden",
        "subspaces",
        "condition",
        "conv_in",
        "conv_height",
        "conv_width",
        "modes_height",
        "modes_width",
        "relative_distance",
        "relative_features",
    }
)


def require(case: Case, check: str) -> None:
    if check not in case.checks:
        pytest.skip(f"the {case.id} variant case runs only {', '.join(case.checks)}")


def is_box(leaf: Any) -> bool:
    return isinstance(leaf, nn.Partitioned)


def call_arguments(case: Case, *, causal: bool, dtype: Any = jnp.float32) -> dict[str, Any]:
    """The keyword arguments of the uniform call for this case's input kind (channels: only their extras)."""
    kwargs = {key: jnp.asarray(value, dtype) for key, value in CALL_ARGUMENTS.get(case.name, {}).items()}
    if case.kind == "channels":
        return kwargs
    kwargs["deterministic"] = True
    if case.kind in ("sequence", "cross") and causal:
        kwargs["mask"] = CAUSAL
    if case.kind == "cross":
        context = bf16_values((case.shape[0], CONTEXT_LENGTH, FEATURES), seed=3)
        kwargs["context"] = jnp.asarray(context, dtype)
    return kwargs


@dataclasses.dataclass
class Prepared:
    """A case's layer, its parameters and its base forward.

    x: the input (case.shape, float32, bf16-exact); params: {"params": unboxed}; boxed: init's params with their
    boxes; kwargs: the call arguments of the base forward (causal mask where claimed); y: layer.apply(params, x).
    """

    layer: nn.Module
    x: jax.Array
    params: dict[str, Any]
    boxed: Any
    kwargs: dict[str, Any]
    y: jax.Array

    def apply(self, x: jax.Array | None = None, layer: nn.Module | None = None, **kwargs: Any) -> jax.Array:
        return (layer or self.layer).apply(self.params, self.x if x is None else x, **{**self.kwargs, **kwargs})


@functools.cache
def prepared(case_id: str) -> Prepared:
    case = BY_ID[case_id]
    layer = attn.build(case.name, **case.build_options())
    x = jnp.asarray(bf16_values(case.shape, seed=0))
    kwargs = call_arguments(case, causal=case.spec.supports_causal)
    variables = layer.init(jax.random.key(0), x, **kwargs)
    params = {"params": nn.unbox(variables["params"])}
    return Prepared(layer, x, params, variables["params"], kwargs, layer.apply(params, x, **kwargs))


def scale_of(y: jax.Array) -> float:
    return max(1.0, float(jnp.max(jnp.abs(y))))


def tokens_of(y: jax.Array, kind: str) -> jax.Array:
    """[B, N, ...] with the token axes flattened (raster order for spatial inputs)."""
    return y.reshape(y.shape[0], -1, y.shape[-1]) if kind == "spatial" else y


def jitted(layer: nn.Module, swap: bool = False, **kwargs: Any) -> Any:
    """jax.jit of `layer.apply(variables, x, **kwargs)` (arguments (x, variables) if swap), the kwargs closed over."""
    if swap:
        return jax.jit(lambda x, variables: layer.apply(variables, x, **kwargs))
    return jax.jit(lambda variables, x, **rngs: layer.apply(variables, x, **kwargs, **rngs))


def case_params(ids: list[str] | None = None, *, check: str | None = None) -> list[Any]:
    """pytest params of the cases; with `check`, the KNOWN_FAILURES of that check are marked xfail(strict)."""
    params = []
    for case in CASES:
        if ids is not None and case.id not in ids:
            continue
        reason = KNOWN_FAILURES.get((check, case.id))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(case, id=case.id, marks=marks))
    return params


# ---------------------------------------------------------------------------------------------------- 1. causality
@pytest.mark.parametrize("case", case_params(check="causal"))
def test_causal_claim(case):
    require(case, "causal")
    spec = case.spec
    if not spec.supports_causal:
        pytest.skip(f"{case.name} does not claim supports_causal")
    assert case.kind in ("sequence", "cross", "spatial"), (
        f"{case.name} claims supports_causal, but its input kind {case.kind!r} has no token order"
    )
    p = prepared(case.id)
    layer = p.layer
    if case.kind == "spatial":
        assert "causal" in spec.options, f"spatial {case.name} claims supports_causal but has no 'causal' option"
        layer = attn.build(case.name, **case.build_options(causal=True))
    base = tokens_of(p.apply(layer=layer), case.kind)
    flat = tokens_of(p.x, case.kind)
    other = jnp.asarray(bf16_values(flat.shape, seed=7))
    scale = scale_of(base)
    for cut in (3, flat.shape[1] // 2 + 1):
        changed = flat.at[:, cut:].set(other[:, cut:]).reshape(p.x.shape)
        out = tokens_of(p.apply(changed, layer=layer), case.kind)
        past = float(jnp.max(jnp.abs(out[:, :cut] - base[:, :cut])))
        future = float(jnp.max(jnp.abs(out[:, cut:] - base[:, cut:])))
        assert past <= 1e-6 * scale, f"tokens from {cut} on change outputs before {cut} by {past:.3g}"
        assert future > 1e-4 * scale, f"tokens from {cut} on change no output from {cut} on (max change {future:.3g})"


# ---------------------------------------------------------------------------------------------------- 2. decode
def decode_in_pieces(p: Prepared, pieces: tuple[int, ...]) -> jax.Array:
    """Feeds x in pieces of the given sizes through a zero cache sized by x (what the creating decode call, Flax's
    convention, and attn.models.init_cache make)."""
    step = jitted(p.layer, **p.kwargs, decode=True, mutable=["cache"])
    shapes = jax.eval_shape(step, p.params, p.x)[1]["cache"]
    cache, outs, start = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), [], 0
    for size in pieces:
        y, state = step({**p.params, "cache": cache}, p.x[:, start : start + size])
        outs.append(y)
        cache, start = state["cache"], start + size
    assert start == p.x.shape[1]
    return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("case", case_params())
def test_decode_claim(case):
    require(case, "decode")
    spec = case.spec
    if not spec.supports_decode:
        pytest.skip(f"{case.name} does not claim supports_decode")
    assert case.kind in ("sequence", "cross"), f"{case.name} claims supports_decode for input kind {case.kind!r}"
    assert spec.supports_causal, f"{case.name} claims supports_decode but not supports_causal"
    p = prepared(case.id)
    length = p.x.shape[1]
    for pieces in ((1,) * length, (5,) + (1,) * (length - 5)):
        np.testing.assert_allclose(
            decode_in_pieces(p, pieces), p.y, atol=2e-5 * scale_of(p.y), rtol=1e-5, err_msg=f"pieces={pieces}"
        )


# ---------------------------------------------------------------------------------------------------- 3. GQA / MQA
def gqa_params(mha_boxed: Any, gqa_boxed: Any, kv_heads: int) -> tuple[Any, Any]:
    """(GQA parameters, the MHA parameters that repeat them): the GQA tree takes the first kv_heads entries of each
    "kv_heads" axis of the MHA parameters; the MHA tree repeats each of them num_heads // kv_heads times."""

    def pair(path, mha, gqa):
        value = np.asarray(mha.value)
        axes = [i for i, name in enumerate(gqa.names) if name == "kv_heads"]
        expected = tuple(kv_heads if i in axes else n for i, n in enumerate(value.shape))
        assert tuple(gqa.value.shape) == expected, (
            f"{jax.tree_util.keystr(path)}: num_kv_heads={kv_heads} gives shape {gqa.value.shape}; expected "
            f"{expected} (only axes named 'kv_heads' may depend on num_kv_heads)"
        )
        small = value
        for axis in axes:
            small = np.take(small, np.arange(kv_heads), axis=axis)
        large = small
        for axis in axes:
            large = np.repeat(large, value.shape[axis] // kv_heads, axis=axis)
        return small, large

    mha_leaves, treedef = jax.tree_util.tree_flatten(mha_boxed, is_leaf=is_box)
    gqa_leaves, gqa_treedef = jax.tree_util.tree_flatten_with_path(gqa_boxed, is_leaf=is_box)
    assert treedef == jax.tree_util.tree_structure(gqa_boxed, is_leaf=is_box), (
        f"num_kv_heads={kv_heads} changes the parameter tree: {gqa_treedef} vs {treedef}"
    )
    pairs = [pair(path, m, g) for (path, g), m in zip(gqa_leaves, mha_leaves, strict=True)]
    small = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(s) for s, _ in pairs])
    large = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(m) for _, m in pairs])
    return {"params": small}, {"params": large}


@pytest.mark.parametrize("case", case_params())
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_gqa_claim(case, kv_heads):
    require(case, "gqa")
    spec = case.spec
    if case.kind not in ("sequence", "spatial", "cross"):
        pytest.skip(f"GQA is a claim of the sequence, spatial and cross kinds ({case.name} is {case.kind!r})")
    if not getattr(spec, "supports_gqa", True):
        pytest.skip(f"{case.name} does not claim supports_gqa")
    assert "num_kv_heads" in spec.options, f"{case.name} claims supports_gqa but has no num_kv_heads option"
    p = prepared(case.id)
    layer = attn.build(case.name, **case.build_options(num_kv_heads=kv_heads))
    boxed = jax.eval_shape(functools.partial(layer.init, **p.kwargs), jax.random.key(0), p.x)["params"]
    leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=is_box)[0]
    kv_axes = [(jax.tree_util.keystr(path), leaf) for path, leaf in leaves if "kv_heads" in leaf.names]
    assert kv_axes, f"{case.name} claims supports_gqa but no parameter has a 'kv_heads' axis"
    for path, leaf in leaves:
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        if {"key", "value"} & set(keys):
            assert "heads" not in leaf.names, f"{jax.tree_util.keystr(path)} names a 'heads' axis; expected 'kv_heads'"
    small, large = gqa_params(p.boxed, boxed, kv_heads)
    y = layer.apply(small, p.x, **p.kwargs)
    assert y.shape == p.y.shape and bool(jnp.all(jnp.isfinite(y)))
    if case.name in GQA_NOT_REPEATED_MHA:
        return  # by design (matrix_cases.GQA_NOT_REPEATED_MHA)
    expected = p.layer.apply(large, p.x, **p.kwargs)
    np.testing.assert_allclose(y, expected, atol=2e-5 * scale_of(expected), rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- 4. jit
@pytest.mark.parametrize("case", case_params())
def test_jit_equals_eager(case):
    require(case, "jit")
    p = prepared(case.id)
    y = jax.jit(lambda params, x: p.layer.apply(params, x, **p.kwargs))(p.params, p.x)
    np.testing.assert_allclose(y, p.y, atol=1e-6 * scale_of(p.y), rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- 5. dropout
def dropout_cases() -> list[Any]:
    return [c for c in case_params() if "dropout_rate" in c.values[0].spec.options]


@pytest.mark.parametrize("case", dropout_cases())
def test_dropout_is_off_when_deterministic(case):
    require(case, "dropout")
    p = prepared(case.id)
    layer = attn.build(case.name, **case.build_options(dropout_rate=0.5))
    np.testing.assert_array_equal(p.apply(layer=layer, deterministic=True), p.y)


@pytest.mark.parametrize("case", dropout_cases())
def test_dropout_applies_when_not_deterministic(case):
    require(case, "dropout")
    if case.id in DROPOUT_HAS_NO_TARGET:
        pytest.skip(f"{case.id}: {DROPOUT_HAS_NO_TARGET[case.id]}")
    p = prepared(case.id)
    layer = attn.build(case.name, **case.build_options(dropout_rate=0.5))
    y = jitted(layer, **{**p.kwargs, "deterministic": False})(p.params, p.x, rngs={"dropout": jax.random.key(5)})
    assert y.shape == p.y.shape and bool(jnp.all(jnp.isfinite(y)))
    assert float(jnp.max(jnp.abs(y - p.y))) > 1e-5 * scale_of(p.y), "dropout_rate=0.5 changes nothing"


# ---------------------------------------------------------------------------------------------------- 6. bf16 vs fp32
def relative_bf16_error(y32: jax.Array, layer16: nn.Module, params: Any, x: jax.Array, **kwargs: Any) -> float:
    """max|y_bf16 - y32| / max|y32| for y32 the float32 output on x; asserts the bf16 dtype and finiteness."""
    kwargs16 = {k: v.astype(jnp.bfloat16) if isinstance(v, jax.Array) else v for k, v in kwargs.items()}
    y16 = jitted(layer16, **kwargs16)(params, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16, f"dtype=bfloat16 returns {y16.dtype}"
    assert bool(jnp.all(jnp.isfinite(y16))), "dtype=bfloat16 gives NaN or inf"
    return float(jnp.max(jnp.abs(y16.astype(jnp.float32) - y32)) / jnp.max(jnp.abs(y32)))


@functools.cache
def softmax_bf16_error(tokens: int) -> float:
    """The baseline: the relative bf16 error of the `softmax` layer (4 heads of 4) on [2, tokens, 16] inputs."""
    x = jnp.asarray(bf16_values((2, tokens, FEATURES), seed=0))
    layer = attn.build("softmax", num_heads=4, head_dim=4)
    params = {"params": nn.unbox(layer.init(jax.random.key(0), x)["params"])}
    layer16 = attn.build("softmax", num_heads=4, head_dim=4, dtype=jnp.bfloat16)
    return relative_bf16_error(layer.apply(params, x), layer16, params, x)


@pytest.mark.parametrize("case", case_params(check="bf16"))
def test_bf16_error_is_within_the_softmax_baseline(case):
    require(case, "bf16")
    p = prepared(case.id)
    layer16 = attn.build(case.name, **case.build_options(dtype=jnp.bfloat16))
    error = relative_bf16_error(p.y, layer16, p.params, p.x, **p.kwargs)
    baseline = softmax_bf16_error(math.prod(p.x.shape[1:-1]))
    assert error <= 4 * baseline + 1e-2, f"bf16 relative error {error:.3g}; softmax baseline {baseline:.3g}"


# ---------------------------------------------------------------------------------------------------- 7. gradients
@functools.cache
def float64_forward(case_id: str) -> tuple[Any, jax.Array, Any]:
    """(forward, x, params) of the case with dtype=param_dtype=float64: forward(x, params) jitted. Use (and call)
    inside jax.enable_x64(True)."""
    case, p = BY_ID[case_id], prepared(case_id)
    layer = attn.build(case.name, **case.build_options(dtype=jnp.float64, param_dtype=jnp.float64))
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p.params)
    kwargs = call_arguments(case, causal=case.spec.supports_causal, dtype=jnp.float64)
    return jitted(layer, **kwargs, swap=True), jnp.asarray(p.x, jnp.float64), params


@pytest.mark.slow  # float64 compiles of every mechanism: ~2 min on 2 cores; CI runs it after the default run
@pytest.mark.parametrize("case", case_params(check="grads"))
def test_gradients_match_finite_differences(case):
    require(case, "grads")
    with jax.enable_x64(True):
        forward, x, params = float64_forward(case.id)
        assert forward(x, params).dtype == jnp.float64
        function, args = forward, (x, params)
        if case.name in GRAD_WRT:  # matrix_cases.GRAD_NOTES says why
            names = GRAD_WRT[case.name]
            rest = {k: v for k, v in params["params"].items() if k not in names}
            function = lambda chosen: forward(x, {"params": {**rest, **chosen}})  # noqa: E731
            args = ({k: params["params"][k] for k in names},)
        try:
            eps = GRAD_EPS.get(case.name, 1e-3)
            check_grads(function, args, order=1, modes=("rev",), eps=eps, atol=1e-3, rtol=1e-3)
        except AssertionError as error:
            note = GRAD_NOTES.get(case.name)
            raise AssertionError(f"{error}\n({case.name}: {note})" if note else str(error)) from None


@pytest.mark.slow
def test_float64_is_computed_in_float64():
    """Central differences along one input direction at steps 1e-4 and 1e-6 agree to 1e-4 in float64 arithmetic
    (truncation error O(h^2): ~3e-6 at 1e-4 for titans' strongly curved memory, whose gap at 1e-3 is 3e-4; rounding
    ~1e-10); a float32 stage inside makes the small step's quotient noise of ~1e-7 / 1e-6 = 1e-1 (and the gradient
    check above only as exact as its 1e-3 tolerance). One test over every case, listing the mechanisms that compute
    some stage in float32 when asked for float64."""
    gaps = {}
    with jax.enable_x64(True):
        for case in CASES:
            if "grads" not in case.checks:
                continue
            forward, x, params = float64_forward(case.id)
            direction = jnp.asarray(np.random.default_rng(11).standard_normal(x.shape))
            steps = [
                (forward(x + h * direction, params) - forward(x - h * direction, params)) / (2 * h)
                for h in (1e-4, 1e-6)
            ]
            gaps[case.id] = float(jnp.max(jnp.abs(steps[0] - steps[1])) / jnp.max(jnp.abs(steps[0])))
    bad = {name: f"{gap:.1g}" for name, gap in gaps.items() if gap > 1e-4}
    new = {name: gap for name, gap in bad.items() if name.split("-")[0] not in FLOAT32_STAGES}
    fixed = sorted(FLOAT32_STAGES - {name.split("-")[0] for name in bad})
    assert not new, f"dtype=float64 is computed (partly) in float32 by {new} (not in FLOAT32_STAGES)"
    assert not fixed, f"{fixed} now compute in float64: remove them from matrix_cases.FLOAT32_STAGES"


# ---------------------------------------------------------------------------------------------------- 8. axis names
@pytest.mark.parametrize("case", case_params())
def test_parameters_carry_logical_axis_names(case):
    require(case, "axis_names")
    leaves = jax.tree_util.tree_flatten_with_path(prepared(case.id).boxed, is_leaf=is_box)[0]
    assert leaves, f"{case.name} has no parameters"
    for path, leaf in leaves:
        where = jax.tree_util.keystr(path)
        assert is_box(leaf), f"{where} is not boxed with logical axis names (nn.with_logical_partitioning)"
        assert len(leaf.names) == leaf.value.ndim, f"{where}: names {leaf.names} for shape {leaf.value.shape}"
        unknown = [name for name in leaf.names if name is not None and name not in AXIS_NAMES]
        assert not unknown, f"{where}: axis names {unknown} are not in the project's vocabulary {sorted(AXIS_NAMES)}"


# ---------------------------------------------------------------------------------------------------- 9. interventions
# attn.interventions: capture under the standard names, and an intervention block without rules changes nothing.
def sown(tree: Any, name: str) -> list[jax.Array]:
    """Every value sown under `name` anywhere in an "intermediates" tree (sow stores tuples)."""
    found = []
    for key, value in tree.items():
        if key == name:
            found.extend(value)
        elif isinstance(value, dict):
            found.extend(sown(value, name))
    return found


@pytest.mark.parametrize("case", case_params())
def test_intervention_without_rules_is_bit_identical(case):
    require(case, "interventions")
    p = prepared(case.id)
    with attn.intervene():
        np.testing.assert_array_equal(p.apply(), p.y)


@pytest.mark.parametrize("case", case_params())
def test_attention_weights_are_captured(case):
    require(case, "interventions")
    if not getattr(case.spec, "has_attention_weights", False):
        pytest.skip(f"{case.name} does not claim has_attention_weights")
    p = prepared(case.id)
    y, state = p.layer.apply(p.params, p.x, mutable=["intermediates"], **p.kwargs)
    np.testing.assert_array_equal(y, p.y)
    weights = sown(state.get("intermediates", {}), "attention_weights")
    assert len(weights) == 1, f"expected one sown 'attention_weights', found {len(weights)}"
    (w,) = weights
    tokens = math.prod(p.x.shape[1:-1])
    heads = case.build_options()["num_heads"]
    keys = CONTEXT_LENGTH if case.kind == "cross" else tokens  # cross-attention's keys are the context's tokens
    assert w.shape == (p.x.shape[0], heads, tokens, keys), f"attention_weights shape {w.shape}"
    assert bool(jnp.all(w >= 0)), "attention weights must be non-negative"
    if case.name in WEIGHTS_NOT_NORMALIZED:
        assert bool(jnp.all(w <= 1)), f"{case.name}'s attention weights must lie in [0, 1]"
    else:
        np.testing.assert_allclose(jnp.sum(w, axis=-1), 1.0, atol=1e-5)  # the causal mask leaves no row empty
