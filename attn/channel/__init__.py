"""Channel and spatial attention modules for convolutional networks (NHWC in, NHWC out).

Each module gates or re-weights a feature map x [batch, height, width, channels] and returns the same shape:
`eca` (ECA-Net), `ela` (Efficient Local Attention), `ulsam` (subspace attention), `polarized` (Polarized
Self-Attention), `lka` (VAN large-kernel attention), `cape` (PDE-parameter-conditioned channel attention),
`dual_attention` (position + channel attention with semantic guidance), `class_semantic` (class
semantics-based attention) and `medusa` (one self-attention body decoded into gate heads at several scales).
`attn.models.cnn.CNN` inserts any of them per stage by registry name.
"""
