// SALE stage 1: smoothing and symmetric int8 / int4 quantization of Q and K.
//   colsum_partial: deterministic per-channel partial sums (means are finished by the binding).
//   smooth_quant:   x_s = x - mean (fp32), step = max|x_s| / qmax over the scale group (row or block; qmax 127
//                   or 7), x_int = round_half_even(x_s / step) (int4: two per byte, low nibble = even channel);
//                   for K also qm[b, hq, j] = q_mean[hq] . k_s[j] for every query head of the group.
#include "sale_common.cuh"
#include "sale_launch.cuh"
#include "sale_static_switch.cuh"

namespace sale {

namespace {
constexpr int kQuantRowsPerWarp = 8;
constexpr int kQuantThreads = 64 / kQuantRowsPerWarp * 32;  // one CTA per 64 rows
}  // namespace

template <typename T, int D>
__global__ void __launch_bounds__(128) colsum_partial_kernel(const T* __restrict__ x, float* __restrict__ partial,
                                                             int L, int nchunk) {
  constexpr int CPR = D / 8;        // 16-byte chunks per row
  constexpr int RG = 128 / CPR;     // rows in flight per CTA
  __shared__ float red[RG][D];
  const int chunk = blockIdx.x;
  const int bh = blockIdx.y;
  const int tid = threadIdx.x;
  const int c8 = tid % CPR;
  const int rg = tid / CPR;
  const T* base = x + (size_t)bh * L * D;
  const int rbeg = chunk * kColsumRows;
  const int rend = min(rbeg + kColsumRows, L);
  float acc[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[e] = 0.f;
  for (int r = rbeg + rg; r < rend; r += RG) {
    const uint4 u = *reinterpret_cast<const uint4*>(base + (size_t)r * D + c8 * 8);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 f = TypeTraits<T>::unpack2(w[e]);
      acc[2 * e] += f.x;
      acc[2 * e + 1] += f.y;
    }
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) red[rg][c8 * 8 + e] = acc[e];
  __syncthreads();
  if (tid < D) {
    float s = 0.f;
#pragma unroll
    for (int g = 0; g < RG; ++g) s += red[g][tid];
    partial[((size_t)bh * nchunk + chunk) * D + tid] = s;
  }
}

// One CTA = 64 rows (8 warps x 8 rows), one warp per row at a time, EPL = D/32 channels per lane. 8 rows per warp
// keep it at 64 registers, 4 CTAs (32 warps) per SM: 23% faster than 4 warps x 16 rows (122 registers, 16 warps).
template <typename T, int D>
__global__ void __launch_bounds__(kQuantThreads, 4) smooth_quant_kernel(QuantParams p) {
  constexpr int EPL = D / 32;
  __shared__ float amax_s[64];
  __shared__ float qmean_s[16][D];
  const int bh = blockIdx.y;
  const int row0 = blockIdx.x * 64;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* xb = reinterpret_cast<const T*>(p.x) + (size_t)bh * p.L * D;
  const bool isK = p.qmean != nullptr;
  const int b = bh / p.H, h = bh % p.H;
  if (isK) {
    const int Hq = p.H * p.G;
    for (int i = threadIdx.x; i < p.G * D; i += kQuantThreads)
      qmean_s[i / D][i % D] = p.qmean[((size_t)b * Hq + h * p.G + i / D) * D + (i % D)];
  }
  float mean[EPL];
#pragma unroll
  for (int e = 0; e < EPL; ++e) mean[e] = p.mean[(size_t)bh * D + lane * EPL + e];

  const bool want_qkm = p.kmean != nullptr;
  float kmean[EPL];
  if (want_qkm) {
    const int kvrow = b * (p.H / p.G) + h / p.G;
#pragma unroll
    for (int e = 0; e < EPL; ++e) kmean[e] = p.kmean[(size_t)kvrow * D + lane * EPL + e];
  }

  // the warp's rows are loaded before any store (the stores below could alias x, which keeps the compiler from
  // hoisting later rows' loads above them: one memory latency per row)
  constexpr int RPW = kQuantRowsPerWarp;
  uint32_t raw[RPW][EPL / 2];
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int row = row0 + warp * RPW + rr;
    const T* src = xb + (size_t)row * D + lane * EPL;
    if constexpr (EPL == 4) {
      const uint2 u = row < p.L ? *reinterpret_cast<const uint2*>(src) : make_uint2(0u, 0u);
      raw[rr][0] = u.x;
      raw[rr][1] = u.y;
    } else {
      raw[rr][0] = row < p.L ? *reinterpret_cast<const uint32_t*>(src) : 0u;
    }
  }
  float val[RPW][EPL];
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int row = row0 + warp * RPW + rr;
    float am = 0.f;
    float kd = 0.f;
    if (row < p.L) {
      float f[EPL];
#pragma unroll
      for (int e = 0; e < EPL / 2; ++e) {
        const float2 fe = TypeTraits<T>::unpack2(raw[rr][e]);
        f[2 * e] = fe.x;
        f[2 * e + 1] = fe.y;
      }
#pragma unroll
      for (int e = 0; e < EPL; ++e) {
        if (want_qkm) kd = fmaf(f[e], kmean[e], kd);
        val[rr][e] = f[e] - mean[e];
        am = fmaxf(am, fabsf(val[rr][e]));
      }
    } else {
#pragma unroll
      for (int e = 0; e < EPL; ++e) val[rr][e] = 0.f;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, o));
    if (want_qkm) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) kd += __shfl_xor_sync(0xffffffffu, kd, o);
      if (lane == 0) p.qkm[(size_t)bh * p.Lpad + row] = p.scale * kd;
    }
    if (lane == 0) amax_s[warp * RPW + rr] = am;
  }
  __syncthreads();

  const size_t obase = (size_t)bh * p.Lpad;
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int lr = warp * RPW + rr;
    const int row = row0 + lr;
    float am = amax_s[lr];
    if (p.group_rows > 1) {
      const int g0 = (lr / p.group_rows) * p.group_rows;
      am = 0.f;
      for (int i = 0; i < p.group_rows; ++i) am = fmaxf(am, amax_s[g0 + i]);
    }
    const float step = __fdiv_rn(am, (float)p.qmax);  // IEEE division (no fast-math)
    const bool int4 = p.ib != D;
    const int nbits = int4 ? 4 : 8;
    const uint32_t emask = int4 ? 0xfu : 0xffu;
    uint32_t packed = 0u;
#pragma unroll
    for (int e = 0; e < EPL; ++e) {
      int iv = 0;
      if (step > 0.f) {
        iv = __float2int_rn(__fdiv_rn(val[rr][e], step));
        iv = max(-p.qmax, min(p.qmax, iv));
      }
      packed |= ((uint32_t)iv & emask) << (nbits * e);
    }
    int8_t* dst = p.xi + (obase + row) * p.ib + lane * EPL * nbits / 8;
    if (int4) {
      if constexpr (EPL == 4) {
        *reinterpret_cast<uint16_t*>(dst) = (uint16_t)packed;
      } else {
        *reinterpret_cast<uint8_t*>(dst) = (uint8_t)packed;
      }
    } else if constexpr (EPL == 4) {
      *reinterpret_cast<uint32_t*>(dst) = packed;
    } else {
      *reinterpret_cast<uint16_t*>(dst) = (uint16_t)packed;
    }
    if (lane == 0) p.step[obase + row] = step;
    if (isK) {
      const int Hq = p.H * p.G;
      for (int g = 0; g < p.G; ++g) {
        float s = 0.f;
#pragma unroll
        for (int e = 0; e < EPL; ++e) s = fmaf(qmean_s[g][lane * EPL + e], val[rr][e], s);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) p.qm[((size_t)b * Hq + h * p.G + g) * p.Lpad + row] = (row < p.L) ? s : 0.f;
      }
    }
  }
}

template <typename T, int D>
static cudaError_t colsum_dispatch(const void* x, float* partial, int BH, int L, int nchunk, cudaStream_t s) {
  dim3 grid(nchunk, BH);
  colsum_partial_kernel<T, D><<<grid, 128, 0, s>>>(reinterpret_cast<const T*>(x), partial, L, nchunk);
  return cudaGetLastError();
}

cudaError_t launch_colsum(const void* x, float* partial, int BH, int L, int D, int nchunk, bool bf16,
                          cudaStream_t stream) {
  return SALE_HEADDIM_SWITCH(D, kD, [&] {
    return SALE_DTYPE_SWITCH(bf16, T, [&] { return colsum_dispatch<T, kD>(x, partial, BH, L, nchunk, stream); });
  });
}

template <typename T, int D>
static cudaError_t sq_dispatch(const QuantParams& p, int BH, cudaStream_t s) {
  dim3 grid(p.Lpad / 64, BH);
  smooth_quant_kernel<T, D><<<grid, kQuantThreads, 0, s>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_smooth_quant(const QuantParams& p, int BH, int D, bool bf16, cudaStream_t stream) {
  if (p.Lpad % kRowPad != 0 || p.G > kMaxGroup || (p.group_rows != 1 && kRowPad % p.group_rows != 0))
    return cudaErrorInvalidValue;
  if (!((p.qmax == 127 && p.ib == D) || (p.qmax == 7 && p.ib == D / 2))) return cudaErrorInvalidValue;
  return SALE_HEADDIM_SWITCH(D, kD, [&] {
    return SALE_DTYPE_SWITCH(bf16, T, [&] { return sq_dispatch<T, kD>(p, BH, stream); });
  });
}

}  // namespace sale
