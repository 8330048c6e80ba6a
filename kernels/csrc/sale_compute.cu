// SALE stage 3: block-sparse causal attention (FlashAttention style) over the key blocks marked in the
// per-(b, hq, query block) bitmap written by the selection pass. One CTA per 64-row query block (4 warps x 16
// rows), cp.async 3-stage K/V pipeline, online softmax in the log2 domain with the scale folded in; writes o
// (input dtype) and lse (fp32, natural log) for every row. fp16/bf16 inputs, fp32 accumulation.
//   sale_compute_kernel (sm_80 / sm_89, and sm_90 without the a-features): one 32-key block per tile,
//     XOR-swizzled tiles, ldmatrix + mma.sync m16n8k16; the O accumulator is rescaled only when some row max
//     of the warp moved.
//   sale_compute_wg_kernel (sm_90a): the 4 warps are one warpgroup; two selected blocks per 64-key tile, S = Q K^T
//     by wgmma m64n64k16 (Q from registers, K tile K-major) and O += P V by wgmma m64nDk16 (P from registers,
//     V tile MN-major), tiles in the 128-byte swizzle layout; Q K^T of tile t and P V of tile t-1 are issued
//     back to back and the softmax of tile t overlaps P V (FlashAttention-3's intra-warpgroup order). 2 CTAs
//     per SM.
//   Lq < Lk (bottom-right causal, call row i at absolute position i + off, off = Lk - Lq): the masks compare the
//   key index minus off (one integer subtraction per tile, off read from the parameter bank: no register held
//   across the loop) with the row in the call; the bitmap already bounds the loop to the visible blocks.
//   The softmax is invariant to the smoothing shift of K (K minus its per-channel mean), so the original K is
//   used here: the same output as smoothed K, one rounding fewer, and lse is that of the original logits.
#include "sale_common.cuh"
#include "sale_launch.cuh"
#include "sale_static_switch.cuh"

namespace sale {

namespace {

constexpr int kStages = 3;
constexpr int kThreads = 128;

// iterator over the set bits of a bitmap in global memory (uniform across the CTA). AHEAD: the word after the
// current one is loaded ahead, so its latency hides behind the current word's blocks (two more registers: the
// mma.sync kernel, with two iterators, would spill)
template <bool AHEAD>
struct BitIter {
  const uint32_t* words;
  int nW, w;
  uint32_t cur, nxt;
  __device__ __forceinline__ void init(const uint32_t* p, int n) {
    words = p;
    nW = n;
    w = 0;
    cur = n > 0 ? __ldg(p) : 0u;
    nxt = AHEAD && n > 1 ? __ldg(p + 1) : 0u;
  }
  __device__ __forceinline__ int next() {
    while (cur == 0u) {
      if (++w >= nW) return -1;
      cur = AHEAD ? nxt : __ldg(words + w);
      if (AHEAD) nxt = w + 1 < nW ? __ldg(words + w + 1) : 0u;
    }
    const int b = __ffs(cur) - 1;
    cur &= cur - 1u;
    return w * 32 + b;
  }
};

// rows x D tile of 16-bit values (rows past nvalid zero-filled) in the XOR-swizzled row-major layout of ldmatrix
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

// Online softmax of one warp's rows row_a = g and row_b = g + 8 over NC 8-key chunks of raw logits s (masked
// entries -inf): the running max m (log2 domain, scale folded in) and sum l are updated and s becomes
// P = exp2(scale * s - m). Returns whether O must be rescaled by corr (some row max of the warp moved; after
// the first tiles that is rare).
template <int NC>
__device__ __forceinline__ bool softmax_p(float (&s)[NC][4], float scale, float& m_a, float& m_b, float& l_a,
                                          float& l_b, float& corr_a, float& corr_b) {
  float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
  for (int n = 0; n < NC; ++n) {
    mx_a = fmaxf(mx_a, fmaxf(s[n][0], s[n][1]));
    mx_b = fmaxf(mx_b, fmaxf(s[n][2], s[n][3]));
  }
  const float mn_a = fmaxf(m_a, quad_max(mx_a) * scale), mn_b = fmaxf(m_b, quad_max(mx_b) * scale);
  const float mu_a = (mn_a == -INFINITY) ? 0.f : mn_a;
  const float mu_b = (mn_b == -INFINITY) ? 0.f : mn_b;
  corr_a = fast_exp2(m_a - mu_a);
  corr_b = fast_exp2(m_b - mu_b);
  const bool rescale = __any_sync(0xffffffffu, (mn_a != m_a) | (mn_b != m_b));
  m_a = mn_a;
  m_b = mn_b;
  float ps_a = 0.f, ps_b = 0.f;
#pragma unroll
  for (int n = 0; n < NC; ++n) {
    s[n][0] = fast_exp2(fmaf(s[n][0], scale, -mu_a));
    s[n][1] = fast_exp2(fmaf(s[n][1], scale, -mu_a));
    s[n][2] = fast_exp2(fmaf(s[n][2], scale, -mu_b));
    s[n][3] = fast_exp2(fmaf(s[n][3], scale, -mu_b));
    ps_a += s[n][0] + s[n][1];
    ps_b += s[n][2] + s[n][3];
  }
  l_a = l_a * corr_a + ps_a;
  l_b = l_b * corr_b + ps_b;
  return rescale;
}

template <int ND>
__device__ __forceinline__ void rescale_o(float (&o)[ND][4], float corr_a, float corr_b) {
#pragma unroll
  for (int n = 0; n < ND; ++n) {
    o[n][0] *= corr_a;
    o[n][1] *= corr_a;
    o[n][2] *= corr_b;
    o[n][3] *= corr_b;
  }
}

// Causal mask of one 8-key chunk (keys key0 + 2t + {0, 1}) for rows row_a (e 0, 1) and row_b = row_a + 8 (e 2, 3);
// key0 relative to the call's rows (absolute key - off), so that key j is visible to row i iff j <= i
__device__ __forceinline__ void mask_chunk(float (&x)[4], int key0, int t, int row_a) {
#pragma unroll
  for (int e = 0; e < 4; ++e)
    if (key0 + 2 * t + (e & 1) > row_a + (e < 2 ? 0 : 8)) x[e] = -INFINITY;
}

// P (16 keys per step, fp32 accumulator layout) -> the A fragments of mma.m16n8k16 / wgmma
template <typename T, int NC>
__device__ __forceinline__ void pack_p(const float (&s)[NC][4], uint32_t (&pa)[NC / 2][4]) {
#pragma unroll
  for (int ks = 0; ks < NC / 2; ++ks) {
    pa[ks][0] = TypeTraits<T>::pack2(s[2 * ks][0], s[2 * ks][1]);
    pa[ks][1] = TypeTraits<T>::pack2(s[2 * ks][2], s[2 * ks][3]);
    pa[ks][2] = TypeTraits<T>::pack2(s[2 * ks + 1][0], s[2 * ks + 1][1]);
    pa[ks][3] = TypeTraits<T>::pack2(s[2 * ks + 1][2], s[2 * ks + 1][3]);
  }
}

// o / l for rows row_a, row_b (in the call; dropped past Lq) and lse (natural log) if requested
template <typename T, int D>
__device__ __forceinline__ void store_rows(const ComputeParams& p, int b, int hq, int row_a, int t,
                                           const float (&o)[D / 8][4], float m_a, float m_b, float l_a, float l_b) {
  const int row_b = row_a + 8;
  l_a = quad_sum(l_a);
  l_b = quad_sum(l_b);
  const float inv_a = l_a > 0.f ? 1.f / l_a : 0.f;
  const float inv_b = l_b > 0.f ? 1.f / l_b : 0.f;
  T* og = reinterpret_cast<T*>(p.o) + (size_t)(b * p.Hq + hq) * p.Lq * D;
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    const int ch = n * 8 + 2 * t;
    if (row_a < p.Lq)
      *reinterpret_cast<uint32_t*>(og + (size_t)row_a * D + ch) = TypeTraits<T>::pack2(o[n][0] * inv_a, o[n][1] * inv_a);
    if (row_b < p.Lq)
      *reinterpret_cast<uint32_t*>(og + (size_t)row_b * D + ch) = TypeTraits<T>::pack2(o[n][2] * inv_b, o[n][3] * inv_b);
  }
  if (p.lse != nullptr && t == 0) {
    constexpr float LN2 = 0.69314718055994530942f;
    float* lg = p.lse + (size_t)(b * p.Hq + hq) * p.Lq;
    if (row_a < p.Lq) lg[row_a] = l_a > 0.f ? m_a * LN2 + logf(l_a) : -INFINITY;
    if (row_b < p.Lq) lg[row_b] = l_b > 0.f ? m_b * LN2 + logf(l_b) : -INFINITY;
  }
}

}  // namespace

// The CTA's query block (heavy, late blocks first), query head, batch entry, first row (in the call), and its
// Q / K / V rows and bitmap row, as both computation kernels index them.
template <typename T>
struct ComputeCta {
  int qb, hq, b, r0;
  const T *qg, *kg, *vg;
  const uint32_t* bits;
};
template <typename T, int D>
__device__ __forceinline__ ComputeCta<T> compute_cta(const ComputeParams& p) {
  const int qb = p.nQ - 1 - blockIdx.x, hq = blockIdx.y, b = blockIdx.z;
  const int hkv = hq / (p.Hq / p.Hkv), r0 = qb * kBlockQ;
  return {qb, hq, b, r0, reinterpret_cast<const T*>(p.q) + ((size_t)(b * p.Hq + hq) * p.Lq + r0) * D,
          reinterpret_cast<const T*>(p.k) + (size_t)(b * p.Hkv + hkv) * p.Lk * D,
          reinterpret_cast<const T*>(p.v) + (size_t)(b * p.Hkv + hkv) * p.Lk * D,
          p.bits + ((size_t)(b * p.Hq + hq) * p.nQ + qb) * p.nW};
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) sale_compute_kernel(ComputeParams p) {
  constexpr bool BF = TypeTraits<T>::kBF16;
  constexpr int RB = D * 2;                 // bytes per row of a tile
  constexpr int KT = kBlockK;               // keys per tile
  constexpr int Q_BYTES = kBlockQ * RB;
  constexpr int KV_BYTES = KT * RB;
  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t sQ = smem_u32(smem);
  const uint32_t sK = sQ + Q_BYTES;
  const uint32_t sV = sK + kStages * KV_BYTES;

  const auto [qb, hq, b, r0, qg, kg, vg, bits] = compute_cta<T, D>(p);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;

  // Q tile
  load_tile<T, D>(sQ, qg, kBlockQ, p.Lq - r0, tid);
  cp_async_commit();

  BitIter<false> ld_it, cmp_it;
  ld_it.init(bits, p.nW);
  cmp_it.init(bits, p.nW);

  // prologue: kStages-1 K/V tiles
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    const int kb = ld_it.next();
    if (kb >= 0) {
      load_tile<T, D>(sK + s * KV_BYTES, kg + (size_t)kb * KT * D, KT, p.Lk - kb * KT, tid);
      load_tile<T, D>(sV + s * KV_BYTES, vg + (size_t)kb * KT * D, KT, p.Lk - kb * KT, tid);
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
  const int row_a = r0 + warp * 16 + g;

  for (int it = 0;; ++it) {
    const int kb = cmp_it.next();
    if (kb < 0) break;
    cp_async_wait<kStages - 2>();
    __syncthreads();
    {
      const int kbl = ld_it.next();
      const int slot = (it + kStages - 1) % kStages;
      if (kbl >= 0) {
        load_tile<T, D>(sK + slot * KV_BYTES, kg + (size_t)kbl * KT * D, KT, p.Lk - kbl * KT, tid);
        load_tile<T, D>(sV + slot * KV_BYTES, vg + (size_t)kbl * KT * D, KT, p.Lk - kbl * KT, tid);
      }
      cp_async_commit();
    }
    const int slot = it % kStages;
    const uint32_t cK = sK + slot * KV_BYTES, cV = sV + slot * KV_BYTES;

    // S = Q K^T  (16 x 32 per warp)
    float s[4][4];
    warp_qk_16x32<BF, D>(qf, cK, lane, s);

    // causal mask on blocks that reach past the block's first row, online softmax (keys shifted by the offset:
    // p.off is read from the parameter bank, no register held across the loop)
    const int kr = kb * KT - p.off;
    if (kr + KT - 1 > r0) {
#pragma unroll
      for (int n = 0; n < 4; ++n) mask_chunk(s[n], kr + n * 8, t, row_a);
    }
    float corr_a, corr_b;
    if (softmax_p<4>(s, p.scale_log2, m_a, m_b, l_a, l_b, corr_a, corr_b)) rescale_o<D / 8>(o, corr_a, corr_b);

    // O += P V
    uint32_t pa[2][4];
    pack_p<T, 4>(s, pa);
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        const int mi = lane / 8, r = lane % 8;
        const int key = ks * 16 + (mi % 2) * 8 + r;
        const int ch = dn * 2 + mi / 2;
        uint32_t b0, b1, b2, b3;
        ldmatrix_x4_trans(cV + swz<RB>(key, ch), b0, b1, b2, b3);
        mma_16816<BF>(o[2 * dn], pa[ks], b0, b1);
        mma_16816<BF>(o[2 * dn + 1], pa[ks], b2, b3);
      }
    }
  }
  cp_async_wait<0>();

  store_rows<T, D>(p, b, hq, row_a, t, o, m_a, m_b, l_a, l_b);
}

// sm_90a: 64-key tiles of two selected blocks (the second zero-filled and masked when the count is odd), wgmma,
// a 3-slot ring (tile t+1 loading, K of tile t and V of tile t-1 in use). Only while Q K^T is retired and P V
// still runs does the softmax touch S; O is rescaled after both are done (never touch a wgmma's registers in
// flight: docs/DESIGN.md).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 2) sale_compute_wg_kernel(ComputeParams p) {
  constexpr bool BF = TypeTraits<T>::kBF16;
  constexpr int KT = 2 * kBlockK;           // keys per tile
  constexpr int KV_BYTES = KT * D * 2;
  constexpr int PANEL = KT * 128;           // bytes of one 64-channel panel of a K or V tile
  constexpr int HALF = kBlockK * 128;       // the second block's rows start here in each panel
  constexpr int CPR = D / 8;                // 16-byte chunks per row
  constexpr int RP = kThreads / CPR;        // rows per pass of the CTA's threads (a multiple of 8)
  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t sK = smem_u32(smem);  // the swizzle atoms must be 1024-byte aligned (checked below)
  const uint32_t sV = sK + kStages * KV_BYTES;
  const uint32_t sQ = sV + kStages * KV_BYTES;

  const auto [qb, hq, b, r0, qg, kg, vg, bits] = compute_cta<T, D>(p);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  if (sK % 1024 != 0) __trap();

  // this thread's 16-byte chunks of a block: rows lr + k * RP, chunk lc (128-byte swizzle: row % 8 = lr % 8)
  const int lr = tid / CPR, lc = tid % CPR;
  const uint32_t l_soff = (lc / 8) * PANEL + lr * 128 + (((lc % 8) ^ (lr % 8)) << 4);
  const T* kt = kg + lr * D + lc * 8;
  const T* vt = vg + lr * D + lc * 8;
  // blocks kb0, kb1 (-1: none) into slot. Rows past L (and absent blocks) are zero-filled: a copy of source size 0
  // reads nothing, so their addresses need no clamping and every row's is the block's plus a constant.
  auto load_pair = [&](int kb0, int kb1, int slot) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int kb = h == 0 ? kb0 : kb1;
      const int nvalid = kb >= 0 ? p.Lk - kb * kBlockK : 0;
      const size_t off = (size_t)max(kb, 0) * kBlockK * D;
      const uint32_t so = slot * KV_BYTES + h * HALF + l_soff;
#pragma unroll
      for (int k = 0; k < kBlockK / RP; ++k) {
        const bool ok = lr + k * RP < nvalid;
        cp_async16(sK + so + k * RP * 128, kt + off + k * RP * D, ok);
        cp_async16(sV + so + k * RP * 128, vt + off + k * RP * D, ok);
      }
    }
  };
  // one iterator over the selected blocks: the blocks of tile it+1, read while tile it is computed, are the next
  // iteration's
  BitIter<true> blocks;
  blocks.init(bits, p.nW);
  int kb0 = blocks.next();
  int kb1 = kb0 >= 0 ? blocks.next() : -1;

  load_tile<T, D>(sQ, qg, kBlockQ, p.Lq - r0, tid);
  load_pair(kb0, kb1, 0);
  // V slot of "tile -1" zeroed, so that P V(-1) can be issued unconditionally (no branch between the wgmmas)
  for (int i = tid; i < KV_BYTES / 16; i += kThreads)
    reinterpret_cast<uint4*>(smem + (2 * kStages - 1) * KV_BYTES)[i] = make_uint4(0u, 0u, 0u, 0u);
  cp_async_commit();
  cp_async_wait<0>();
  fence_proxy_async_smem();  // written through the generic proxy, wgmma reads it async
  __syncthreads();

  uint32_t qf[D / 16][4];
  load_q_fragments<D>(sQ, warp, lane, qf);

  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;
  const int row_a = r0 + warp * 16 + g;
  uint32_t pa[4][4] = {};  // P of the previous tile (zero before tile 0: P V(-1) adds nothing)

  // O += P V of the tile in slot
  auto issue_pv = [&](int slot) {
    reg_fence(o);
    wgmma_fence();
    const uint32_t cV = sV + slot * KV_BYTES;
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) wgmma_pv<BF, D>(o, pa[ks], wgmma_desc_sw128(cV + ks * 2048, PANEL, 1024));
  };
  // Iteration it (tile it resident): issue Q K^T(it), then P V(it-1); load tile it+1; wait for Q K^T(it); softmax
  // of S(it) while P V(it-1) runs; wait for it; P(it) into pa.
  int it = 0;
  for (;; ++it) {
    if (kb0 < 0 && it > 0) break;  // (a query block without any block would run tile 0 fully masked)
    float s[8][4];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      wgmma_qk_n64<BF>(s, qf[kk],
                       wgmma_desc_sw128(sK + (it % kStages) * KV_BYTES + (kk / 4) * PANEL + (kk % 4) * 32, 16, 1024),
                       kk > 0);
    wgmma_commit();
    issue_pv((it + kStages - 1) % kStages);
    wgmma_commit();
    const int nb0 = blocks.next();
    const int nb1 = nb0 >= 0 ? blocks.next() : -1;
    if (nb0 >= 0) load_pair(nb0, nb1, (it + 1) % kStages);
    cp_async_commit();
    wgmma_wait<1>();  // Q K^T(it)
    reg_fence(s);
    // the second block missing (odd count) or keys past the causal limit -> -inf, in place and only on the
    // (rare, CTA-uniform) tiles that need it (a missing block: keys past every row)
    // (keys relative to the call's rows: absolute key - off)
    if (kb1 < 0 || kb1 * kBlockK + kBlockK - 1 - p.off > r0 || kb0 * kBlockK + kBlockK - 1 - p.off > r0) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int kb = h == 0 ? kb0 : kb1;
        const int key0 = kb >= 0 ? kb * kBlockK - p.off : p.Lq + kBlockQ;  // a missing block: past every row
#pragma unroll
        for (int n = 0; n < 4; ++n) mask_chunk(s[4 * h + n], key0 + n * 8, t, row_a);
      }
    }
    float corr_a, corr_b;
    const bool rescale = softmax_p<8>(s, p.scale_log2, m_a, m_b, l_a, l_b, corr_a, corr_b);
    wgmma_wait<0>();  // P V(it-1)
    reg_fence(o);
    pack_p<T, 8>(s, pa);
    if (rescale) rescale_o<D / 8>(o, corr_a, corr_b);  // before P V(it) adds P(it)
    cp_async_wait<0>();  // tile it+1
    fence_proxy_async_smem();
    __syncthreads();     // every warp's Q K^T(it) and P V(it-1) done: slots it-1 and it may be refilled later
    kb0 = nb0;
    kb1 = nb1;
  }
  issue_pv((it - 1) % kStages);
  wgmma_commit();
  wgmma_wait<0>();
  reg_fence(o);
  cp_async_wait<0>();
  store_rows<T, D>(p, b, hq, row_a, t, o, m_a, m_b, l_a, l_b);
}

template <typename T, int D>
static cudaError_t compute_dispatch(const ComputeParams& p, cudaStream_t s) {
  const bool wg = wgmma_device();
  const int kt = wg ? 2 * kBlockK : kBlockK;
  const int smem = kBlockQ * D * 2 + 2 * kStages * kt * D * 2;
  auto kernel = wg ? sale_compute_wg_kernel<T, D> : sale_compute_kernel<T, D>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  dim3 grid(p.nQ, p.Hq, p.B);
  kernel<<<grid, kThreads, smem, s>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_compute(const ComputeParams& p, int D, bool bf16, cudaStream_t stream) {
  return SALE_HEADDIM_SWITCH(D, kD, [&] {
    return SALE_DTYPE_SWITCH(bf16, T, [&] { return compute_dispatch<T, kD>(p, stream); });
  });
}

}  // namespace sale
