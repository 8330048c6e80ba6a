// SALE CUDA kernels: the compile-time constants the host code (binding.cpp, kernels/cuda_backend.py) relies on.
// Plain C++. kernels/constants.py holds the Python copies; tests/test_constants.py checks that they agree.
#pragma once

namespace sale {

constexpr int kBlockQ = 64;          // query rows per block (the only supported value)
constexpr int kBlockK = 32;          // keys per block (the only supported value)
constexpr int kRowPad = 64;          // quantized Q/K buffers hold whole multiples of this many rows
constexpr int kMaxGroup = 16;        // most query heads per kv head
constexpr int kHeadDimSmall = 64;    // the two supported head dims
constexpr int kHeadDimLarge = 128;
constexpr int kBitmapWordBits = 32;  // key blocks per word of the selection bitmap
constexpr int kColsumRows = 256;     // rows per partial column-sum chunk (stage 1)

}  // namespace sale
