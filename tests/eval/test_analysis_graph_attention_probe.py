"""graph_attention_probe on planted heads over a path graph 0-1-2-3-4-5 (one token per node occurrence): a sink head
(only token 0's key answers, and token 0 comes first) sends all inter-node attention to node 0, so its neighbour share is the fraction of the other nodes
adjacent to it; a uniform head reproduces the uniform baseline exactly; a same-token head has no inter-node
attention; shortest paths and the share by hand."""

import numpy as np
import pytest

from eval.analysis import TOOLS
from eval.analysis.graph_attention_probe import (
    GraphAttentionProbe,
    neighbour_share,
    serialised_graphs,
    shortest_paths,
)
from tests.eval.planted_heads import match_model

NODES = 6
PATH = np.eye(NODES, k=1, dtype=bool) | np.eye(NODES, k=-1, dtype=bool)
TOKENS = np.array([[0, 2, 1, 3, 2, 4, 5, 1]], np.int32)  # token 0 (the sink's key) first


def test_shortest_paths_share_and_serialisation_by_hand():
    np.testing.assert_array_equal(shortest_paths(PATH)[0], [0, 1, 2, 3, 4, 5])
    attention = np.zeros((1, 3, 3))
    attention[0, 0, 1], attention[0, 0, 2] = 0.6, 0.2  # node 0 -> 1 (an edge) and -> 2 (not)
    adjacency = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]], bool)
    assert neighbour_share(attention, adjacency)[0] == pytest.approx(0.75)
    graphs = serialised_graphs(3, 4, 0.5, seed=0)
    for inputs, node_ids, adjacency in zip(graphs["inputs"], graphs["node_ids"], graphs["adjacency"], strict=True):
        text = bytes(inputs.tolist()).decode().rstrip(";")
        edges = {tuple(sorted((ord(e[0]) - 97, ord(e[2]) - 97))) for e in text.split(",")}
        assert edges == {(u, v) for u, v in zip(*np.nonzero(np.triu(adjacency)), strict=True)}
        assert ((node_ids >= 0) == (inputs >= 97)).all()


def test_planted_heads_on_a_path_graph(tmp_path):
    model, params = match_model(NODES, [("sink", "none"), ("self", "none")])
    batch = {"inputs": TOKENS, "node_ids": TOKENS, "adjacency": PATH[None]}
    result = GraphAttentionProbe().evaluate(model, params, [batch])
    sink, uniform = result["neighbour_share"][0]
    others = [u for u in set(TOKENS[0].tolist()) if u != TOKENS[0, 0]]
    assert sink == pytest.approx(np.mean([PATH[u, TOKENS[0, 0]] for u in others]), abs=1e-4)  # 1 of 5
    assert uniform == pytest.approx(result["uniform_share"][0], abs=1e-6)
    assert result["neighbour_share"][1][0] is None  # same-token attention never leaves its node
    assert result["graphs"] == "given" and result["rows"] == 1
    paths = TOOLS["graph_attention_probe"]().write(result, str(tmp_path / "g.json"))
    assert open(paths[1], "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="nodes=30 must be an int in"):
        GraphAttentionProbe(nodes=30)
