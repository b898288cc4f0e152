"""Block-sparse attention kernels: `block_sparse_attention` (dispatching entry), `block_sparse_attention_reference`.

Files: api.py (checks, backend choice), reference.py (dense ground truth), index_lists.py (the per-query-block and
transposed per-key-block lists the kernels loop over), layout.py (static plan, token mask, blocked layout), gpu.py
(Pallas on Triton: forward, dQ, dK/dV), tpu.py (Pallas Mosaic with scalar-prefetched index lists).
"""

from pallas_kernels.block_sparse.api import block_sparse_attention
from pallas_kernels.block_sparse.reference import block_sparse_attention_reference

__all__ = ["block_sparse_attention", "block_sparse_attention_reference"]
