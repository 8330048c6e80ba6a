// SALE stage 3: block-sparse causal attention (FlashAttention-2 style) over the key blocks marked in the
// per-(b, hq, query block) bitmap written by the selection pass.
//   CTA = one 64-row query block, 4 warps x 16 rows; 32-key K/V tiles, cp.async 3-stage pipeline,
//   XOR-swizzled shared memory, ldmatrix, mma.sync m16n8k16 (fp16/bf16 -> fp32), online softmax in the
//   log2 domain with the scale folded in. Writes o (input dtype) and lse (fp32, natural log) for every row.
//   The softmax is invariant to the smoothing shift of K (K minus its per-channel mean), so the original K is
//   used here: the same output as smoothed K, one rounding fewer, and lse is that of the original logits.
#include "sale_common.cuh"
#include "sale_launch.cuh"

namespace sale {

namespace {

constexpr int kStages = 3;
constexpr int kThreads = 128;

// iterator over the set bits of a bitmap in global memory (uniform across the CTA)
struct BitIter {
  const uint32_t* words;
  int nW, w;
  uint32_t cur;
  __device__ __forceinline__ void init(const uint32_t* p, int n) {
    words = p;
    nW = n;
    w = 0;
    cur = n > 0 ? __ldg(p) : 0u;
  }
  __device__ __forceinline__ int next() {
    while (cur == 0u) {
      if (++w >= nW) return -1;
      cur = __ldg(words + w);
    }
    const int b = __ffs(cur) - 1;
    cur &= cur - 1u;
    return w * 32 + b;
  }
};

template <typename T, int D>
__device__ __forceinline__ void load_tile(uint32_t sbase, const T* g, int rows, int nvalid, int tid) {
  constexpr int CPR = D / 8;
  for (int i = tid; i < rows * CPR; i += kThreads) {
    const int r = i / CPR, c = i % CPR;
    const bool ok = r < nvalid;
    const T* src = ok ? g + (size_t)r * D + c * 8 : g;
    cp_async16(sbase + swz<D * 2>(r, c), src, ok);
  }
}

}  // namespace

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) sale_compute_kernel(ComputeParams p) {
  constexpr bool BF = TypeTraits<T>::kBF16;
  constexpr int RB = D * 2;                 // bytes per row of a tile
  constexpr int KT = kBlockK;               // keys per tile
  constexpr int Q_BYTES = kBlockQ * RB;
  constexpr int KV_BYTES = KT * RB;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sQ = smem_u32(smem);
  const uint32_t sK = sQ + Q_BYTES;
  const uint32_t sV = sK + kStages * KV_BYTES;

  const int qb = p.nQ - 1 - blockIdx.x;  // heavy (late) query blocks first
  const int hq = blockIdx.y, b = blockIdx.z;
  const int hkv = hq / (p.Hq / p.Hkv);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int r0 = qb * kBlockQ;

  const T* qg = reinterpret_cast<const T*>(p.q) + ((size_t)(b * p.Hq + hq) * p.L + r0) * D;
  const T* kg = reinterpret_cast<const T*>(p.k) + (size_t)(b * p.Hkv + hkv) * p.L * D;
  const T* vg = reinterpret_cast<const T*>(p.v) + (size_t)(b * p.Hkv + hkv) * p.L * D;
  const uint32_t* bits = p.bits + ((size_t)(b * p.Hq + hq) * p.nQ + qb) * p.nW;

  // Q tile
  load_tile<T, D>(sQ, qg, kBlockQ, p.L - r0, tid);
  cp_async_commit();

  BitIter ld_it, cmp_it;
  ld_it.init(bits, p.nW);
  cmp_it.init(bits, p.nW);

  // prologue: kStages-1 K/V tiles
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    const int kb = ld_it.next();
    if (kb >= 0) {
      load_tile<T, D>(sK + s * KV_BYTES, kg + (size_t)kb * KT * D, KT, p.L - kb * KT, tid);
      load_tile<T, D>(sV + s * KV_BYTES, vg + (size_t)kb * KT * D, KT, p.L - kb * KT, tid);
    }
    cp_async_commit();
  }

  cp_async_wait<kStages - 1>();
  __syncthreads();

  // Q fragments (16 rows x D per warp) in registers
  uint32_t qf[D / 16][4];
  load_q_fragments<D>(sQ, warp, lane, qf);

  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;
  const int row_a = r0 + warp * 16 + g, row_b = row_a + 8;

  for (int it = 0;; ++it) {
    const int kb = cmp_it.next();
    if (kb < 0) break;
    cp_async_wait<kStages - 2>();
    __syncthreads();
    {
      const int kbl = ld_it.next();
      const int slot = (it + kStages - 1) % kStages;
      if (kbl >= 0) {
        load_tile<T, D>(sK + slot * KV_BYTES, kg + (size_t)kbl * KT * D, KT, p.L - kbl * KT, tid);
        load_tile<T, D>(sV + slot * KV_BYTES, vg + (size_t)kbl * KT * D, KT, p.L - kbl * KT, tid);
      }
      cp_async_commit();
    }
    const int slot = it % kStages;
    const uint32_t cK = sK + slot * KV_BYTES, cV = sV + slot * KV_BYTES;

    // S = Q K^T  (16 x 32 per warp)
    float s[4][4];
    warp_qk_16x32<BF, D>(qf, cK, lane, s);

    // scale (log2 domain) + causal mask on blocks that reach past the block's first row
    const bool need_mask = kb * KT + KT - 1 > r0;
    float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
    for (int n = 0; n < 4; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[n][e] * p.scale_log2;
        if (need_mask) {
          const int key = kb * KT + n * 8 + 2 * t + (e & 1);
          const int row = (e < 2) ? row_a : row_b;
          if (key > row) x = -INFINITY;
        }
        s[n][e] = x;
      }
      mx_a = fmaxf(mx_a, fmaxf(s[n][0], s[n][1]));
      mx_b = fmaxf(mx_b, fmaxf(s[n][2], s[n][3]));
    }
    mx_a = quad_max(mx_a);
    mx_b = quad_max(mx_b);
    const float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
    const float mu_a = (mn_a == -INFINITY) ? 0.f : mn_a;
    const float mu_b = (mn_b == -INFINITY) ? 0.f : mn_b;
    const float corr_a = fast_exp2(m_a - mu_a), corr_b = fast_exp2(m_b - mu_b);
    // rescale O only when some row max of the warp moved (after the first tiles it rarely does)
    const bool rescale = __any_sync(0xffffffffu, (mn_a != m_a) | (mn_b != m_b));
    m_a = mn_a;
    m_b = mn_b;
    float ps_a = 0.f, ps_b = 0.f;
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      s[n][0] = fast_exp2(s[n][0] - mu_a);
      s[n][1] = fast_exp2(s[n][1] - mu_a);
      s[n][2] = fast_exp2(s[n][2] - mu_b);
      s[n][3] = fast_exp2(s[n][3] - mu_b);
      ps_a += s[n][0] + s[n][1];
      ps_b += s[n][2] + s[n][3];
    }
    l_a = l_a * corr_a + ps_a;
    l_b = l_b * corr_b + ps_b;
    if (rescale) {
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        o[n][0] *= corr_a;
        o[n][1] *= corr_a;
        o[n][2] *= corr_b;
        o[n][3] *= corr_b;
      }
    }

    // O += P V
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      uint32_t a[4];
      a[0] = TypeTraits<T>::pack2(s[2 * ks][0], s[2 * ks][1]);
      a[1] = TypeTraits<T>::pack2(s[2 * ks][2], s[2 * ks][3]);
      a[2] = TypeTraits<T>::pack2(s[2 * ks + 1][0], s[2 * ks + 1][1]);
      a[3] = TypeTraits<T>::pack2(s[2 * ks + 1][2], s[2 * ks + 1][3]);
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        const int mi = lane / 8, r = lane % 8;
        const int key = ks * 16 + (mi % 2) * 8 + r;
        const int ch = dn * 2 + mi / 2;
        uint32_t b0, b1, b2, b3;
        ldmatrix_x4_trans(cV + swz<RB>(key, ch), b0, b1, b2, b3);
        mma_16816<BF>(o[2 * dn], a, b0, b1);
        mma_16816<BF>(o[2 * dn + 1], a, b2, b3);
      }
    }
  }
  cp_async_wait<0>();

  // epilogue
  l_a = quad_sum(l_a);
  l_b = quad_sum(l_b);
  const float inv_a = l_a > 0.f ? 1.f / l_a : 0.f;
  const float inv_b = l_b > 0.f ? 1.f / l_b : 0.f;
  T* og = reinterpret_cast<T*>(p.o) + (size_t)(b * p.Hq + hq) * p.L * D;
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    const int ch = n * 8 + 2 * t;
    if (row_a < p.L)
      *reinterpret_cast<uint32_t*>(og + (size_t)row_a * D + ch) = TypeTraits<T>::pack2(o[n][0] * inv_a, o[n][1] * inv_a);
    if (row_b < p.L)
      *reinterpret_cast<uint32_t*>(og + (size_t)row_b * D + ch) = TypeTraits<T>::pack2(o[n][2] * inv_b, o[n][3] * inv_b);
  }
  if (p.lse != nullptr && t == 0) {
    constexpr float LN2 = 0.69314718055994530942f;
    float* lg = p.lse + (size_t)(b * p.Hq + hq) * p.L;
    if (row_a < p.L) lg[row_a] = l_a > 0.f ? m_a * LN2 + logf(l_a) : -INFINITY;
    if (row_b < p.L) lg[row_b] = l_b > 0.f ? m_b * LN2 + logf(l_b) : -INFINITY;
  }
}

template <typename T, int D>
static cudaError_t compute_dispatch(const ComputeParams& p, cudaStream_t s) {
  constexpr int smem = kBlockQ * D * 2 + 2 * kStages * kBlockK * D * 2;
  cudaError_t e = cudaFuncSetAttribute(sale_compute_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  dim3 grid(p.nQ, p.Hq, p.B);
  sale_compute_kernel<T, D><<<grid, kThreads, smem, s>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_compute(const ComputeParams& p, int D, bool bf16, cudaStream_t stream) {
  if (D == 64) return bf16 ? compute_dispatch<__nv_bfloat16, 64>(p, stream) : compute_dispatch<__half, 64>(p, stream);
  if (D == 128)
    return bf16 ? compute_dispatch<__nv_bfloat16, 128>(p, stream) : compute_dispatch<__half, 128>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace sale
