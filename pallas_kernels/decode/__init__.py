"""Split-KV decode kernels: `decode_partials` (dispatching entry), `decode_partials_reference` (dense jnp).

Files: api.py (checks, backend choice), partition.py (the stream-K-style share of key tiles per program),
reference.py (ground truth of the partials), layout.py (the query/output layouts both kernels use), gpu.py (Pallas
on Triton), tpu.py (Pallas Mosaic; not yet run on a TPU). The partials are merged by log-sum-exp in
attn.core.lse_merge; attn.core.kv_cache dispatches decoding here.
"""

from pallas_kernels.decode.api import decode_partials
from pallas_kernels.decode.reference import decode_partials_reference

__all__ = ["decode_partials", "decode_partials_reference"]
