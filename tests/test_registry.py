"""The registry: names, specs, build, and the README feature table."""

import pathlib
import re

import flax.linen as nn

import attn
from attn import functional as F
from attn.registry import COMMON_OPTION_DOCS, REQUIRED

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
