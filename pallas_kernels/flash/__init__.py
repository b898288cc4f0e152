"""Flash attention kernels: `flash_attention` (dispatching entry), `flash_attention_reference` (dense jnp).

Files: api.py (checks, normalisation, backend choice), reference.py (ground truth), tiling.py (tile math shared
by the kernels), gpu.py + gpu_plan.py + gpu_forward.py + gpu_backward.py (Pallas on Triton), tpu*.py (Mosaic).
"""

from pallas_kernels.flash.api import flash_attention
from pallas_kernels.flash.reference import flash_attention_reference

__all__ = ["flash_attention", "flash_attention_reference"]
