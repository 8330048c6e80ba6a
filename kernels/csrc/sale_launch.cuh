// SALE CUDA kernels: host-side launcher declarations (plain C++, included by binding.cpp and the .cu files).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "sale_config.cuh"

namespace sale {

// Whether the current device runs the wgmma kernels: compute capability 9.0 gets the sm_90a build
// (cuda_backend._arch_flag), every other device a build without wgmma.
inline bool wgmma_device() {
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) return false;
  return major == 9 && minor == 0;
}

// ---- stage 1: quantization -----------------------------------------------------------------
// partial[bh, chunk, c] = sum of x[bh, chunk*kColsumRows : ..., c]  (fp32, deterministic)
cudaError_t launch_colsum(const void* x, float* partial, int BH, int L, int D, int nchunk, bool bf16,
                          cudaStream_t stream);

struct QuantParams {
  const void* x;        // [BH, L, D] fp16/bf16, contiguous
  const float* mean;    // [BH, D]
  int8_t* xi;           // [BH, Lpad, ib]: int8, or int4 packed two per byte (low nibble = even channel)
  float* step;          // [BH, Lpad]
  const float* qmean;   // K only: query-head means [B, Hq, D] (nullptr for Q)
  float* qm;            // K only: qm[b, hq, j] = qmean[b,hq] . ks[b,hkv,j]  [B, Hq, Lpad]
  int L, Lpad, H;       // H: heads of x
  int G;                // K only: query heads per kv head
  int group_rows;       // 1 (per_token) or the block size (per_block); divides 64
  int qmax;             // 127 (int8) or 7 (int4)
  int ib;               // bytes per quantized row: D (int8) or D / 2 (int4)
  // Q only: c[b, hq, i] = scale * q_i . kmean[b, hq / G]  (the logit shift of smoothing K), [B, Hq, Lpad]
  const float* kmean;   // [B, Hkv, D] or nullptr
  float* qkm;
  float scale;
};
cudaError_t launch_smooth_quant(const QuantParams& p, int BH, int D, bool bf16, cudaStream_t stream);

// ---- stage 2: selection ----------------------------------------------------------------------
// Queries are the last Lq of Lk positions (bottom-right causal): call row i is at absolute position i + off,
// off = Lk - Lq >= 0, and sees the keys j <= i + off. Query-side buffers are Lq (LqPad) long, key-side Lk (LkPad).
struct SelectParams {
  const void* q;        // [B, Hq, Lq, D]
  const void* k;        // K [B, Hkv, Lk, D] (unsmoothed: logits are shifted by -qkm, exactly the smoothed ones)
  const int8_t* qi;     // [B, Hq, LqPad, IB] (IB = D for int8, D / 2 for packed int4)
  const float* sq;      // [B, Hq, LqPad]
  const int8_t* ki;     // [B, Hkv, LkPad, IB]
  const float* sk;      // [B, Hkv, LkPad]
  const float* qm;      // [B, Hq, LkPad]
  const float* qmb;     // [B, Hq, nKpad]: max of qm over each key block (nKpad = LkPad / 32)
  const float* skq;     // [B, Hkv, nKpad, 4]: max of sk over keys 8n + 2t + {0, 1} (n = 0..3) of each block, per t
  const float* qkm;     // [B, Hq, LqPad] scale * q_i . kmean
  const float* tau;     // [Hq]
  uint32_t* bits;       // out [B, Hq, nQ, nW]: bit kb of word kb/32 = key block kb computed (nQ of Lq, nK of Lk)
  int* pairs;           // out [B, Hq] (zeroed by the caller): computed (qblock, kblock) pairs
  int B, Hq, Hkv, Lq, Lk, LqPad, LkPad, off, nQ, nK, nW, nKpad;
  int sink_tokens, local_window;
  float scale;
};
// one CTA per (b, query block, up to 4 query heads of a kv group), shared integer K tiles, prefilter;
// int4: packed int4 estimate (m16n8k64 s4 mma.sync on every arch), else int8 (wgmma on sm_90a)
cudaError_t launch_select(const SelectParams& p, int D, bool bf16, bool int4, cudaStream_t stream);

// ---- stage 3: block-sparse attention -----------------------------------------------------------
struct ComputeParams {
  const void* q;        // [B, Hq, Lq, D]
  const void* k;        // K [B, Hkv, Lk, D] (softmax is invariant to the smoothing shift, so the original K
                        // is used: exact in the input dtype, and lse comes out for the original logits)
  const void* v;        // [B, Hkv, Lk, D]
  const uint32_t* bits; // [B, Hq, nQ, nW]
  void* o;              // [B, Hq, Lq, D]
  float* lse;           // [B, Hq, Lq] or nullptr
  int B, Hq, Hkv, Lq, Lk, off, nQ, nW;  // off = Lk - Lq (bottom-right causal, as in SelectParams)
  float scale_log2;     // scale * log2(e)
};
cudaError_t launch_compute(const ComputeParams& p, int D, bool bf16, cudaStream_t stream);

}  // namespace sale
