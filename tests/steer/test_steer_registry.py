"""attn.steer.STEERERS: every system records its paper, a valid fidelity, a reference and its exact no-op."""

import pytest

from attn.registry import FIDELITIES
from attn.steer import STEERERS, register


def test_every_steerer_has_its_record():
    assert set(STEERERS) >= {"pasta", "autopasta", "act"}
    for name, spec in STEERERS.items():
        assert spec.cls.registry_name == name
        assert spec.fidelity in FIDELITIES and spec.paper and len(spec.reference) > 40 and spec.no_op


def test_register_refuses_a_taken_name_and_an_unknown_fidelity():
    with pytest.raises(ValueError, match="'pasta' is already registered"):
        register("pasta", paper="p", fidelity="paper", reference="r", no_op="n")(type("Other", (), {}))
    with pytest.raises(ValueError, match="fidelity='guess'"):
        register("other", paper="p", fidelity="guess", reference="r", no_op="n")
