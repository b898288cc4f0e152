"""KV-cache policies: softmax attention layers whose decode cache keeps a budget of entries chosen by a policy
(`attn.core.cache.CachePolicy`) instead of every token. `policy_layer.PolicyAttention` is their base.

Eviction: `streaming` (attention sinks plus a recent window), `h2o`, `a2sf` and `tova` (by attention scores, shared
pieces in `score_eviction`), `scissorhands` (by how often a key was below average attention over a history window).
Prompt compression: `snapkv`, `pyramidkv` (per-layer budgets), `adakv` (per-head budgets). Quantized storage: `kivi`
(2-bit keys per channel, values per token, a full-precision residual), `zipcache` (salient tokens by normalized
attention at high bits, the rest at low bits), `zipvl_cache` (the same stores; the share at high bits per layer from
the attention distribution). Eviction with merging: `d2o` (evicted entries folded into the most
similar kept key above an EMA threshold; per-layer budgets from attention density), `ems` (head-wise: Global-Local
scores pick what stays, redundant evicted entries merge into kept ones, the rest drop). Learned eviction:
`attention_gate` (a small attention module over the layer input flags tokens per kv head; flagged ones leave).
Retrieval: `a2ats` (every token stored with a vector-quantization code; a decode step reads the window, sinks and the
top keys by query-aware codeword score). Weight quantization weighted by attention: `rsq` (functions, not a layer:
AttnCon token importance and GPTQ on the reweighted Hessian)."""
