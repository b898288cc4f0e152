"""The mechanism registry: every attention mechanism by name, with its spec, options and seed paper.

    attn.list_mechanisms(family=None) -> ["softmax", ...]
    attn.get("softmax") -> MechanismSpec
    attn.build("softmax", num_heads=8, head_dim=64, position="rope") -> flax.linen.Module
    attn.registry.feature_table() -> the README's Markdown table
    attn.registry.validate_options(layer) -> raises ValueError naming the first option value its spec rejects

Mechanism files register themselves with the `register` decorator. On first use the registry imports every
module of the family packages (attn/softmax/, attn/linear/, attn/local/, ...), so an added mechanism file is found
without being listed anywhere, and there are no import cycles.

Each spec records its fidelity: how the implementation was checked ("paper": equations checked against the paper
text; "official-code": matches the authors' code; "peer": matches an established independent implementation;
"reconstructed": built from an abstract or a secondary source, experimental), with a reference saying against what.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

from attn.core.validation import choice, in_range, optional, positive_int

INPUT_KINDS = ("sequence", "spatial", "channels", "cross", "pooling")
# What a layer of each input kind takes and returns (its __call__; the README's table of input kinds).
INPUT_SHAPES = {
    "sequence": "x [batch, length, embed] -> [batch, length, embed]",
    "spatial": "x [batch, *spatial, embed] (1 to 3 spatial axes) -> the same shape",
    "channels": "x [batch, *spatial, channels] (NHWC for images) -> the same shape",
    "cross": "x [batch, length, embed], context [batch, context_length, context_embed] -> [batch, length, embed]",
    "pooling": "x [batch, length, embed] -> [batch, embed]",
}
FAMILIES = ("softmax", "linear", "local", "sparse", "kv", "channel", "cross", "pooling")
FIDELITIES = ("paper", "official-code", "peer", "reconstructed")

# Per-layer fields a mechanism may declare (`register(..., layer_fields=...)`): options whose value depends on the
# layer's place in the model. Every model that builds attention by name fills them per layer (attn.models.fields
# .with_layer_fields) unless the user set them in attention_options.
LAYER_FIELDS: dict[str, str] = {
    "layer_index": "0-based index of the layer in its stack of blocks",
    "num_layers": "number of blocks in the stack",
}


class Required:
    """Marker for an option without a default."""

    def __repr__(self) -> str:
        return "<required>"


REQUIRED = Required()

# Documentation of the options every sequence attention layer shares (attn.core.layer.AttentionLayer).
COMMON_OPTION_DOCS: dict[str, str] = {
    "num_heads": "number of query heads",
    "head_dim": "size of each head",
    "num_kv_heads": "number of key/value heads (None = num_heads; 1 = MQA; a divisor of num_heads = GQA)",
    "dropout_rate": "dropout on attention probabilities (active when deterministic=False)",
    "use_bias": "add biases to the q/k/v/o projections",
    "out_bias": "bias on the output projection (None = use_bias)",
    "capture": "always sow attention weights into 'intermediates' (they are also sown when it is mutable)",
    "implementation": "backend: None (fastest available), 'xla', 'cudnn', 'pallas' or 'split_kv' (decode calls)",
    "dtype": "computation dtype",
    "param_dtype": "parameter dtype",
}

# Validators of the shared options, applied to every mechanism that has the field (a mechanism's own or a
# registered base's validator for the same name wins).
COMMON_OPTION_VALIDATORS: dict[str, Callable[[str, Any], None]] = {
    "num_heads": positive_int,
    "head_dim": positive_int,
    "num_kv_heads": optional(positive_int),
    "dropout_rate": in_range(0, 1, high_inclusive=False),
    "implementation": optional(choice("xla", "cudnn", "pallas", "split_kv")),
}


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One constructor option of a mechanism."""

    name: str
    default: Any
    doc: str
    validator: Callable[[str, Any], None] | None = None  # (name, value) -> None or ValueError; None = unchecked

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def __str__(self) -> str:
        shown = self.default.__name__ if isinstance(self.default, type) else repr(self.default)  # jnp.float32
        default = "required" if self.required else f"default {shown}"
        check = f" [{self.validator!r}]" if self.validator is not None else ""
        return f"{self.name} ({default}){check}: {self.doc}"


@dataclasses.dataclass(frozen=True)
class MechanismSpec:
    """What the registry knows about a mechanism.

    Attributes:
      name: registry name (lowercase snake case).
      family: "softmax", "linear", "local", "sparse", "kv", "channel", "cross" or "pooling".
      paper: title of the seed paper (or the baseline's paper).
      catalog: entry number in shared/catalog (None for baselines outside the seeds).
      module: the flax.linen Module class; `build` instantiates it.
      op: the pure function behind it (e.g. attn.functional.softmax_attention), or None.
      input_kind: "sequence" [B, T, E], "spatial" [B, *S, E], "channels" (NHWC), "cross", or "pooling"
        ([B, T, E] -> [B, F]: a pooling head, e.g. the models' `pool=`).
      supports_causal / supports_decode: causal masking / autoregressive decoding with a KV cache.
      options: name -> OptionSpec (defaults, docs, validators), from the module's dataclass fields.
      summary: one line for the feature table.
      fidelity: "paper", "official-code", "peer" or "reconstructed" (experimental); see the module docstring.
      reference: what the fidelity was checked against (paper section, file of the official code, or URL).
      supports_gqa: num_kv_heads < num_heads works (meaningful for the sequence and spatial kinds).
      has_attention_weights: the layer computes an explicit probability matrix through the attention pipeline's
        named stages (interventions on weights and logits apply).
      layer_fields: options (names from LAYER_FIELDS) that the models fill per layer unless the user sets them.
    """

    name: str
    family: str
    paper: str
    catalog: int | None
    module: type[nn.Module]
    op: Callable[..., Any] | None
    input_kind: str
    supports_causal: bool
    supports_decode: bool
    options: Mapping[str, OptionSpec]
    summary: str
    fidelity: str | None
    reference: str | None
    supports_gqa: bool
    has_attention_weights: bool
    layer_fields: tuple[str, ...] = ()

    def build(self, **options: Any) -> nn.Module:
        return build(self.name, **options)

    def __repr__(self) -> str:  # the interactive prompt shows the readable description, not 4 KB of fields
        return str(self)

    def __str__(self) -> str:
        yes = {True: "yes", False: "no"}
        catalog = f"[{self.catalog}] in shared/catalog" if self.catalog is not None else "not in the catalog"
        fidelity = self.fidelity or "not recorded"
        if self.fidelity == "reconstructed":
            fidelity += " (experimental)"
        op = f"{self.op.__module__}.{self.op.__qualname__}" if self.op is not None else "none"
        lines = [
            f"{self.name}: {self.summary}",
            f"  paper: {self.paper} ({catalog})",
            f"  fidelity: {fidelity}; reference: {self.reference or 'not recorded'}",
            f"  family: {self.family}; input: {self.input_kind}, {INPUT_SHAPES[self.input_kind]}",
            f"  module: {self.module.__module__}.{self.module.__qualname__}; op: {op}",
            f"  claims: causal {yes[self.supports_causal]}, decode {yes[self.supports_decode]}, "
            f"gqa {yes[self.supports_gqa]}, attention weights {yes[self.has_attention_weights]}",
        ]
        if self.layer_fields:
            lines.append(f"  filled per layer by the models: {', '.join(self.layer_fields)}")
        lines.append("  options:")
        lines += [f"    {option}" for option in self.options.values()]
        return "\n".join(lines)


_REGISTRY: dict[str, MechanismSpec] = {}
_LOADED = False


def _registered_spec(cls: type) -> MechanismSpec | None:
    """The spec registered for exactly `cls` (not for a base it inherits `registry_name` from), or None."""
    name = cls.__dict__.get("registry_name")
    spec = _REGISTRY.get(name) if isinstance(name, str) else None
    return spec if spec is not None and spec.module is cls else None


def _inherited_options(module: type[nn.Module]) -> dict[str, OptionSpec]:
    """Options (docs, validators) of the registered mechanisms `module` derives from (nearest base wins)."""
    options: dict[str, OptionSpec] = {}
    for base in reversed(module.__mro__[1:]):
        spec = _registered_spec(base)
        if spec is not None:
            options.update(spec.options)
    return options


def _module_options(
    module: type[nn.Module], docs: Mapping[str, str], validators: Mapping[str, Callable[[str, Any], None]]
) -> dict[str, OptionSpec]:
    """Options from the module's dataclass fields. A field's doc and validator come from `docs` / `validators`,
    else from a registered base class (a subclass of `softmax` documents and checks only its own fields), else
    from COMMON_OPTION_DOCS / COMMON_OPTION_VALIDATORS."""
    inherited = _inherited_options(module)
    docs = {**{n: o.doc for n, o in inherited.items()}, **docs}
    validators = {**{n: o.validator for n, o in inherited.items() if o.validator is not None}, **validators}
    options = {}
    for field in dataclasses.fields(module):
        if field.name in ("parent", "name") or not field.init:
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = REQUIRED
        doc = docs.get(field.name) or COMMON_OPTION_DOCS.get(field.name)
        if doc is None:
            raise ValueError(f"option {field.name!r} of {module.__name__} has no documentation; pass it in option_docs")
        validator = validators.get(field.name, COMMON_OPTION_VALIDATORS.get(field.name))
        options[field.name] = OptionSpec(field.name, default, doc, validator)
    unknown = sorted(set(validators) - set(options))
    if unknown:
        raise ValueError(
            f"validators name {', '.join(map(repr, unknown))}, not option(s) of {module.__name__}; "
            f"expected some of {', '.join(options)}"
        )
    return options


def register(
    name: str,
    *,
    family: str,
    paper: str,
    catalog: int | None,
    input_kind: str,
    supports_causal: bool,
    supports_decode: bool,
    summary: str,
    op: Callable[..., Any] | None = None,
    option_docs: Mapping[str, str] | None = None,
    validators: Mapping[str, Callable[[str, Any], None]] | None = None,
    fidelity: str | None = None,
    reference: str | None = None,
    supports_gqa: bool = True,
    has_attention_weights: bool = False,
    layer_fields: tuple[str, ...] = (),
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator that registers a flax.linen Module as the mechanism `name` and sets `registry_name` on it.

    `validators` maps option names to (name, value) -> None checks (attn.core.validation: positive_int,
    choice(...), ...); `fidelity` is one of FIDELITIES and `reference` says what it was checked against. Every
    mechanism must give both (tests/test_registry.py and feature_table() enforce it). `layer_fields` names the
    options (keys of LAYER_FIELDS) that depend on the layer's place in the model; the models fill them per layer.
    """
    if name != name.lower() or not name.replace("_", "").isalnum():
        raise ValueError(f"mechanism name {name!r} must be lowercase snake case")
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} must be one of {FAMILIES}")
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"input_kind={input_kind!r} must be one of {INPUT_KINDS}")
    if fidelity is not None and fidelity not in FIDELITIES:
        raise ValueError(f"fidelity={fidelity!r} of mechanism {name!r} must be one of {FIDELITIES}")
    if reference is not None and not (isinstance(reference, str) and reference.strip()):
        raise ValueError(f"reference={reference!r} of mechanism {name!r} must be a non-empty string")
    for option, validator in (validators or {}).items():
        if not callable(validator):
            raise ValueError(f"validators[{option!r}]={validator!r} must be a callable (name, value) -> None")
    layer_fields = tuple(layer_fields)
    unknown_fields = [field for field in layer_fields if field not in LAYER_FIELDS]
    if unknown_fields:
        raise ValueError(
            f"layer_fields={layer_fields!r} of mechanism {name!r} names {unknown_fields}; expected some of "
            f"{tuple(LAYER_FIELDS)}"
        )

    def decorator(module: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY and _REGISTRY[name].module is not module:
            raise ValueError(f"mechanism {name!r} is already registered by {_REGISTRY[name].module.__qualname__}")
        options = _module_options(module, option_docs or {}, validators or {})
        missing = [field for field in layer_fields if field not in options]
        if missing:
            raise ValueError(
                f"layer_fields={layer_fields!r} of mechanism {name!r} names {missing}, not option(s) of "
                f"{module.__name__}; expected some of {', '.join(options)}"
            )
        _REGISTRY[name] = MechanismSpec(
            name=name,
            family=family,
            paper=paper,
            catalog=catalog,
            module=module,
            op=op,
            input_kind=input_kind,
            supports_causal=supports_causal,
            supports_decode=supports_decode,
            options=options,
            summary=summary,
            fidelity=fidelity,
            reference=reference,
            supports_gqa=supports_gqa,
            has_attention_weights=has_attention_weights,
            layer_fields=layer_fields,
        )
        module.registry_name = name
        # The layer template (attn/core/layer.py, which must not import the registry) runs these at every call.
        module.option_validators = {
            option.name: option.validator for option in _REGISTRY[name].options.values() if option.validator is not None
        }
        return module

    return decorator


def _ensure_loaded() -> None:
    """Imports every module of every family package that exists (each registers its mechanisms)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for family in FAMILIES:
        try:
            package = importlib.import_module(f"attn.{family}")
        except ModuleNotFoundError as error:
            if error.name != f"attn.{family}":
                raise
            continue
        for info in pkgutil.iter_modules(package.__path__, prefix=f"attn.{family}."):
            importlib.import_module(info.name)


def list_mechanisms(family: str | None = None) -> list[str]:
    """Sorted registry names, optionally of one family."""
    _ensure_loaded()
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family={family!r} is not a known family; expected one of {FAMILIES}")
    return sorted(n for n, s in _REGISTRY.items() if family is None or s.family == family)


def get(name: str) -> MechanismSpec:
    """The spec of mechanism `name`; KeyError listing the closest names if unknown."""
    _ensure_loaded()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
        raise KeyError(f"unknown attention mechanism {name!r}; {hint}known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build(name: str, **options: Any) -> nn.Module:
    """Instantiates mechanism `name` with `options`; unknown or missing options raise ValueError."""
    spec = get(name)
    unknown = [o for o in options if o not in spec.options]
    if unknown:
        bad = unknown[0]
        close = difflib.get_close_matches(bad, list(spec.options), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown option {bad!r} for mechanism {name!r}{hint}; valid options: {', '.join(spec.options)}"
        )
    missing = [o.name for o in spec.options.values() if o.required and o.name not in options]
    if missing:
        raise ValueError(f"mechanism {name!r} needs option(s) {', '.join(map(repr, missing))}")
    module = spec.module(**options)
    validate_options(module)
    return module


def spec_of(module_class: type[nn.Module]) -> MechanismSpec:
    """The spec of `module_class` or, if it is not registered itself, of its nearest registered base class."""
    _ensure_loaded()
    for cls in module_class.__mro__:
        spec = _registered_spec(cls)
        if spec is not None:
            return spec
    raise KeyError(f"{module_class.__qualname__} is not a registered mechanism and derives from none")


def validate_options(module: nn.Module) -> None:
    """Checks every option of the module instance `module` with the validators of its spec (see spec_of).

    Raises ValueError("<option>=<value!r> must be <expected>") for the first value a validator rejects. Fields a
    subclass adds beyond its registered base are not checked.
    """
    for option in spec_of(type(module)).options.values():
        if option.validator is not None:
            option.validator(option.name, getattr(module, option.name))


def feature_table(family: str | None = None) -> str:
    """The Markdown feature table of all registered mechanisms (the README embeds this output).

    Raises ValueError naming the mechanisms registered without a fidelity or a reference.
    """
    names = list_mechanisms(family)
    unrecorded = [n for n in names if _REGISTRY[n].fidelity is None or _REGISTRY[n].reference is None]
    if unrecorded:
        raise ValueError(
            f"mechanism(s) {', '.join(map(repr, unrecorded))} registered without fidelity= and reference=; "
            f"expected fidelity one of {FIDELITIES} and a non-empty reference"
        )
    lines = [
        "| name | family | input | causal | decode | fidelity | seed paper | what it does |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        s = _REGISTRY[name]
        ref = f"[{s.catalog}] " if s.catalog is not None else ""
        lines.append(
            f"| `{name}` | {s.family} | {s.input_kind} | {'yes' if s.supports_causal else 'no'} | "
            f"{'yes' if s.supports_decode else 'no'} | {s.fidelity} | {ref}{s.paper} | {s.summary} |"
        )
    return "\n".join(lines)
