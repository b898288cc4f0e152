"""KV-cache policies: softmax attention layers whose decode cache keeps a budget of entries chosen by a policy
(`attn.core.cache.CachePolicy`) instead of every token. `policy_layer.PolicyAttention` is their base; `streaming`
(StreamingLLM: attention sinks plus a recent window) is the first policy."""
