"""Inference-time interventions on attention: change, ablate, patch or capture a layer's attention without touching
its parameters or the model's code. `attn.intervene` is `intervene` below.

    with attn.intervene(ablate_heads(layers=[2], heads=[0, 5])):
        logits = model.apply(variables, tokens)

    with attn.intervene(add_to_logits(layers=[1], keys=(3, 7), value=2.0)):     # steer toward keys 3..6
        logits = model.apply(variables, tokens)

    out, cache = run_with_cache(model, variables, clean_tokens)                  # TransformerLens-style
    with attn.intervene(patch(cache, "head_outputs", layers=[3], heads=[1])):   # activation patching
        patched = model.apply(variables, corrupted_tokens)

What a rule acts on. Every layer built on the template (attn/core/layer.py) has the stage `head_outputs`
([batch, q_len (or *spatial), heads, head_dim]: the per-head outputs that enter the output projection). Layers
that compute an attention probability matrix (spec `has_attention_weights`: the softmax family, on the pipeline of
attn/core/softmax_layer.py) also have `attention_logits` (masked, -inf where masked) and `attention_weights`
([batch, heads, q_len, kv_len]), and the captures `key_mass` [batch, heads, kv_len] and `lse` [batch, heads, q_len].
A rule that needs logits or weights raises a ValueError on a layer without them (linear, recurrent, spatial), and
moves the calls it touches from the fused path (flash kernel, cuDNN) to the explicit stages, logging once.

Selecting. `layers`: None (every attention layer), layer indices (the `layers_<i>` component of the module path,
as the models name their blocks), or module-path patterns (fnmatch on "layers_3/attention"-style paths, e.g.
"*/cross_attention"). `module`: a path pattern the module path must match (default "*", every attention layer; use
"*/attention" for self-attention only). `heads`: None or head indices. `queries`/`keys`: None, an index, a
(start, stop) range, or a tuple of indices, in absolute positions (the cache index is added while decoding).

How it works, and the jit rule. `intervene` installs a `flax.linen.intercept_methods` interceptor that applies the
rules to the stage methods' outputs, in the order given (rules compose; nested blocks add rules), and it makes the
rules part of `jax.jit`'s cache key (`jax.make_user_context`): a function jitted and traced *before* the block is
re-traced inside it, never silently replayed without the rules, and re-traced again after the block. Both of these
are therefore safe:

    f = jax.jit(lambda v, t: model.apply(v, t))
    with attn.intervene(rule):
        f(variables, tokens)                      # re-traced with the rule

    @jax.jit
    def g(v, t):
        with attn.intervene(rule):                # rules entered inside the traced function
            return model.apply(v, t)

Captures record what the model used, i.e. a stage's value after the rules on it (as TransformerLens's cache does);
`run_with_cache` returns them by module path. While a capture rule is active, layers record exactly what the
capture rules ask for (and only on the layers they select). A function compiled ahead of time (`.lower().compile()`)
before the block cannot re-trace and ignores the rules; patch sources become constants of the trace (for sweeps,
pass them as arguments of a jitted function that enters the block itself). Because the rule set keys the cache, an
*eager* forward (no jit) under many different rule sets compiles every primitive again for each set: wrap the model
call in one `jax.jit` (as above) when sweeping over heads, layers or strengths.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import fnmatch
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn.core import intervention_state
from attn.core.intervention_state import CAPTURE_NAMES, STAGES
from attn.core.layer import AttentionLayer

Array = jax.Array

__all__ = [
    "Rule",
    "ablate_heads",
    "add_to_logits",
    "capture",
    "hook",
    "intervene",
    "module_path",
    "patch",
    "run_with_cache",
    "scale_heads",
    "scale_weights",
    "set_temperature",
]

_LAYER_INDEX = re.compile(r"^layers_(\d+)$")
_HEAD_AXIS = {"attention_logits": 1, "attention_weights": 1, "head_outputs": -2}
_QUERY_AXIS = {"attention_logits": 2, "attention_weights": 2, "head_outputs": 1}


# ---------------------------------------------------------------------------------------------------- selection
def module_path(module: nn.Module) -> str:
    """The module's path in the model, "/"-joined (e.g. "layers_2/attention"); "" for a layer applied on its own
    (the key `run_with_cache` uses for it)."""
    return "/".join(module.path)


def _index_set(name: str, value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    values = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    for v in values:
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name}={value!r} must be None, a non-negative int or a sequence of them")
    return tuple(int(v) for v in values)


def _positions(name: str, value: Any) -> tuple[str, tuple[int, ...]] | None:
    """None | int | (start, stop) range | tuple/list of indices -> ("range", (start, stop)) or ("set", indices)."""
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return ("set", (int(value),))
    if isinstance(value, range):
        if value.step != 1:
            raise ValueError(f"{name}={value!r}: only ranges with step 1 are supported")
        return ("range", (value.start, value.stop))
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, (int, np.integer)) for v in value):
        start, stop = int(value[0]), int(value[1])
        if not 0 <= start < stop:
            raise ValueError(f"{name}={value!r} as a (start, stop) range needs 0 <= start < stop")
        return ("range", (start, stop))
    if isinstance(value, list):
        return ("set", _index_set(name, value))
    raise ValueError(
        f"{name}={value!r} must be None, an int, a (start, stop) tuple, a range, or a list of indices "
        "(a tuple of two ints is read as a range)"
    )


def _layers(value: Any) -> tuple[tuple[int, ...], tuple[str, ...]] | None:
    if value is None:
        return None
    values = (value,) if isinstance(value, (int, str, np.integer)) else tuple(value)
    indices, patterns = [], []
    for v in values:
        if isinstance(v, str):
            patterns.append(v)
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0:
            indices.append(int(v))
        else:
            raise ValueError(f"layers={value!r} must hold layer indices (ints >= 0) or module-path patterns (str)")
    return tuple(indices), tuple(patterns)


@dataclasses.dataclass(frozen=True, eq=False)
class Rule:
    """One intervention: a stage, a selection (layers, module pattern, heads, queries, keys) and an action.

    Build rules with the functions below (ablate_heads, add_to_logits, ...). Rules compare and hash by value (a
    patch source or a hook function by identity), and the jit cache key of an `intervene` block is the tuple of
    its rules, so re-creating an identical rule does not re-trace.
    """

    stage: str
    action: str
    layers: tuple[tuple[int, ...], tuple[str, ...]] | None = None
    module: str = "*"
    heads: tuple[int, ...] | None = None
    queries: tuple[str, tuple[int, ...]] | None = None
    keys: tuple[str, tuple[int, ...]] | None = None
    value: Any = None
    names: tuple[str, ...] = ()

    def _key(self) -> tuple[Any, ...]:
        value = self.value
        if isinstance(value, Mapping) or callable(value):
            value = ("id", id(value))
        return (
            self.stage,
            self.action,
            self.layers,
            self.module,
            self.heads,
            self.queries,
            self.keys,
            value,
            self.names,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rule) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    # -------------------------------------------------------------- selection
    def targets(self, module: Any) -> bool:
        return isinstance(module, AttentionLayer) and self.selects_path(tuple(module.path))

    def selects_path(self, parts: tuple[str, ...]) -> bool:
        """Whether the module at path `parts` is selected. A pattern matches the path or any of its prefixes
        ("layers_1" selects "layers_1/attention" and "layers_1/cross_attention")."""
        path = "/".join(parts)
        if not _match(path, self.module):
            return False
        if self.layers is None:
            return True
        indices, patterns = self.layers
        if any(_match(path, pattern) for pattern in patterns):
            return True
        layer = next((int(m.group(1)) for part in parts for m in [_LAYER_INDEX.match(part)] if m), None)
        return layer is not None and layer in indices

    def captures(self, name: str) -> bool:
        return self.action == "capture" and name in self.names

    # -------------------------------------------------------------- action
    def apply(self, value: Array, module: Any, call: Any = None) -> Array:
        if self.action == "capture":
            return value
        if self.action == "hook":
            out = self.value(value, module_path(module))
            if getattr(out, "shape", None) != value.shape:
                raise ValueError(
                    f"hook on {self.stage} of {module_path(module)} returned shape {getattr(out, 'shape', None)}, "
                    f"expected {value.shape}"
                )
            return jnp.where(self._selection(value, module, call), out.astype(value.dtype), value)
        where = self._selection(value, module, call)
        if self.action == "ablate":
            return jnp.where(where, jnp.zeros((), value.dtype), value)
        if self.action in ("scale", "temperature"):
            factor = self.value if self.action == "scale" else 1.0 / self.value
            return jnp.where(where, value * jnp.asarray(factor, value.dtype), value)
        if self.action == "add":
            return jnp.where(where, value + jnp.asarray(self.value, value.dtype), value)
        if self.action == "scale_weights":
            scaled = jnp.where(where, value * jnp.asarray(self.value, value.dtype), value)
            rows = jnp.sum(value, axis=-1, keepdims=True)  # renormalise each row to its original total mass
            new_rows = jnp.sum(scaled, axis=-1, keepdims=True)
            return jnp.where(new_rows > 0, scaled * (rows / jnp.where(new_rows > 0, new_rows, 1.0)), value)
        if self.action == "patch":
            source = self._source(module, value)
            return jnp.where(where, source.astype(value.dtype), value)
        raise AssertionError(self.action)

    def _selection(self, value: Array, module: Any, call: Any) -> Array:
        """Boolean mask broadcastable to `value`: the selected heads x queries x keys (positions from `call`)."""
        ndim = value.ndim
        where = jnp.ones((1,) * ndim, bool)
        head_axis = _HEAD_AXIS[self.stage] % ndim
        if self.heads is not None:
            heads = value.shape[head_axis]
            bad = [h for h in self.heads if h >= heads]
            if bad:
                raise ValueError(
                    f"heads={self.heads} selects head(s) {bad} of {module_path(module)}, which has {heads} heads"
                )
            where = where & _axis_mask(heads, ("set", self.heads), head_axis, ndim, 0)
        if self.queries is not None:
            if self.stage == "head_outputs" and ndim != 4:
                raise ValueError(f"queries= needs a sequence layer; {module_path(module)} has a spatial grid")
            where = where & _query_mask(value, self.stage, self.queries, call)
        if self.keys is not None:
            where = where & _key_mask(value, self.keys, call)
        return where

    def _source(self, module: Any, value: Array) -> Array:
        path = module_path(module)
        if path not in self.value:
            raise ValueError(
                f"patch source has no activations for {path!r}; it has {sorted(self.value)} (capture them with "
                "run_with_cache on the same model)"
            )
        captured = self.value[path]
        if self.stage not in captured:
            raise ValueError(f"patch source for {path!r} has {sorted(captured)}, not {self.stage!r}")
        source = captured[self.stage]
        if source.shape != value.shape:
            raise ValueError(
                f"patch source {self.stage} of {path!r} has shape {source.shape}, the run has {value.shape}; patch "
                "between inputs of the same shape"
            )
        return source


def _match(path: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, pattern.rstrip("/") + "/*")


def _hits(index: Array, selection: tuple[str, tuple[int, ...]]) -> Array:
    kind, values = selection
    if kind == "range":
        return (index >= values[0]) & (index < values[1])
    return jnp.isin(index, jnp.asarray(values))


def _axis_mask(size: int, selection: tuple[str, tuple[int, ...]], axis: int, ndim: int, offset: Any) -> Array:
    shape = [1] * ndim
    shape[axis] = size
    return _hits(offset + jnp.arange(size), selection).reshape(shape)


def _query_mask(value: Array, stage: str, selection: tuple[str, tuple[int, ...]], call: Any) -> Array:
    """Selected queries by absolute position: the call's q_positions [B, Tq] when the layer set them, else the
    query index plus the cache offset."""
    axis = _QUERY_AXIS[stage]
    positions = getattr(call, "q_positions", None)
    if positions is None or jnp.ndim(positions) != 2 or jnp.shape(positions)[-1] != value.shape[axis]:
        return _axis_mask(value.shape[axis], selection, axis, value.ndim, getattr(call, "q_offset", 0))
    hit = _hits(jnp.asarray(positions), selection)  # [B, Tq]
    return hit[:, None, :, None] if stage != "head_outputs" else hit[:, :, None, None]


def _key_mask(value: Array, selection: tuple[str, tuple[int, ...]], call: Any) -> Array:
    """Selected keys of logits/weights [B, H, Tq, Tk] by position: the call's kv_positions ([Tk], [B|1, Tk], or
    per kv head [B, KVH, Tk] for caches that keep different entries per head), else the key index."""
    positions = getattr(call, "kv_positions", None)
    tk = value.shape[-1]
    if positions is None or jnp.shape(positions)[-1] != tk:
        return _axis_mask(tk, selection, value.ndim - 1, value.ndim, 0)
    hit = _hits(jnp.asarray(positions), selection)
    if hit.ndim == 1:
        return hit[None, None, None, :]
    if hit.ndim == 2:
        return hit[:, None, None, :]
    return jnp.repeat(hit, value.shape[1] // hit.shape[1], axis=1)[:, :, None, :]  # kv heads -> query heads


# ---------------------------------------------------------------------------------------------------- rules
def ablate_heads(layers: Any = None, heads: Any = None, *, module: str = "*", queries: Any = None) -> Rule:
    """Zero the per-head outputs of `heads` (all if None) in `layers`: exactly the model with those heads' rows of
    the output projection zeroed."""
    return Rule(
        "head_outputs",
        "ablate",
        _layers(layers),
        module,
        _index_set("heads", heads),
        _positions("queries", queries),
    )


def scale_heads(layers: Any = None, heads: Any = None, factor: float = 1.0, *, module: str = "*") -> Rule:
    """Multiply the per-head outputs of `heads` in `layers` by `factor`."""
    return Rule("head_outputs", "scale", _layers(layers), module, _index_set("heads", heads), value=float(factor))


def add_to_logits(
    layers: Any = None, heads: Any = None, keys: Any = None, value: float = 0.0, *, queries: Any = None, module="*"
) -> Rule:
    """Add `value` to the attention logits of the selected keys (before the softmax): steering toward (value > 0)
    or away from (value < 0) a key span. With softmax, the selected keys' weights scale by e^value relative to the
    rest, renormalised."""
    return Rule(
        "attention_logits",
        "add",
        _layers(layers),
        module,
        _index_set("heads", heads),
        _positions("queries", queries),
        _positions("keys", keys),
        value=float(value),
    )


def scale_weights(
    layers: Any = None, heads: Any = None, keys: Any = None, factor: float = 1.0, *, queries: Any = None, module="*"
) -> Rule:
    """Multiply the attention weights of the selected keys by `factor` and renormalise each row to its original
    mass (PASTA-style steering; factor < 1 down-weights the span)."""
    if not factor >= 0:
        raise ValueError(f"factor={factor!r} must be >= 0")
    return Rule(
        "attention_weights",
        "scale_weights",
        _layers(layers),
        module,
        _index_set("heads", heads),
        _positions("queries", queries),
        _positions("keys", keys),
        value=float(factor),
    )


def set_temperature(layers: Any = None, heads: Any = None, temperature: float = 1.0, *, module: str = "*") -> Rule:
    """Divide the attention logits of `heads` in `layers` by `temperature` (> 1 flattens, < 1 sharpens)."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    return Rule(
        "attention_logits", "temperature", _layers(layers), module, _index_set("heads", heads), value=temperature
    )


def patch(
    source: Mapping[str, Mapping[str, Array]],
    stage: str,
    layers: Any = None,
    heads: Any = None,
    *,
    queries: Any = None,
    module: str = "*",
) -> Rule:
    """Replace `stage` of the selected layers/heads (/queries) with the activations of another run.

    source: {module path: {stage: array}}, as returned by `run_with_cache` on an input of the same shape.
    """
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r} must be one of {STAGES}")
    if not isinstance(source, Mapping):
        raise ValueError(f"source must be the mapping run_with_cache returns, got {type(source).__name__}")
    return Rule(
        stage,
        "patch",
        _layers(layers),
        module,
        _index_set("heads", heads),
        _positions("queries", queries),
        value=source,
    )


def hook(
    stage: str, fn: Any, layers: Any = None, heads: Any = None, *, queries: Any = None, keys: Any = None, module="*"
) -> Rule:
    """Replace `stage` by fn(value, module_path) on the selected heads/queries/keys (a general hook, as
    TransformerLens's run_with_hooks). fn gets the whole stage value and returns an array of the same shape."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r} must be one of {STAGES}")
    if not callable(fn):
        raise ValueError(f"fn={fn!r} must be a callable (value, module_path) -> value")
    if keys is not None and stage == "head_outputs":
        raise ValueError("keys= selects columns of attention_logits / attention_weights, not of head_outputs")
    return Rule(
        stage,
        "hook",
        _layers(layers),
        module,
        _index_set("heads", heads),
        _positions("queries", queries),
        _positions("keys", keys),
        value=fn,
    )


def capture(*names: str, layers: Any = None, module: str = "*") -> Rule:
    """Record the named stages in "intermediates" under their standard names (apply with
    mutable=["intermediates"]). names from CAPTURE_NAMES; default: all but attention_logits."""
    names = names or tuple(n for n in CAPTURE_NAMES if n != "attention_logits")
    for name in names:
        if name not in CAPTURE_NAMES:
            raise ValueError(f"capture name {name!r} is not one of {CAPTURE_NAMES}")
    return Rule("capture", "capture", _layers(layers), module, names=tuple(names))


# ---------------------------------------------------------------------------------------------------- applying
def _check(rule: Any) -> Rule:
    if not isinstance(rule, Rule):
        raise ValueError(f"intervene takes rules made by attn.interventions (ablate_heads, ...), got {rule!r}")
    return rule


def _interceptor(next_fun, args, kwargs, context):
    """Applies the active rules, in order (outer blocks' rules first), to the outputs of the stage methods they
    select. One interceptor serves all nested blocks, so a nested block is the same as listing its rules after the
    outer ones."""
    module = context.module
    if context.method_name not in STAGES or not isinstance(module, AttentionLayer):
        return next_fun(*args, **kwargs)
    out = next_fun(*args, **kwargs)
    call = kwargs.get("call", args[-1] if len(args) >= 2 else None)
    for rule in intervention_state.active_rules():
        if rule.stage == context.method_name and rule.targets(module):
            out = rule.apply(out, module, call)
    return out


_INSTALLED: contextvars.ContextVar[bool] = contextvars.ContextVar("attn_interceptor_installed", default=False)


@contextlib.contextmanager
def intervene(*rules: Rule) -> Iterator[None]:
    """Apply `rules` to every model call inside the block (also inside jax.jit; see the module docstring)."""
    rules = tuple(_check(rule) for rule in rules)
    token = intervention_state.push(rules)
    outermost = not _INSTALLED.get()
    installed = _INSTALLED.set(True)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(intervention_state.JIT_KEY(intervention_state.active_rules()))
            if outermost:
                stack.enter_context(nn.intercept_methods(_interceptor))
            yield
    finally:
        _INSTALLED.reset(installed)
        intervention_state.pop(token)


def run_with_cache(
    model: nn.Module,
    variables: Any,
    *args: Any,
    names: Sequence[str] = CAPTURE_NAMES,
    layers: Any = None,
    **kwargs: Any,
) -> tuple[Any, dict[str, dict[str, Array]]]:
    """Run `model.apply(variables, *args, **kwargs)` capturing `names` of the selected attention layers.

    Returns (output, {module path: {name: array}}). Names a layer does not have (e.g. the weights of a linear
    layer) are left out for that layer. The mapping is what `patch` takes as its source. Other rules active around
    the call (an enclosing `intervene`) apply as usual.
    """
    with intervene(capture(*names, layers=layers)):
        out, state = model.apply(variables, *args, mutable=["intermediates"], **kwargs)
    cache: dict[str, dict[str, Array]] = {}
    _collect(state.get("intermediates", {}), (), set(names), cache)
    return out, cache


def _collect(tree: Any, path: tuple[str, ...], names: set[str], out: dict[str, dict[str, Array]]) -> None:
    if not isinstance(tree, Mapping):
        return
    for key, value in tree.items():
        if key in names and isinstance(value, tuple):
            out.setdefault("/".join(path), {})[key] = value[0] if len(value) == 1 else value
        else:
            _collect(value, path + (key,), names, out)
