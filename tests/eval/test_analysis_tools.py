"""eval.analysis tools on models whose weights plant the answer: sink, self and uniform heads (one-hot tokens, no
positions), heads with zeroed output rows, and numpy references of the equations."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.models.decoder import DecoderLM
from eval.analysis import ARank, AttentionDistance, HeadAblation, LogitAttribution, SinkRate
from eval.analysis.arank import map_ranks
from eval.analysis.attention_distance import mean_distance

TOKENS = np.array([[0, 1, 2, 3, 4, 5], [0, 5, 4, 3, 2, 1]], np.int32)  # token 0 only at position 0, all distinct
T = TOKENS.shape[1]
C = 4.0  # planted logits sqrt(8) * C^2 ~ 45: the chosen keys take all the weight


def tiny_model(norm="rmsnorm", tie=True):
    """2 layers x 2 heads, d_model = head_dim = vocab = 8, no positional encoding."""
    return DecoderLM(
        vocab_size=8,
        num_layers=2,
        d_model=8,
        num_heads=2,
        head_dim=8,
        mlp_dim=8,
        norm=norm,
        tie_embeddings=tie,
        attention_options={"position": "none"},
    )


def init_params(model, seed=0):
    params = nn.meta.unbox(model.init(jax.random.key(seed), jnp.asarray(TOKENS))["params"])
    return jax.tree.map(lambda a: np.array(a, np.float64), params)


def planted(patterns):
    """patterns[layer][head] in {"sink", "self", "uniform"}: one-hot embeddings, zero feed-forward and output
    projections (the residual stream stays the token's one-hot vector), queries/keys planted per head."""
    model = tiny_model()
    params = init_params(model)
    params["embedding"]["embedding"] = np.eye(8)
    for layer, heads in enumerate(patterns):
        block = params[f"layers_{layer}"]
        block["feed_forward"]["wo"]["kernel"][:] = 0.0
        attention = block["attention"]
        attention["out"]["kernel"][:] = 0.0
        q, k = attention["query"]["kernel"], attention["key"]["kernel"]  # [E, H, D]
        q[:], k[:] = 0.0, 0.0
        for head, pattern in enumerate(heads):
            if pattern == "sink":  # every query points along d0; only token 0's key does
                q[:, head, 0], k[0, head, 0] = C, C
            elif pattern == "self":  # q . k large only for the same token
                q[:, head, :], k[:, head, :] = C * np.eye(8), C * np.eye(8)
    return model, params


BATCHES = [{"inputs": TOKENS}]
H6 = sum(1 / (i + 1) for i in range(T))  # uniform causal weight on token 0, summed over queries


def test_sink_rate_of_planted_heads():
    model, params = planted([("sink", "self"), ("uniform", "sink")])
    result = SinkRate(epsilon=0.3).evaluate(model, params, BATCHES)
    np.testing.assert_allclose(result["sink_metric"], [[1.0, 1 / T], [H6 / T, 1.0]], atol=1e-6)
    assert result["head_rate"] == [[1.0, 0.0], [1.0, 1.0]] and result["sink_rate"] == 0.75
    assert result["layer_rate"] == [0.5, 1.0] and result["fidelity"] == "official-code" and result["rows"] == 2
    strict = SinkRate(epsilon=0.5).evaluate(model, params, BATCHES)  # uniform causal mass 0.408 is below 0.5
    assert strict["head_rate"] == [[1.0, 0.0], [0.0, 1.0]] and strict["sink_rate"] == 0.5
    # alpha of token 2: queries 2..5; the self head gives it 1 at query 2 only
    later = SinkRate(token=2).evaluate(model, params, BATCHES)
    np.testing.assert_allclose(later["sink_metric"][0], [0.0, 1 / (T - 2)], atol=1e-6)
    with pytest.raises(ValueError, match="epsilon=1.5 must be in"):
        SinkRate(epsilon=1.5)
    with pytest.raises(ValueError, match="token=9 must index a position"):
        SinkRate(token=9).evaluate(model, params, BATCHES)


def test_attention_distance_of_planted_heads():
    model, params = planted([("sink", "self"), ("uniform", "sink")])
    result = AttentionDistance().evaluate(model, params, BATCHES)
    # sink: query t looks t back -> mean 2.5; self: 0; uniform causal: mean_t t / 2 = 1.25
    np.testing.assert_allclose(result["distance"], [[2.5, 0.0], [1.25, 2.5]], atol=1e-5)
    assert result["unit"] == "tokens" and result["layer_max"] == pytest.approx([2.5, 2.5], abs=1e-5)


def test_mean_distance_on_a_grid_with_a_class_token():
    # uniform attention over a 2x2 grid: each query sees distances 0, 1, 1, sqrt(2) patches
    uniform = np.full((1, 1, 4, 4), 0.25)
    expected = (2 + np.sqrt(2)) / 4
    assert mean_distance(uniform, (2, 2))[0] == pytest.approx(expected)
    assert mean_distance(uniform, (2, 2), patch_size=16)[0] == pytest.approx(16 * expected)
    # a class token taking half of every row is dropped and the patch weights renormalised
    with_cls = np.zeros((1, 1, 5, 5))
    with_cls[..., 0], with_cls[..., 1:] = 0.5, 0.125
    assert mean_distance(with_cls, (2, 2), prefix_tokens=1)[0] == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"grid=\(3, 2\) must be \(h, w\) with h \* w == 4"):
        mean_distance(uniform, (3, 2))


def test_arank_of_planted_maps():
    rng = np.random.default_rng(0)
    for rank in (1, 2, 3):  # nonnegative row-stochastic maps of rank r
        product = rng.random((8, rank)) @ rng.random((rank, 8))
        assert map_ranks(product / product.sum(axis=1, keepdims=True)) == rank
    model, params = planted([("sink", "sink"), ("self", "uniform")])
    result = ARank().evaluate(model, params, BATCHES)
    # every row of a sink head is e_0 (rank 1); self (identity) and uniform causal (triangular) maps are full rank
    assert result["rank"] == [[1.0, 1.0], [T, T]] and result["arank"] == [1.0, T]
    assert result["skip_order"] == [0, 1] and result["full_rank"] == T and result["fidelity"] == "reconstructed"


def _numpy_loss_and_probs(model, params):
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(TOKENS)), np.float64)[:, :-1]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    targets = TOKENS[:, 1:]
    nll = -np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return nll.mean(), logp


def test_head_ablation_zero_rows_change_nothing_and_matches_parameter_surgery():
    model = tiny_model()
    params = init_params(model)
    params["layers_0"]["attention"]["out"]["kernel"][0] = 0.0  # head (0, 0) writes nothing
    result = HeadAblation().evaluate(model, params, BATCHES)
    base, full_logp = _numpy_loss_and_probs(model, params)
    assert result["base_loss"] == pytest.approx(base, rel=1e-5)
    assert result["loss_delta"][0][0] == pytest.approx(0.0, abs=1e-6) and result["kl"][0][0] == pytest.approx(
        0, abs=1e-6
    )
    for layer in range(2):
        for head in range(2):
            surgery = jax.tree.map(np.copy, params)
            surgery[f"layers_{layer}"]["attention"]["out"]["kernel"][head] = 0.0
            loss, logp = _numpy_loss_and_probs(model, surgery)
            kl = (np.exp(full_logp) * (full_logp - logp)).sum(-1).mean()
            assert result["loss_delta"][layer][head] == pytest.approx(loss - base, abs=1e-5)
            assert result["kl"][layer][head] == pytest.approx(kl, abs=1e-6)
    assert result["most_important"][0] != [0, 0] and [0, 0] in result["most_important"]
    kl_ranked = HeadAblation(metric="kl", layers=(1,), heads=(1,)).evaluate(model, params, BATCHES)
    assert kl_ranked["score"] == [[result["kl"][1][1]]] and kl_ranked["layers"] == [1]
    with pytest.raises(ValueError, match=r"heads=\(2,\) holds \[2\], out of range: the model has 2 heads"):
        HeadAblation(heads=(2,)).evaluate(model, params, BATCHES)
    with pytest.raises(ValueError, match="metric='acc' must be one of"):
        HeadAblation(metric="acc")


def _rms(x):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6)


def _numpy_forward(params, tokens):
    """The planted-free 2-layer model in numpy (zero feed-forward): residual terms per head and the final stream."""
    x = params["embedding"]["embedding"][tokens]
    embed, head_terms = x.copy(), []
    causal = np.tril(np.ones((tokens.shape[1],) * 2, bool))
    for layer in range(2):
        attention, block = params[f"layers_{layer}"]["attention"], params[f"layers_{layer}"]
        h = _rms(x) * block["attention_norm"]["scale"]
        q, k, v = (np.einsum("bte,ehd->bhtd", h, attention[n]["kernel"]) for n in ("query", "key", "value"))
        logits = np.where(causal, np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(8), -np.inf)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        per_head = np.einsum("bhqk,bhkd,hde->bhqe", weights, v, attention["out"]["kernel"])  # [B, H, T, E]
        head_terms.append(per_head)
        x = x + per_head.sum(1)
    return embed, head_terms, x


def test_logit_attribution_matches_numpy_and_sums_to_the_logit():
    model = tiny_model()
    params = init_params(model, seed=1)
    for layer in range(2):
        params[f"layers_{layer}"]["feed_forward"]["wo"]["kernel"][:] = 0.0
    params["layers_1"]["attention"]["out"]["kernel"][1] = 0.0
    embed, head_terms, x = _numpy_forward(params, TOKENS)
    inv, gamma, table = (
        1 / np.sqrt((x**2).mean(-1) + 1e-6),
        params["final_norm"]["scale"],
        params["embedding"]["embedding"],
    )
    logits = (_rms(x) * gamma) @ table.T
    token = logits[:, -1].argmax(-1)
    u = table[token]  # [B, E]

    def dla(term):  # [B, T, E] at the last position -> [B]
        return ((term[:, -1] * inv[:, -1, None] * gamma) * u).sum(-1)

    result = LogitAttribution().evaluate(model, params, BATCHES)
    assert result["tokens"] == token.tolist()
    assert result["logit"] == pytest.approx(logits[[0, 1], -1, token].mean(), rel=1e-4)
    expected = [[dla(head_terms[layer][:, head]).mean() for head in range(2)] for layer in range(2)]
    np.testing.assert_allclose(result["heads"], expected, rtol=1e-4, atol=1e-6)
    assert result["heads"][1][1] == 0.0 and result["embedding"] == pytest.approx(dla(embed).mean(), rel=1e-4)
    np.testing.assert_allclose(result["feed_forward"] + result["attention_rest"], 0.0, atol=1e-5)
    assert result["max_abs_sum_error"] < 1e-4 and result["final_norm_bias"] == 0.0
    fixed = LogitAttribution(position=2, token=3).evaluate(model, params, BATCHES)
    assert fixed["tokens"] == [3, 3] and fixed["max_abs_sum_error"] < 1e-4
    with pytest.raises(ValueError, match="position=6 is out of range for sequences of 6 tokens"):
        LogitAttribution(position=6).evaluate(model, params, BATCHES)


@pytest.mark.parametrize("norm, tie", [("layernorm", True), ("rmsnorm", False)])
def test_logit_attribution_sums_with_layernorm_and_untied_head(norm, tie):
    model = tiny_model(norm=norm, tie=tie)
    params = init_params(model, seed=2)
    if norm == "layernorm":
        params["final_norm"]["bias"][:] = np.linspace(-1, 1, 8)
    result = LogitAttribution().evaluate(model, params, BATCHES)
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(TOKENS)))[:, -1]
    assert result["logit"] == pytest.approx(logits.max(-1).mean(), rel=1e-4)
    assert result["max_abs_sum_error"] < 1e-4 and (result["final_norm_bias"] != 0.0) == (norm == "layernorm")
    np.testing.assert_allclose(result["attention_rest"], 0.0, atol=1e-5)


def test_write_json_and_png(tmp_path):
    model, params = planted([("sink", "self"), ("uniform", "sink")])
    tool = SinkRate()
    result = tool.evaluate(model, params, BATCHES)
    paths = tool.write(result, str(tmp_path / "sink" / "sink_rate.json"))
    assert json.loads(open(paths[0]).read())["head_rate"] == result["head_rate"]
    assert open(paths[1], "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["options"] == {"epsilon": 0.3, "token": 0} and result["paper"].startswith("[156]")
    with pytest.raises(ValueError, match="batches must be a non-empty sequence"):
        tool.evaluate(model, params, [])


def test_a_mechanism_without_attention_weights_is_refused_in_one_line():
    model = DecoderLM(vocab_size=8, num_layers=2, d_model=8, num_heads=2, mlp_dim=8, attention="linear")
    params = init_params(model)
    for tool in (SinkRate(), AttentionDistance(), ARank()):
        with pytest.raises(ValueError, match="record no 'attention_weights'"):
            tool.evaluate(model, params, BATCHES)
