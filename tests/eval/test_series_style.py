"""eval.analysis.evaluator.series_style gives every series of a crowded plot its own look."""

import pytest

from eval.analysis.evaluator import series_style


def test_the_first_280_series_all_look_different():
    looks = [tuple(sorted(series_style(i).items())) for i in range(280)]
    assert len(set(looks)) == 280
    assert series_style(0) == {"color": "C0", "marker": "o", "linestyle": "-"}
    assert series_style(10)["color"] == "C0" and series_style(10)["marker"] != "o"  # colour repeats, marker does not


def test_a_negative_index_is_refused():
    with pytest.raises(ValueError, match="index must be >= 0, got -1"):
        series_style(-1)
