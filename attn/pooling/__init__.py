"""Attentive pooling: mechanisms that summarise a token sequence x [batch, length, embed] into one vector (or a few)
per example with learned attention over the tokens — probes and classification heads."""
