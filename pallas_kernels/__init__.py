"""Pallas kernels (GPU and TPU) with their jnp references, custom VJPs and dispatch.

This package imports nothing from the rest of the project. Kernel families live in subfolders
(flash/, linear/, neighborhood/, block_sparse/, decode/, ring/) as they are added.
"""

from pallas_kernels.block_sparse import block_sparse_attention  # noqa: E402,F401
from pallas_kernels.flash import flash_attention  # noqa: E402,F401
from pallas_kernels.linear import lightning_attention  # noqa: E402,F401
