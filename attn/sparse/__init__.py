"""Dynamic sparse attention: a selector (q, k -> key blocks per query block) plus the block-sparse core.

A selector maps q [B, Tq, H, D] and k [B, Tk, KVH, D] to block indices int32 [B, H, ceil(Tq / block_size),
max_selected] (the index format of `attn.core.block_sparse`, -1 = padding); the layer then runs
`attn.core.block_sparse.block_sparse_attention` over the selected blocks. One file per system:

    hip          HiP attention: hierarchical top-k pruning of key blocks (`hip_block_indices`)
    flexprefill  FlexPrefill: per-head query-aware or vertical-slash pattern, cumulative-attention budget
                 (`flexprefill_block_mask`, `flexprefill_block_indices`)
    seer         SeerAttention: a learned gate over block-pooled q/k, self-distilled (`seer_block_indices`)
    longheads    LongHeads: per-head chunk selection by chunk representations (`longheads_block_indices`)
    top_m        top-m attention: the m highest logits per query (or blocks) (`top_m_block_indices`)
    recycled     Recycled Attention: decoding alternates full steps and the last full step's top-K keys (a cache policy)
    dma          Dynamic Mask Attention: a trainable value-derived key bias picks each query's keys (`dma_indices`)
    hcam         HCAM: chunk-summary attention picks chunks, attention inside each, mixed (`hcam_selection`)
    landmark     Landmark Attention: a landmark token per block, grouped softmax, top-k block retrieval
                 (`landmark_attention`, `insert_landmarks`)
    hyper        HyperAttention: sortLSH diagonal blocks (block-sparse core) + sampled columns, causal recursion
                 (`hyper_attention`, `hyper_unmasked`)
    sparsifiner  Sparsifiner: a learned low-rank connectivity predictor keeps each query's top keys (vision)
                 (`sparsifiner_approx_attention`, `sparsifiner_indices`)
    rettention   Re-ttention: local-window attention across diffusion steps, rescaled by the cached kept-mass ratio
                 plus a cached residual (`rettention_parts`)
    tidal        TidalDecode: token-selection layers' top-k positions reused by the later layers at decode steps
                 (`tidal_positions`; the cross-layer carry is attn.core.layer_carry)

`selector_layer.BlockSelectorLayer` is the shared layer: softmax-family options, the selection in `prepare`, the
block-sparse core in `attend` (or the dense masked path when interventions, captures or dropout need the weights).
"""
