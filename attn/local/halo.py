"""`halo`: blocked local self-attention with haloing, from "Scaling Local Self-Attention for Parameter Efficient
Visual Backbones" (Vaswani et al., HaloNet, catalog [72]).

The 2-D token grid [H, W] is split into non-overlapping query blocks of b_0 x b_1 tokens. Every query of a block
attends to the same (b_0 + 2 h_0) x (b_1 + 2 h_1) key/value neighbourhood: its block plus a halo of h tokens on
each side. Where the halo leaves the image the grid is zero-padded. With 2-D relative position embeddings
(HaloNet's row + column form, as in its reference code: one table per axis, shared by the heads):

    q, k, v = x W_q, x W_k, x W_v                                             heads H, kv heads KVH
    l_ij = (q_i . k_j + q_i . r^row[row(j) - row(i)] + q_i . r^col[col(j) - col(i)]) / sqrt(D)
    o_i  = sum_{j in halo(block(i))} softmax_j(l_ij) v_j,        y = concat_h(o) W_o

r^row: float [2 (b_0 + h_0) - 1, D], r^col: float [2 (b_1 + h_1) - 1, D] (option `rel_pos`); the offset key - query
of a key in the haloed window lies in [-(b + h - 1), b + h - 1] per axis. The relative logits share the 1/sqrt(D)
scale of the content logits (the Stand-Alone Self-Attention / BoTNet form).

Border padding (`mask_padding`): in the paper every block, border blocks included, gets the full (b + 2h)^2 memory
(its Fig. 1 cuts a [4, 4, c] memory around each block of a [4, 4, c] image with b = 2, h = 1, and projects it to
keys and values), and no attention mask is described (it calls its blocked attention non-masked).
mask_padding=False (default) does that: a padded position is a zero pixel, so its key and value are the
projections of 0 (the k / v biases, or 0 with use_bias=False) and it takes part in the softmax like any key.
timm's `HaloAttn` also attends to the padding unmasked but pads k and v after their projection (zero keys and
values even with qkv_bias): the two agree when use_bias=False. mask_padding=True masks the padded keys out instead
(lucidrains/halonet-pytorch; a border block then sees only its real neighbours, like `window` at the grid's edge).

Extents that are not a multiple of the block are padded at the end the same way (HaloNet requires multiples): the
last block is partial and its padded queries are dropped.

Implementation: the query blocks come from `attn.core.windows.partition_windows`; the haloed key windows are
gathered once per block with a flat index table (`halo_key_table`); attention is `attn.functional.softmax_attention`
batched over blocks with the relative logits as its bias, and either the padding mask (mask_padding=True) or the
zero-pixel keys and values in the padded slots.

Shapes: x [B, H, W, E] -> [B, H, W, E]. Time O(B N (b + 2h)^2 H D) and memory O(B N (b + 2h)^2 (H + KVH D / b^2))
for N = H W tokens (never N x N). halo_size = 0 is non-overlapping window attention (`window` with
window_size = block_size; with mask_padding=True where the extents are not multiples of the block); block_size =
(H, W) with halo_size = 0 and rel_pos=False is plain softmax attention over the flattened tokens. No causal
masking, no decoding. Captured weights are over the real tokens: with mask_padding=False a row sums to 1 minus the
mass on the padding.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn import functional as F
from attn.core.layer import AttentionCall, SpatialAttentionLayer
from attn.core.neighborhood import IntPerAxis, per_axis
from attn.core.validation import check_rank, choice, int_or_pair, non_negative_int, optional, positive, positive_int
from attn.core.windows import dense_window_probs, partition_windows, unpartition_windows, window_key_mask
from attn.registry import register

Array = jax.Array


def halo_plan(
    spatial: tuple[int, ...], block_size: IntPerAxis, halo_size: IntPerAxis
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(block, halo) per axis, each block within its extent; ValueError naming the option otherwise (the layer's
    validators check the values themselves)."""
    rank = len(spatial)
    block = per_axis("block_size", block_size, rank, int)
    halo = per_axis("halo_size", halo_size, rank, int)
    for axis, (n, b) in enumerate(zip(spatial, block, strict=True)):
        if not 1 <= b <= n:
            raise ValueError(
                f"block_size={block} must be between 1 and the extent on every axis; axis {axis} has block {b} "
                f"and extent {n} (spatial shape {spatial})"
            )
    return block, halo


def halo_key_table(spatial: tuple[int, ...], block: tuple[int, ...], halo: tuple[int, ...]):
    """The haloed key window of every query block, as flat token indices.

    Returns (keys int32 [num_blocks, K], valid bool [num_blocks, K]) with K = prod(b + 2h): blocks and window slots
    are row-major (the block order of `partition_windows`); keys outside the grid are clipped to a real token and marked
    invalid.
    """
    keys = np.zeros((1,) * (2 * len(spatial)), np.int64)
    valid = np.ones((1,) * (2 * len(spatial)), bool)
    token_stride = 1
    for axis in reversed(range(len(spatial))):
        n, b, h = spatial[axis], block[axis], halo[axis]
        index = np.arange(-(-n // b))[:, None] * b - h + np.arange(b + 2 * h)[None, :]  # [blocks, b + 2h]
        shape = [1] * (2 * len(spatial))
        shape[axis], shape[len(spatial) + axis] = index.shape
        keys = keys + np.clip(index, 0, n - 1).reshape(shape) * token_stride
        valid = valid & ((index >= 0) & (index < n)).reshape(shape)
        token_stride *= n
    full = np.broadcast_shapes(keys.shape, valid.shape)
    num_blocks, size = math.prod(full[: len(spatial)]), math.prod(full[len(spatial) :])
    keys = np.broadcast_to(keys, full).reshape(num_blocks, size).astype(np.int32)
    return keys, np.broadcast_to(valid, full).reshape(num_blocks, size)


def relative_offsets(block: int, halo: int) -> np.ndarray:
    """int32 [b, b + 2h]: index into a [2 (b + h) - 1] table of the offset (key - query) along one axis, for query
    i of a block and slot t of its haloed window (the key at block_start - h + t)."""
    return (np.arange(block + 2 * halo)[None, :] - halo - np.arange(block)[:, None] + block + halo - 1).astype(np.int32)


@register(
    "halo",
    family="local",
    paper="Scaling Local Self-Attention for Parameter Efficient Visual Backbones",
    catalog=72,
    input_kind="spatial",
    supports_causal=False,
    supports_decode=False,
    summary="HaloNet blocked local attention: b x b query blocks attend to their block plus a halo, 2-D rel. pos.",
    option_docs={
        "block_size": "query block size per axis (int or pair); the grid is cut into non-overlapping blocks",
        "halo_size": "halo per side (int or pair, >= 0): each block attends to (b + 2h) x (b + 2h) keys around it",
        "rel_pos": "2-D relative position embeddings (row and column tables [2 (b + h) - 1, head_dim]), q . r logits",
        "scale": "logit scale (None = 1/sqrt(head_dim)), applied to content and relative logits",
        "mask_padding": "False (the paper, Fig. 1): zero-padded border pixels are keys/values like any other; True: "
        "they are masked out",
    },
    fidelity="paper",
    reference="HaloNet paper (arXiv 2103.12731): blocked local attention with haloing; border padding from its Fig. 1 "
    "caption (a full [b + 2h]^2 memory per block, linearly transformed to keys and values) and its statement that "
    "the blocked attention is non-masked (the full text was not available here; both read from quotes in reviews "
    "and independent implementations); 2-D relative embeddings as in its reference code (row + column tables); "
    "compared with timm HaloAttn (pads k/v after projection, unmasked) and lucidrains/halonet-pytorch (masked)",
    validators={
        "block_size": int_or_pair(positive_int),
        "halo_size": int_or_pair(non_negative_int),
        "scale": optional(positive),
        "mask_padding": choice(True, False),
    },
)
class HaloAttention(SpatialAttentionLayer):
    """HaloNet attention: x [B, H, W, E] -> [B, H, W, E]."""

    block_size: IntPerAxis = 8
    halo_size: IntPerAxis = 3
    rel_pos: bool = True
    scale: float | None = None
    mask_padding: bool = False

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        check_rank("x", call.x, 4, "[batch, height, width, embed] (halo attention is 2-D)")

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """q [B, H, W, heads, D], k/v [B, H, W, KVH, D] -> [B, H, W, heads, D]; sows the dense weights float32
        [B, heads, N, N] when captured."""
        batch, *spatial = q.shape[:-2]
        spatial = tuple(spatial)
        block, halo = halo_plan(spatial, self.block_size, self.halo_size)
        scale = self.head_dim**-0.5 if self.scale is None else self.scale

        queries, _ = partition_windows(q, block)  # [B * nB, T, H, D]
        num_blocks = queries.shape[0] // batch
        key_table, valid = halo_key_table(spatial, block, halo)
        flat_keys = jnp.asarray(key_table.reshape(-1))
        tokens = math.prod(spatial)

        def gather(t: Array) -> Array:
            flat = jnp.take(t.reshape(batch, tokens, *t.shape[-2:]), flat_keys, axis=1)
            return flat.reshape(batch * num_blocks, key_table.shape[1], *t.shape[-2:])

        keys, values = gather(k), gather(v)
        mask = window_key_mask(valid, batch)
        if not self.mask_padding and not valid.all():
            # Keys and values of the zero pixels that pad the grid: the projections of 0.
            real = jnp.asarray(np.tile(valid, (batch, 1)))[:, :, None, None]
            keys = jnp.where(real, keys, self.zero_pixel_projection("key", keys.dtype))
            values = jnp.where(real, values, self.zero_pixel_projection("value", values.dtype))
            mask = None
        bias = None
        if self.rel_pos:
            bias = self.relative_logits(queries.reshape(batch, num_blocks, *queries.shape[1:]), block, halo) * scale

        capture = self.wants_weights()
        result = F.softmax_attention(
            queries,
            keys,
            values,
            mask=mask,
            bias=bias,
            scale=scale,
            dropout_rate=self.effective_dropout(call.deterministic),
            dropout_rng=self.dropout_rng(call.deterministic),
            return_probs=capture,
            implementation=self.implementation,
        )
        if capture:
            result, aux = result
            probs = aux["probs"] * jnp.asarray(np.tile(valid, (batch, 1)))[:, None, None, :]  # drop the padding
            self.sow_capture("attention_weights", dense_window_probs(probs, spatial, block, key_indices=key_table))
        return unpartition_windows(result, spatial, block)

    def zero_pixel_projection(self, name: str, dtype: jnp.dtype) -> Array:
        """The "key" / "value" projection of a zero input pixel, [KVH, D]: the projection's bias, or zeros."""
        params = self.variables["params"][name]
        if "bias" in params:
            return jnp.asarray(nn.unbox(params["bias"]), dtype)
        return jnp.zeros((self.kv_heads, self.head_dim), dtype)

    def relative_logits(self, queries: Array, block: tuple[int, ...], halo: tuple[int, ...]) -> Array:
        """q . r^row + q . r^col for query blocks [B, nB, b0 * b1, H, D] -> float32 [B * nB, H, b0 * b1, K]."""
        batch, num_blocks, _, heads, head_dim = queries.shape
        tables = []
        for axis, name in enumerate(("rel_height", "rel_width")):
            table = self.param(
                name,
                nn.with_logical_partitioning(nn.initializers.normal(head_dim**-0.5), (None, "head_dim")),
                (2 * (block[axis] + halo[axis]) - 1, head_dim),
                self.param_dtype,
            )
            # [b, b + 2h, D]: the embedding of every (query row, window row) pair along this axis.
            tables.append(jnp.take(jnp.asarray(table, jnp.float32), relative_offsets(block[axis], halo[axis]), 0))
        q = queries.reshape(batch, num_blocks, block[0], block[1], heads, head_dim).astype(jnp.float32)
        rows = jnp.einsum("bnijhd,itd->bnhijt", q, tables[0])
        cols = jnp.einsum("bnijhd,jsd->bnhijs", q, tables[1])
        logits = rows[..., :, None] + cols[..., None, :]  # [B, nB, H, b0, b1, b0 + 2h0, b1 + 2h1]
        return logits.reshape(batch * num_blocks, heads, block[0] * block[1], -1)
