// SALE CUDA kernels: turn runtime launch arguments into template arguments, one switch per argument.
// Each macro runs BODY (a lambda, the variadic argument) with NAME bound to a compile-time value and returns what
// BODY returns; switches nest, so a launcher reads as one line per template argument:
//   return SALE_DTYPE_SWITCH(bf16, T, [&] { return SALE_HEADDIM_SWITCH(D, kD, [&] { return f<T, kD>(p); }); });
// Every branch is instantiated (as with the if/else chains it replaces). An unsupported head dim returns
// cudaErrorInvalidValue.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "sale_config.cuh"

// NAME: a bool constant equal to COND
#define SALE_BOOL_SWITCH(COND, NAME, ...)  \
  [&] {                                    \
    if (COND) {                            \
      static constexpr bool NAME = true;   \
      return __VA_ARGS__();                \
    }                                      \
    static constexpr bool NAME = false;    \
    return __VA_ARGS__();                  \
  }()

// TYPE: __nv_bfloat16 if BF16, else __half
#define SALE_DTYPE_SWITCH(BF16, TYPE, ...) \
  [&] {                                    \
    if (BF16) {                            \
      using TYPE = __nv_bfloat16;          \
      return __VA_ARGS__();                \
    }                                      \
    using TYPE = __half;                   \
    return __VA_ARGS__();                  \
  }()

// NAME: an int constant equal to DIM, one of the supported head dims
#define SALE_HEADDIM_SWITCH(DIM, NAME, ...)                \
  [&]() -> cudaError_t {                                   \
    if ((DIM) == ::sale::kHeadDimSmall) {                  \
      static constexpr int NAME = ::sale::kHeadDimSmall;   \
      return __VA_ARGS__();                                \
    }                                                      \
    if ((DIM) == ::sale::kHeadDimLarge) {                  \
      static constexpr int NAME = ::sale::kHeadDimLarge;   \
      return __VA_ARGS__();                                \
    }                                                      \
    return cudaErrorInvalidValue;                          \
  }()
