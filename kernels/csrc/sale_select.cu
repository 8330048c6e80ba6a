// SALE stage 2: block selection. One CTA per (b, hq, 64-row query block), 4 warps x 16 rows.
//   A. exact fp32 statistics over the always-computed set R (sink + local blocks), on the smoothed logits
//      z_ij = scale * q_i . (k_j - kmean) = scale * q_i . k_j - c_i  (c_i = scale * q_i . kmean, from stage 1;
//      the original K is exact in the input dtype, a rounded smoothed copy would not be):
//      m_i = max_j z_ij, l_i = sum_j exp(z_ij - m_i), visible keys only;
//      per-row threshold thr_i = m_i + ln(tau) + ln(l_i) (+inf for rows past L).
//   B. for every visible key block outside R (a contiguous range [nsink, lstart)), the int8 estimate
//      zhat_ij = scale * (sq_i * sk_j * (Qint_i . Kint_j) + qm_j) with mma.sync m16n8k32 s8 (exact int32);
//      the block is selected iff some row i and key j have zhat_ij > thr_i.
//   Output: bitmap of computed key blocks (R | selected) per query block, and per-head pair counts.
//   tau == 0: every visible block.
#include "sale_common.cuh"
#include "sale_launch.cuh"

namespace sale {

namespace {
constexpr int kThreads = 128;
constexpr int kStagesB = 3;
constexpr int kTileKeys = 64;  // two key blocks per stage-B tile
}  // namespace

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) sale_select_kernel(SelectParams p) {
  constexpr bool BF = TypeTraits<T>::kBF16;
  constexpr int RB = D * 2;           // bytes per row (16-bit tiles)
  constexpr int IRB = D + 16;         // bytes per row (int8 tiles, padded: conflict-free ldmatrix)
  constexpr int Q_BYTES = kBlockQ * RB;
  constexpr int K_BYTES = kBlockK * RB;
  constexpr int IT_BYTES = kTileKeys * IRB;       // int8 K tile
  constexpr int F_BYTES = kTileKeys * 4;          // sk / qm tile
  constexpr int STAGE_B = IT_BYTES + 2 * F_BYTES;
  constexpr int REGION_A = Q_BYTES + K_BYTES;
  constexpr int REGION_B = kStagesB * STAGE_B;
  constexpr int REGION = REGION_A > REGION_B ? REGION_A : REGION_B;
  extern __shared__ __align__(128) unsigned char smem[];
  uint32_t* bitmap = reinterpret_cast<uint32_t*>(smem + REGION);

  const int qb = p.nQ - 1 - blockIdx.x;
  const int hq = blockIdx.y, b = blockIdx.z;
  const int hkv = hq / (p.Hq / p.Hkv);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const BlockRange br = block_range(qb, p.L, kBlockQ, kBlockK, p.sink_tokens, p.local_window);
  const float tau = p.tau[hq];

  for (int w = tid; w < p.nW; w += kThreads) {
    // R blocks (or every visible block when tau == 0)
    uint32_t m = 0u;
    const int lo = w * 32;
#pragma unroll 4
    for (int i = 0; i < 32; ++i) {
      const int kb = lo + i;
      const bool in = kb <= br.lend && (tau == 0.f || kb < br.nsink || kb >= br.lstart);
      m |= in ? (1u << i) : 0u;
    }
    bitmap[w] = m;
  }

  const int bstart = br.nsink, bend = br.lstart;  // candidate blocks [bstart, bend)
  if (tau > 0.f && bstart < bend) {
    // ---------------- A: exact statistics over R ----------------
    const uint32_t sQ = smem_u32(smem);
    const uint32_t sK = sQ + Q_BYTES;
    const T* qg = reinterpret_cast<const T*>(p.q) + ((size_t)(b * p.Hq + hq) * p.L + br.r0) * D;
    const T* kg = reinterpret_cast<const T*>(p.k) + (size_t)(b * p.Hkv + hkv) * p.L * D;
    constexpr int CPR = D / 8;
    for (int i = tid; i < kBlockQ * CPR; i += kThreads) {
      const int r = i / CPR, c = i % CPR;
      const bool ok = br.r0 + r < p.L;
      cp_async16(sQ + swz<RB>(r, c), ok ? qg + (size_t)r * D + c * 8 : qg, ok);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    uint32_t qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const int row = warp * 16 + (lane % 16);
      const int ch = kk * 2 + lane / 16;
      ldmatrix_x4(sQ + swz<RB>(row, ch), qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3]);
    }
    const int row_a = br.r0 + warp * 16 + g, row_b = row_a + 8;
    // smoothed logits z = scale * q . (k - kmean) = scale * q . k - c_row
    const float* qkmg = p.qkm + (size_t)(b * p.Hq + hq) * p.Lpad;
    const float c_a = qkmg[row_a], c_b = qkmg[row_b];
    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;
    const int nR = br.nsink + (br.lend - max(br.lstart, br.nsink) + 1);
    for (int ri = 0; ri < nR; ++ri) {
      const int kb = ri < br.nsink ? ri : max(br.lstart, br.nsink) + (ri - br.nsink);
      __syncthreads();  // previous K tile fully consumed
      for (int i = tid; i < kBlockK * CPR; i += kThreads) {
        const int r = i / CPR, c = i % CPR;
        const bool ok = kb * kBlockK + r < p.L;
        cp_async16(sK + swz<RB>(r, c), ok ? kg + ((size_t)kb * kBlockK + r) * D + c * 8 : kg, ok);
      }
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      float s[4][4];
#pragma unroll
      for (int n = 0; n < 4; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int np = 0; np < 2; ++np) {
          const int mi = lane / 8, r = lane % 8;
          const int key = np * 16 + (mi / 2) * 8 + r;
          const int ch = kk * 2 + (mi % 2);
          uint32_t b0, b1, b2, b3;
          ldmatrix_x4(sK + swz<RB>(key, ch), b0, b1, b2, b3);
          mma_16816<BF>(s[2 * np], qf[kk], b0, b1);
          mma_16816<BF>(s[2 * np + 1], qf[kk], b2, b3);
        }
      }
      float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
      for (int n = 0; n < 4; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = kb * kBlockK + n * 8 + 2 * t + (e & 1);
          const int row = (e < 2) ? row_a : row_b;
          const float z = __fsub_rn(__fmul_rn(s[n][e], p.scale), (e < 2) ? c_a : c_b);
          s[n][e] = key > row ? -INFINITY : z;
        }
        mx_a = fmaxf(mx_a, fmaxf(s[n][0], s[n][1]));
        mx_b = fmaxf(mx_b, fmaxf(s[n][2], s[n][3]));
      }
      mx_a = quad_max(mx_a);
      mx_b = quad_max(mx_b);
      const float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
      const float mu_a = (mn_a == -INFINITY) ? 0.f : mn_a;
      const float mu_b = (mn_b == -INFINITY) ? 0.f : mn_b;
      float ps_a = 0.f, ps_b = 0.f;
#pragma unroll
      for (int n = 0; n < 4; ++n) {
        ps_a += expf(s[n][0] - mu_a) + expf(s[n][1] - mu_a);
        ps_b += expf(s[n][2] - mu_b) + expf(s[n][3] - mu_b);
      }
      l_a = l_a * expf(m_a - mu_a) + ps_a;
      l_b = l_b * expf(m_b - mu_b) + ps_b;
      m_a = mn_a;
      m_b = mn_b;
    }
    l_a = quad_sum(l_a);
    l_b = quad_sum(l_b);
    const float log_tau = logf(tau);  // threshold = (m + ln tau) + ln l, the reference's order
    const float thr_a = row_a < p.L ? __fadd_rn(__fadd_rn(m_a, log_tau), logf(l_a)) : INFINITY;
    const float thr_b = row_b < p.L ? __fadd_rn(__fadd_rn(m_b, log_tau), logf(l_b)) : INFINITY;
    __syncthreads();  // region A is reused by stage B

    // ---------------- B: int8 estimate over candidate blocks ----------------
    // Qint fragments (m16n8k32 A layout), row-step and step-scaled keys.
    const int8_t* qig = p.qi + ((size_t)(b * p.Hq + hq) * p.Lpad + br.r0 + warp * 16) * D;
    uint32_t qa[D / 32][4];
#pragma unroll
    for (int kk = 0; kk < D / 32; ++kk) {
      qa[kk][0] = *reinterpret_cast<const uint32_t*>(qig + (size_t)g * D + kk * 32 + t * 4);
      qa[kk][1] = *reinterpret_cast<const uint32_t*>(qig + (size_t)(g + 8) * D + kk * 32 + t * 4);
      qa[kk][2] = *reinterpret_cast<const uint32_t*>(qig + (size_t)g * D + kk * 32 + 16 + t * 4);
      qa[kk][3] = *reinterpret_cast<const uint32_t*>(qig + (size_t)(g + 8) * D + kk * 32 + 16 + t * 4);
    }
    const float* sqg = p.sq + (size_t)(b * p.Hq + hq) * p.Lpad;
    const float sq_a = sqg[row_a], sq_b = sqg[row_b];
    const int8_t* kig = p.ki + (size_t)(b * p.Hkv + hkv) * p.Lpad * D;
    const float* skg = p.sk + (size_t)(b * p.Hkv + hkv) * p.Lpad;
    const float* qmg = p.qm + (size_t)(b * p.Hq + hq) * p.Lpad;
    const uint32_t sB = smem_u32(smem);
    const unsigned char* sBp = smem;
    const int ntile = (bend - bstart + 1) / 2;

    auto load_b = [&](int tile, int slot) {
      const int key0 = (bstart + 2 * tile) * kBlockK;
      const uint32_t base = sB + slot * STAGE_B;
      constexpr int ICPR = D / 16;
      for (int i = tid; i < kTileKeys * ICPR; i += kThreads) {
        const int r = i / ICPR, c = i % ICPR;
        cp_async16(base + r * IRB + c * 16, kig + (size_t)(key0 + r) * D + c * 16, true);
      }
      if (tid < 16) {
        cp_async16(base + IT_BYTES + tid * 16, skg + key0 + tid * 4, true);
      } else if (tid < 32) {
        cp_async16(base + IT_BYTES + F_BYTES + (tid - 16) * 16, qmg + key0 + (tid - 16) * 4, true);
      }
    };

#pragma unroll
    for (int s = 0; s < kStagesB - 1; ++s) {
      if (s < ntile) load_b(s, s);
      cp_async_commit();
    }
    for (int it = 0; it < ntile; ++it) {
      cp_async_wait<kStagesB - 2>();
      __syncthreads();
      if (it + kStagesB - 1 < ntile) load_b(it + kStagesB - 1, (it + kStagesB - 1) % kStagesB);
      cp_async_commit();
      const int slot = it % kStagesB;
      const uint32_t cKi = sB + slot * STAGE_B;
      const float* sks = reinterpret_cast<const float*>(sBp + slot * STAGE_B + IT_BYTES);
      const float* qms = reinterpret_cast<const float*>(sBp + slot * STAGE_B + IT_BYTES + F_BYTES);
      const int kb0 = bstart + 2 * it;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int kb = kb0 + half;
        if (kb >= bend) break;  // uniform
        // already selected by another warp (a benign race: bits are only ever added); warp-uniform
        if (__shfl_sync(0xffffffffu, (int)((reinterpret_cast<volatile uint32_t*>(bitmap)[kb >> 5] >> (kb & 31)) & 1u), 0)) continue;
        int acc[4][4];
#pragma unroll
        for (int n = 0; n < 4; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0;
#pragma unroll
        for (int kk = 0; kk < D / 32; ++kk) {
#pragma unroll
          for (int np = 0; np < 2; ++np) {
            const int mi = lane / 8, r = lane % 8;
            const int key = half * 32 + np * 16 + (mi / 2) * 8 + r;
            const int byte = kk * 32 + (mi % 2) * 16;
            uint32_t b0, b1, b2, b3;
            ldmatrix_x4(cKi + key * IRB + byte, b0, b1, b2, b3);
            mma_s8_16832(acc[2 * np], qa[kk], b0, b1);
            mma_s8_16832(acc[2 * np + 1], qa[kk], b2, b3);
          }
        }
        bool pass = false;
#pragma unroll
        for (int n = 0; n < 4; ++n) {
          const int kl = half * 32 + n * 8 + 2 * t;
          const float2 skv = *reinterpret_cast<const float2*>(sks + kl);
          const float2 qmv = *reinterpret_cast<const float2*>(qms + kl);
          // zhat = scale * ((sq * sk) * acc + qm), no contraction (the reference's fp32 order)
          const float s0 = __fmul_rn(sq_a, skv.x), s1 = __fmul_rn(sq_a, skv.y);
          const float s2 = __fmul_rn(sq_b, skv.x), s3 = __fmul_rn(sq_b, skv.y);
          const float z0 = __fmul_rn(p.scale, __fadd_rn(__fmul_rn(s0, (float)acc[n][0]), qmv.x));
          const float z1 = __fmul_rn(p.scale, __fadd_rn(__fmul_rn(s1, (float)acc[n][1]), qmv.y));
          const float z2 = __fmul_rn(p.scale, __fadd_rn(__fmul_rn(s2, (float)acc[n][2]), qmv.x));
          const float z3 = __fmul_rn(p.scale, __fadd_rn(__fmul_rn(s3, (float)acc[n][3]), qmv.y));
          pass |= (z0 > thr_a) | (z1 > thr_a) | (z2 > thr_b) | (z3 > thr_b);
        }
        if (__any_sync(0xffffffffu, pass) && lane == 0) atomicOr(&bitmap[kb >> 5], 1u << (kb & 31));
      }
    }
    cp_async_wait<0>();
  }
  __syncthreads();

  // write the bitmap and count the computed pairs
  uint32_t* bg = p.bits + ((size_t)(b * p.Hq + hq) * p.nQ + qb) * p.nW;
  int cnt = 0;
  for (int w = tid; w < p.nW; w += kThreads) {
    const uint32_t m = bitmap[w];
    bg[w] = m;
    cnt += __popc(m);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) cnt += __shfl_xor_sync(0xffffffffu, cnt, o);
  if (lane == 0 && cnt > 0) atomicAdd(p.pairs + b * p.Hq + hq, cnt);
}

template <typename T, int D>
static cudaError_t select_dispatch(const SelectParams& p, cudaStream_t s) {
  constexpr int RB = D * 2;
  constexpr int REGION_A = kBlockQ * RB + kBlockK * RB;
  constexpr int REGION_B = kStagesB * (kTileKeys * (D + 16) + 2 * kTileKeys * 4);
  constexpr int REGION = REGION_A > REGION_B ? REGION_A : REGION_B;
  const int smem = REGION + ((p.nW + 3) / 4) * 16;
  cudaError_t e = cudaFuncSetAttribute(sale_select_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  dim3 grid(p.nQ, p.Hq, p.B);
  sale_select_kernel<T, D><<<grid, kThreads, smem, s>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_select(const SelectParams& p, int D, bool bf16, cudaStream_t stream) {
  if (D == 64) return bf16 ? select_dispatch<__nv_bfloat16, 64>(p, stream) : select_dispatch<__half, 64>(p, stream);
  if (D == 128)
    return bf16 ? select_dispatch<__nv_bfloat16, 128>(p, stream) : select_dispatch<__half, 128>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace sale
