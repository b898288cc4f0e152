"""Every analysis JSON records the machine it was measured on (eval.analysis.evaluator.write_json), in the keys the
project's benchmark JSONs use and eval.claims reads."""

import json

import jax
import pytest

from eval.analysis import TOOLS
from eval.analysis.evaluator import write_json
from eval.claims import device
from eval.machine import machine_record


def test_tool_write_records_the_device(tmp_path):
    output = tmp_path / "sub" / "sink_rate.json"
    paths = TOOLS["sink_rate"]().write({"tool": "sink_rate", "score": [[0.5]]}, str(output), plot=False)
    assert paths == [str(output)]
    written = json.loads(output.read_text())
    first = jax.devices()[0]
    assert set(written) == {"tool", "score", *machine_record()}
    assert {key: written[key] for key in ("tool", "score", "device", "platform", "device_count", "jax_version")} == {
        "tool": "sink_rate",
        "score": [[0.5]],
        "device": first.device_kind,
        "platform": first.platform,
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
    }
    assert device(written).startswith(
        first.device_kind + (f", {jax.device_count()} devices" if jax.device_count() > 1 else "")
    )


def test_a_result_read_back_keeps_its_device(tmp_path):
    measured = {"device": "NVIDIA H100 80GB HBM3", "platform": "gpu", "device_count": 1, "jax_version": "0.4.30"}
    output = tmp_path / "r.json"
    write_json({"tool": "x", **measured}, str(output))
    assert json.loads(output.read_text()) == {"tool": "x", **measured}


def test_write_json_refuses_a_non_dict(tmp_path):
    with pytest.raises(ValueError, match="record must be a dict .*got list"):
        write_json([1, 2], str(tmp_path / "r.json"))
