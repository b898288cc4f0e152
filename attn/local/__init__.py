"""Local and structured attention over spatial token layouts [batch, *spatial, embed] (1-D, 2-D, 3-D):
neighborhood attention (NA, dilated NA, generalized/strided NA) on the shared core `attn.core.neighborhood`,
non-overlapping window attention, and the other local patterns (criss-cross, CSWin stripes, DaViT, halo, HiLo,
S2, arrow, spatial-sparse and swap attention)."""
