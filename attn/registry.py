"""The mechanism registry: every attention mechanism by name, with its spec, options and seed paper.

    attn.list_mechanisms(family=None) -> ["softmax", ...]
    attn.get("softmax") -> MechanismSpec
    attn.build("softmax", num_heads=8, head_dim=64, position="rope") -> flax.linen.Module
    attn.registry.feature_table() -> the README's Markdown table

Mechanism files register themselves with the `register` decorator. On first use the registry imports every
module of the family packages (attn/softmax/, attn/linear/, attn/local/, ...), so a new mechanism file is found
without being listed anywhere, and there are no import cycles.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

INPUT_KINDS = ("sequence", "spatial", "channels", "cross", "pooling")
FAMILIES = ("softmax", "linear", "local", "sparse", "kv", "channel", "cross", "pooling")


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
    "capture": "always sow attention weights into 'intermediates' (they are also sown when it is mutable)",
    "implementation": "backend: None (fastest available), 'xla', 'cudnn' or 'pallas'",
    "dtype": "computation dtype",
    "param_dtype": "parameter dtype",
}


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One constructor option of a mechanism."""

    name: str
    default: Any
    doc: str

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


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
      options: name -> OptionSpec (defaults and docs), from the module's dataclass fields.
      summary: one line for the feature table.
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

    def build(self, **options: Any) -> nn.Module:
        return build(self.name, **options)


_REGISTRY: dict[str, MechanismSpec] = {}
_LOADED = False


def _inherited_docs(module: type[nn.Module]) -> dict[str, str]:
    """Option docs of the registered mechanisms `module` derives from (nearest base wins)."""
    docs: dict[str, str] = {}
    for base in reversed(module.__mro__[1:]):
        for spec in _REGISTRY.values():
            if spec.module is base:
                docs.update({name: option.doc for name, option in spec.options.items()})
    return docs


def _module_options(module: type[nn.Module], docs: Mapping[str, str]) -> dict[str, OptionSpec]:
    """Options from the module's dataclass fields; a field's doc comes from `docs`, else from a registered base
    class (a subclass of `softmax` documents only its new fields), else from COMMON_OPTION_DOCS."""
    docs = {**_inherited_docs(module), **docs}
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
        options[field.name] = OptionSpec(field.name, default, doc)
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
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator that registers a flax.linen Module as the mechanism `name`."""
    if name != name.lower() or not name.replace("_", "").isalnum():
        raise ValueError(f"mechanism name {name!r} must be lowercase snake case")
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} must be one of {FAMILIES}")
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"input_kind={input_kind!r} must be one of {INPUT_KINDS}")

    def decorator(module: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY and _REGISTRY[name].module is not module:
            raise ValueError(f"mechanism {name!r} is already registered by {_REGISTRY[name].module.__qualname__}")
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
            options=_module_options(module, option_docs or {}),
            summary=summary,
        )
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
    return spec.module(**options)


def feature_table(family: str | None = None) -> str:
    """The Markdown feature table of all registered mechanisms (the README embeds this output)."""
    lines = [
        "| name | family | input | causal | decode | seed paper | what it does |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in list_mechanisms(family):
        s = _REGISTRY[name]
        ref = f"[{s.catalog}] " if s.catalog is not None else ""
        lines.append(
            f"| `{name}` | {s.family} | {s.input_kind} | {'yes' if s.supports_causal else 'no'} | "
            f"{'yes' if s.supports_decode else 'no'} | {ref}{s.paper} | {s.summary} |"
        )
    return "\n".join(lines)
