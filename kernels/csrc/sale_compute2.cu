// SALE stage 3, v2: block-sparse causal attention, 128 query rows per CTA.
//   CTA = two adjacent 64-row query blocks (2 pq, 2 pq + 1) of one (b, hq), 8 warps x 16 rows (warps 0-3: the
//   first block, 4-7: the second). The CTA walks the union of the two blocks' bitmaps, two selected 32-key
//   blocks (not necessarily adjacent) per 64-key K/V tile, so each K/V tile read from L2 serves both query
//   blocks where their sets coincide (sink, most of local, persistent heavy keys). A warp computes only the
//   32-key halves that its own query block selected (warp-uniform branches), so the per-(query block 64)
//   semantics are exactly v1's. cp.async 3-stage pipeline, XOR-swizzled smem, ldmatrix, mma.sync m16n8k16,
//   online softmax in the log2 domain with scale * log2(e) folded into one FFMA, causal mask only on tiles that
//   reach past the warp's first row.
#include "sale_common.cuh"
#include "sale_launch.cuh"

namespace sale {

namespace {

constexpr int kStages2 = 3;
constexpr int kWarps2 = 8;
constexpr int kThreads2 = kWarps2 * 32;
constexpr int kRows2 = 2 * kBlockQ;   // 128
constexpr int kTile2 = 2 * kBlockK;   // 64 keys per tile

// iterator over the set bits of (a | b), two bitmaps in global memory (uniform across the CTA)
struct UnionIter {
  const uint32_t* wa;
  const uint32_t* wb;  // nullptr: second block absent
  int nW, w;
  uint32_t cur;
  __device__ __forceinline__ uint32_t word(int i) const {
    return __ldg(wa + i) | (wb != nullptr ? __ldg(wb + i) : 0u);
  }
  __device__ __forceinline__ void init(const uint32_t* a, const uint32_t* b, int n) {
    wa = a;
    wb = b;
    nW = n;
    w = 0;
    cur = n > 0 ? word(0) : 0u;
  }
  __device__ __forceinline__ int next() {
    while (cur == 0u) {
      if (++w >= nW) return -1;
      cur = word(w);
    }
    const int bit = __ffs(cur) - 1;
    cur &= cur - 1u;
    return w * 32 + bit;
  }
};

template <int D>
__device__ __forceinline__ void load_rows(uint32_t sbase, const void* gv, int row0, int rows, int nvalid, int tid) {
  constexpr int CPR = D / 8;
  const uint16_t* g = reinterpret_cast<const uint16_t*>(gv);
  for (int i = tid; i < rows * CPR; i += kThreads2) {
    const int r = i / CPR, c = i % CPR;
    const bool ok = r < nvalid;
    const uint16_t* src = ok ? g + (size_t)r * D + c * 8 : g;
    cp_async16(sbase + swz<D * 2>(row0 + r, c), src, ok);
  }
}

}  // namespace

template <typename T, int D>
__global__ void __launch_bounds__(kThreads2, 1) sale_compute2_kernel(ComputeParams p) {
  constexpr bool BF = TypeTraits<T>::kBF16;
  constexpr int RB = D * 2;
  constexpr int Q_BYTES = kRows2 * RB;
  constexpr int KV_BYTES = kTile2 * RB;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sQ = smem_u32(smem);
  const uint32_t sK = sQ + Q_BYTES;
  const uint32_t sV = sK + kStages2 * KV_BYTES;

  const int nP = (p.nQ + 1) / 2;
  const int pq = nP - 1 - blockIdx.x;  // heavy (late) query blocks first
  const int hq = blockIdx.y, b = blockIdx.z;
  const int hkv = hq / (p.Hq / p.Hkv);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int r0 = pq * kRows2;
  const int qbA = 2 * pq;
  const bool hasB = qbA + 1 < p.nQ;
  const int my_qb = qbA + warp / 4;
  const bool warp_live = my_qb < p.nQ;

  const T* qg = reinterpret_cast<const T*>(p.q) + ((size_t)(b * p.Hq + hq) * p.L + r0) * D;
  const T* kg = reinterpret_cast<const T*>(p.k) + (size_t)(b * p.Hkv + hkv) * p.L * D;
  const T* vg = reinterpret_cast<const T*>(p.v) + (size_t)(b * p.Hkv + hkv) * p.L * D;
  const uint32_t* bitsA = p.bits + ((size_t)(b * p.Hq + hq) * p.nQ + qbA) * p.nW;
  const uint32_t* bitsB = hasB ? bitsA + p.nW : nullptr;
  const uint32_t* bits_mine = warp_live ? bitsA + (warp / 4) * p.nW : bitsA;

  load_rows<D>(sQ, qg, 0, kRows2, p.L - r0, tid);
  cp_async_commit();

  UnionIter ld_it, cmp_it;
  ld_it.init(bitsA, bitsB, p.nW);
  cmp_it.init(bitsA, bitsB, p.nW);

  auto load_kv = [&](int slot, int kb0, int kb1) {
    if (kb0 >= 0) {
      load_rows<D>(sK + slot * KV_BYTES, kg + (size_t)kb0 * kBlockK * D, 0, kBlockK, p.L - kb0 * kBlockK, tid);
      load_rows<D>(sV + slot * KV_BYTES, vg + (size_t)kb0 * kBlockK * D, 0, kBlockK, p.L - kb0 * kBlockK, tid);
    }
    if (kb1 >= 0) {
      load_rows<D>(sK + slot * KV_BYTES, kg + (size_t)kb1 * kBlockK * D, kBlockK, kBlockK, p.L - kb1 * kBlockK, tid);
      load_rows<D>(sV + slot * KV_BYTES, vg + (size_t)kb1 * kBlockK * D, kBlockK, kBlockK, p.L - kb1 * kBlockK, tid);
    }
  };

#pragma unroll
  for (int s = 0; s < kStages2 - 1; ++s) {
    const int kb0 = ld_it.next();
    const int kb1 = kb0 >= 0 ? ld_it.next() : -1;
    load_kv(s, kb0, kb1);
    cp_async_commit();
  }
  cp_async_wait<kStages2 - 1>();
  __syncthreads();

  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int row = warp * 16 + (lane % 16);
    const int ch = kk * 2 + lane / 16;
    ldmatrix_x4(sQ + swz<RB>(row, ch), qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3]);
  }

  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;  // m in raw (unscaled) logit units
  const int wrow0 = r0 + warp * 16;
  const int row_a = wrow0 + g, row_b = row_a + 8;
  const float sl2 = p.scale_log2;

  for (int it = 0;; ++it) {
    const int kb0 = cmp_it.next();
    if (kb0 < 0) break;  // uniform
    const int kb1 = cmp_it.next();
    cp_async_wait<kStages2 - 2>();
    __syncthreads();
    {
      const int l0 = ld_it.next();
      const int l1 = l0 >= 0 ? ld_it.next() : -1;
      load_kv((it + kStages2 - 1) % kStages2, l0, l1);
      cp_async_commit();
    }
    bool has[2];
    has[0] = warp_live && ((__ldg(bits_mine + (kb0 >> 5)) >> (kb0 & 31)) & 1u);
    has[1] = warp_live && kb1 >= 0 && ((__ldg(bits_mine + (kb1 >> 5)) >> (kb1 & 31)) & 1u);
    if (!has[0] && !has[1]) continue;  // warp-uniform
    const int kbh[2] = {kb0, kb1};
    const int slot = it % kStages2;
    const uint32_t cK = sK + slot * KV_BYTES, cV = sV + slot * KV_BYTES;

    float s[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        if (!has[np / 2]) continue;
        const int mi = lane / 8, r = lane % 8;
        const int key = np * 16 + (mi / 2) * 8 + r;
        const int ch = kk * 2 + (mi % 2);
        uint32_t b0, b1, b2, b3;
        ldmatrix_x4(cK + swz<RB>(key, ch), b0, b1, b2, b3);
        mma_16816<BF>(s[2 * np], qf[kk], b0, b1);
        mma_16816<BF>(s[2 * np + 1], qf[kk], b2, b3);
      }
    }

    float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int kb = kbh[hf];
      if (!has[hf]) {
#pragma unroll
        for (int n = 4 * hf; n < 4 * hf + 4; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = -INFINITY;
        continue;
      }
      if (kb * kBlockK + kBlockK - 1 > wrow0) {  // reaches past the warp's first row: causal mask
#pragma unroll
        for (int n = 4 * hf; n < 4 * hf + 4; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = kb * kBlockK + (n - 4 * hf) * 8 + 2 * t + (e & 1);
            const int row = (e < 2) ? row_a : row_b;
            if (key > row) s[n][e] = -INFINITY;
          }
        }
      }
#pragma unroll
      for (int n = 4 * hf; n < 4 * hf + 4; ++n) {
        mx_a = fmaxf(mx_a, fmaxf(s[n][0], s[n][1]));
        mx_b = fmaxf(mx_b, fmaxf(s[n][2], s[n][3]));
      }
    }
    mx_a = quad_max(mx_a);
    mx_b = quad_max(mx_b);
    const float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
    const float mu_a = (mn_a == -INFINITY) ? 0.f : mn_a * sl2;
    const float mu_b = (mn_b == -INFINITY) ? 0.f : mn_b * sl2;
    const float corr_a = fast_exp2(m_a * sl2 - mu_a), corr_b = fast_exp2(m_b * sl2 - mu_b);
    m_a = mn_a;
    m_b = mn_b;
    float ps_a = 0.f, ps_b = 0.f;
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      s[n][0] = fast_exp2(fmaf(s[n][0], sl2, -mu_a));
      s[n][1] = fast_exp2(fmaf(s[n][1], sl2, -mu_a));
      s[n][2] = fast_exp2(fmaf(s[n][2], sl2, -mu_b));
      s[n][3] = fast_exp2(fmaf(s[n][3], sl2, -mu_b));
      ps_a += s[n][0] + s[n][1];
      ps_b += s[n][2] + s[n][3];
    }
    l_a = l_a * corr_a + ps_a;
    l_b = l_b * corr_b + ps_b;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n][0] *= corr_a;
      o[n][1] *= corr_a;
      o[n][2] *= corr_b;
      o[n][3] *= corr_b;
    }

    // O += P V
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
      if (!has[ks / 2]) continue;
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
    if (row_a < p.L) lg[row_a] = l_a > 0.f ? (m_a * sl2) * LN2 + logf(l_a) : -INFINITY;
    if (row_b < p.L) lg[row_b] = l_b > 0.f ? (m_b * sl2) * LN2 + logf(l_b) : -INFINITY;
  }
}

template <typename T, int D>
static cudaError_t compute2_dispatch(const ComputeParams& p, cudaStream_t s) {
  constexpr int smem = kRows2 * D * 2 + 2 * kStages2 * kTile2 * D * 2;
  cudaError_t e =
      cudaFuncSetAttribute(sale_compute2_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  dim3 grid((p.nQ + 1) / 2, p.Hq, p.B);
  sale_compute2_kernel<T, D><<<grid, kThreads2, smem, s>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_compute_v2(const ComputeParams& p, int D, bool bf16, cudaStream_t stream) {
  if (D == 64)
    return bf16 ? compute2_dispatch<__nv_bfloat16, 64>(p, stream) : compute2_dispatch<__half, 64>(p, stream);
  if (D == 128)
    return bf16 ? compute2_dispatch<__nv_bfloat16, 128>(p, stream) : compute2_dispatch<__half, 128>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace sale
