"""Exact (dense) softmax-attention mechanisms."""
