"""The registry: names, specs, build, option validators, the fidelity record, `python -m attn` and the README table."""

import dataclasses
import pathlib
import re

import flax.linen as nn
import numpy as np
import pytest

import attn
from attn import __main__ as cli
from attn import functional as F
from attn import registry
from attn.core import dispatch
from attn.core.validation import (
    choice,
    in_range,
    int_at_least,
    int_or_pair,
    non_negative,
    non_negative_int,
    optional,
    positive,
    positive_int,
    subset,
)
from attn.linear.linear import LinearAttention
from attn.registry import COMMON_OPTION_DOCS, COMMON_OPTION_VALIDATORS, FIDELITIES, REQUIRED

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_softmax_is_registered_with_its_spec():
    assert "softmax" in attn.list_mechanisms()
    assert attn.list_mechanisms(family="softmax") == [
        n for n in attn.list_mechanisms() if attn.get(n).family == "softmax"
    ]
    spec = attn.get("softmax")
    assert spec.name == "softmax" and spec.family == "softmax" and spec.input_kind == "sequence"
    assert spec.supports_causal and spec.supports_decode
    assert spec.op is F.softmax_attention
    assert issubclass(spec.module, nn.Module)
    assert spec.options["num_heads"].default is REQUIRED
    assert spec.options["position"].default == "rope"
    assert isinstance(attn.build("softmax", num_heads=2, head_dim=4), spec.module)


def test_every_mechanism_documents_its_options_and_names_its_paper():
    for name in attn.list_mechanisms():
        spec = attn.get(name)
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name)
        assert spec.paper and spec.summary
        for opt in spec.options.values():
            assert opt.doc
        if spec.input_kind == "sequence":
            assert set(COMMON_OPTION_DOCS) <= set(spec.options), name


def test_readme_feature_table_is_the_registry_output():
    text = README.read_text()
    start, end = "<!-- feature-table:start -->", "<!-- feature-table:end -->"
    assert start in text and end in text, "README.md must embed the feature table between markers"
    embedded = text.split(start)[1].split(end)[0].strip()
    assert embedded == attn.feature_table().strip(), "README table is stale: paste `python -m attn` output"


# ---------------------------------------------------------------- option validators


@pytest.mark.parametrize(
    ("validator", "value", "message"),
    [
        (positive_int, 0, "n=0 must be a positive int"),
        (positive_int, 2.0, "n=2.0 must be a positive int"),
        (positive_int, True, "n=True must be a positive int"),
        (non_negative_int, -1, "n=-1 must be a non-negative int"),
        (positive, 0.0, "n=0.0 must be a number > 0"),
        (positive, "1", "n='1' must be a number > 0"),
        (non_negative, -0.5, "n=-0.5 must be a number >= 0"),
        (int_at_least(2), 1, "n=1 must be an int >= 2"),
        (choice("a", "b"), "c", "n='c' must be one of ('a', 'b')"),
        (choice(0.0), False, "n=False must be one of (0.0,)"),
        (in_range(0, 1, high_inclusive=False), 1.0, "n=1.0 must be a number in [0, 1)"),
        (in_range(0, 1, low_inclusive=False), 0, "n=0 must be a number in (0, 1]"),
        (optional(positive_int), 0, "n=0 must be None or a positive int"),
        (int_or_pair(positive_int), (2, 0), "n=(2, 0) must be a positive int or a tuple of them (one per axis)"),
        (int_or_pair(positive_int), (), "n=() must be a positive int or a tuple of them (one per axis)"),
        (
            subset("c2p", "p2c"),
            ("c2p", "c2p"),
            "n=('c2p', 'c2p') must be a tuple of distinct entries of ('c2p', 'p2c')",
        ),
        (subset("c2p", "p2c"), "c2p", "n='c2p' must be a tuple of distinct entries of ('c2p', 'p2c')"),
    ],
)
def test_validators_reject_with_the_exact_message(validator, value, message):
    with pytest.raises(ValueError) as error:
        validator("n", value)
    assert str(error.value) == message


@pytest.mark.parametrize(
    ("validator", "value"),
    [
        (positive_int, 1),
        (positive_int, np.int64(3)),
        (non_negative_int, 0),
        (positive, 1e-9),
        (positive, 3),
        (non_negative, 0),
        (int_at_least(2), 2),
        (choice("a", "b"), "b"),
        (choice(None), None),
        (choice(0.0), 0),
        (in_range(0, 1, high_inclusive=False), 0.0),
        (in_range(0, 1), 1),
        (optional(positive_int), None),
        (int_or_pair(positive_int), 3),
        (int_or_pair(positive_int), (3, 1, 2)),
        (subset("c2p", "p2c"), ()),
        (subset("c2p", "p2c"), ["p2c", "c2p"]),
    ],
)
def test_validators_accept_valid_values(validator, value):
    assert validator("n", value) is None


def test_validator_reprs_are_readable():
    assert repr(positive_int) == "positive int"
    assert repr(non_negative) == "number >= 0"
    assert repr(choice("a", "b")) == "one of ('a', 'b')"
    assert repr(in_range(0, 1, high_inclusive=False)) == "number in [0, 1)"
    assert repr(optional(choice("xla", "cudnn"))) == "None or one of ('xla', 'cudnn')"
    assert repr(int_or_pair(non_negative_int)) == "non-negative int or a tuple of them per axis"


def test_common_options_are_validated_centrally():
    spec = attn.get("window")  # a spatial layer that declares no validator for the shared options itself
    for name, validator in COMMON_OPTION_VALIDATORS.items():
        assert spec.options[name].validator is validator, name
    assert repr(spec.options["implementation"].validator) == "None or one of ('xla', 'cudnn', 'pallas', 'split_kv')"
    assert set(dispatch.IMPLEMENTATIONS) - {None} == {"xla", "cudnn", "pallas", "split_kv"}


def test_every_default_passes_its_validator():
    for name in attn.list_mechanisms():
        for option in attn.get(name).options.values():
            if option.validator is not None and not option.required:
                option.validator(option.name, option.default)  # raises if a declared validator is wrong


# ---------------------------------------------------------------- build and validate_options


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("softmax", {"num_heads": 0, "head_dim": 4}, "num_heads=0 must be a positive int"),
        (
            "softmax",
            {"num_heads": 2, "head_dim": 4, "dropout_rate": 1.0},
            "dropout_rate=1.0 must be a number in [0, 1)",
        ),
        (
            "softmax",
            {"num_heads": 2, "head_dim": 4, "implementation": "triton"},
            "implementation='triton' must be None",
        ),
        ("linear", {"num_heads": 2, "head_dim": 4, "chunk_size": 0}, "chunk_size=0 must be a positive int"),
        ("combiner", {"num_heads": 2, "head_dim": 4, "summary": "min"}, "summary='min' must be one of ('max', 'mean')"),
        ("halo", {"num_heads": 2, "head_dim": 4, "halo_size": (1, -1)}, "halo_size=(1, -1) must be a non-negative int"),
        ("eca", {"gamma": 0.0}, "gamma=0.0 must be a number > 0"),
    ],
)
def test_build_rejects_a_bad_option_value_naming_it(name, options, message):
    with pytest.raises(ValueError) as error:
        attn.build(name, **options)
    assert str(error.value).startswith(message)


def test_validators_are_inherited_from_registered_bases(monkeypatch):
    # rcmha derives from relative_music, which declares max_distance; rcmha declares only its own options.
    music, rcmha = attn.get("relative_music"), attn.get("rcmha")
    assert rcmha.options["max_distance"].validator is music.options["max_distance"].validator
    with pytest.raises(ValueError, match=r"^max_distance=0 must be a positive int$"):
        attn.build("rcmha", num_heads=2, head_dim=4, max_distance=0)

    # A subclass registered here inherits linear's validators, can override one and adds its own.
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    class Wider(LinearAttention):
        width: int = 2

    registry.register(
        "wider_linear_test",
        family="linear",
        paper="test",
        catalog=None,
        input_kind="sequence",
        supports_causal=True,
        supports_decode=True,
        summary="test",
        option_docs={"width": "test width"},
        validators={"width": int_at_least(2), "eps": non_negative},
        fidelity="paper",
        reference="test",
    )(Wider)
    spec = attn.get("wider_linear_test")
    assert Wider.registry_name == "wider_linear_test" and LinearAttention.registry_name == "linear"
    assert spec.options["chunk_size"].validator is attn.get("linear").options["chunk_size"].validator
    assert spec.options["eps"].validator is non_negative
    with pytest.raises(ValueError, match=r"^chunk_size=-1 must be a positive int$"):
        attn.build("wider_linear_test", num_heads=2, head_dim=4, chunk_size=-1)
    with pytest.raises(ValueError, match=r"^width=1 must be an int >= 2$"):
        attn.build("wider_linear_test", num_heads=2, head_dim=4, width=1)
    attn.build("wider_linear_test", num_heads=2, head_dim=4, eps=0.0)  # the override accepts 0


def test_validate_options_finds_the_nearest_registered_base():
    class Unregistered(LinearAttention):
        extra: int = -5  # not in linear's spec: unchecked

    assert registry.spec_of(Unregistered) is attn.get("linear")
    registry.validate_options(Unregistered(num_heads=2, head_dim=4))
    with pytest.raises(ValueError, match=r"^eps=-1\.0 must be a number > 0$"):
        registry.validate_options(Unregistered(num_heads=2, head_dim=4, eps=-1.0))
    with pytest.raises(KeyError, match="not a registered mechanism"):
        registry.spec_of(nn.Dense)


def test_register_rejects_validators_for_unknown_options_and_bad_fidelity(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    common = dict(
        family="linear",
        paper="test",
        catalog=None,
        input_kind="sequence",
        supports_causal=True,
        supports_decode=True,
        summary="test",
    )

    class Plain(LinearAttention):
        pass

    with pytest.raises(ValueError, match="'chunk'"):
        registry.register("plain_test", **common, validators={"chunk": positive_int}, fidelity="paper", reference="x")(
            Plain
        )
    with pytest.raises(ValueError, match="fidelity='verified'"):
        registry.register("plain_test", **common, fidelity="verified", reference="x")
    with pytest.raises(ValueError, match="reference=' '"):
        registry.register("plain_test", **common, fidelity="paper", reference=" ")


# ---------------------------------------------------------------- fidelity record and the command line


def test_every_spec_has_a_fidelity_and_a_reference():
    for name in attn.list_mechanisms():
        spec = attn.get(name)
        assert spec.fidelity in FIDELITIES, (name, spec.fidelity)
        assert isinstance(spec.reference, str) and spec.reference.strip(), (name, spec.reference)
    reconstructed = {n for n in attn.list_mechanisms() if attn.get(n).fidelity == "reconstructed"}
    assert {"extractor", "swap", "selective"} <= reconstructed
    assert {attn.get(n).fidelity for n in ("softmax", "linear", "window")} == {"paper"}


def test_feature_table_names_mechanisms_without_a_fidelity(monkeypatch):
    specs = dict(registry._REGISTRY)
    specs["eca"] = dataclasses.replace(specs["eca"], fidelity=None)
    monkeypatch.setattr(registry, "_REGISTRY", specs)
    with pytest.raises(ValueError, match="'eca'"):
        attn.feature_table()


def test_register_sets_the_registry_name_on_the_class():
    for name in attn.list_mechanisms():
        module = attn.get(name).module
        assert module.__dict__["registry_name"] == name
        assert type(attn.build(name, **required_options(name))).registry_name == name


def required_options(name):
    return {o.name: 2 for o in attn.get(name).options.values() if o.required}


def test_command_line_describes_one_mechanism(capsys):
    assert cli.main(["selective"]) == 0
    out = capsys.readouterr().out
    spec = attn.get("selective")
    assert out.strip() == str(spec)
    assert "fidelity: reconstructed (experimental)" in out and spec.reference in out
    assert "[111]" in out and "input: sequence" in out
    assert "claims: causal yes, decode yes, gqa yes" in out
    for option in spec.options.values():
        assert f"    {option.name} (" in out
    assert "num_heads (required) [positive int]: number of query heads" in out
    assert "position_beta_init (default 2.0): " in out
    assert cli.main(["no_such_mechanism"]) == 2
    assert "unknown attention mechanism 'no_such_mechanism'" in capsys.readouterr().err
    assert cli.main([]) == 0
    assert capsys.readouterr().out.strip() == attn.feature_table()
    assert cli.main(["--family", "channel"]) == 0
    assert capsys.readouterr().out.strip() == attn.feature_table("channel")
    assert cli.main(["--family", "nope"]) == 2
    assert "family='nope' is not a known family" in capsys.readouterr().err


def test_readme_says_reconstructed_mechanisms_are_experimental():
    assert "Mechanisms marked `reconstructed` are experimental" in README.read_text()
