"""The SALE op's constants: option defaults and what the CUDA kernels are built for.

The CUDA side keeps its compile-time copies in ``csrc/sale_config.cuh``; tests/test_constants.py checks that
the two agree.
"""

from __future__ import annotations

# defaults of sale_attention / SaleOptions
BLOCK_Q = 64  # query rows per block
BLOCK_K = 32  # keys per block
SINK_TOKENS = None  # None = one key block
LOCAL_WINDOW = 128  # local window in tokens, always computed
ESTIMATE = "int8"
QUANT_GROUP = "per_token"
DENSE_BELOW = 1024  # calls with at most this many keys are exact dense attention
BACKEND = "auto"
TAU0 = 0.008  # calibration's starting tau of every head

# what the CUDA kernels take (sale_config.cuh)
CUDA_BLOCK_Q = BLOCK_Q
CUDA_BLOCK_K = BLOCK_K
CUDA_HEAD_DIMS = (64, 128)
CUDA_MAX_GROUP = 16  # query heads per kv head
CUDA_ROW_PAD = 64  # quantized Q/K buffers are padded to whole multiples of this many rows
BITMAP_WORD_BITS = 32  # key blocks per word of the selection bitmap
