// SALE stage 2 (selection): the stages of sale_select_kernel (sale_select.cu), as inlined device functions.
//   reference_thresholds   stage A: exact fp32 statistics over R -> the row thresholds thr_i
//   load_row_tests         stage B's per-row values: thresholds, prefilter bounds, Q steps (and Q's integer rows)
//   TileLoader             stage B's cp.async pipeline of integer K tiles with their sk / qm side values
//   issue_wgmma_chain,
//   estimate_block_mma     the integer estimate of a tile (wgmma) or of one key block (mma.sync)
//   row_bound, test_block  the selection test: row bound, prefilter, exact reference-order test
//   write_bits             the bitmap and the computed-pair counts to global memory
#pragma once

#include "sale_common.cuh"
#include "sale_launch.cuh"

namespace sale {

namespace {
constexpr int kThreads = 128;
constexpr int kStagesB = 3;
constexpr int kTileKeys = 64;  // two key blocks per stage-B tile
constexpr int kMaxHC = 4;      // most query heads per CTA
}  // namespace

// Shared memory of the selection kernel (device and host agree on it). Region A (stage A's 16-bit Q and K tiles)
// and region B (stage B's integer K tiles with their sk / qm values, per-block qm maxima and skq, kStagesB deep)
// overlap; then, on the wgmma path, the int8 Q tiles of up to kMaxHC heads; then the row thresholds and the bitmap
// words (HC * nW, sized by the host). WG: integer rows 128 bytes apart in the 128-byte swizzle layout (D = 64
// leaves half of each row unused), tiles and stages 1024-byte aligned; else rows padded to IB + 16 bytes
// (conflict-free ldmatrix).
template <int D, bool I4, bool WG>
struct SelectSmem {
  static constexpr int IB = I4 ? D / 2 : D;  // bytes per quantized row
  static constexpr int IRB = WG ? 128 : IB + 16;
  static constexpr int IT_BYTES = kTileKeys * IRB;  // integer K tile
  static constexpr int F_BYTES = kTileKeys * 4;     // sk / qm of a tile
  static constexpr int ALIGN = WG ? 1024 : 16;
  static constexpr int QMB_OFF = IT_BYTES + (1 + kMaxHC) * F_BYTES;  // [2 blocks][kMaxHC] block maxima of qm
  static constexpr int SKQ_OFF = QMB_OFF + 2 * kMaxHC * 4;  // [2 blocks][4] per-class maxima of sk
  static constexpr int STAGE_B = (SKQ_OFF + 2 * 4 * 4 + ALIGN - 1) / ALIGN * ALIGN;
  static constexpr int REGION_A = (kBlockQ + kBlockK) * D * 2;
  static constexpr int REGION_B = kStagesB * STAGE_B;
  static constexpr int REGION = REGION_A > REGION_B ? REGION_A : REGION_B;
  static constexpr int QI_BYTES = WG ? kMaxHC * kBlockQ * 128 : 0;
  static constexpr int FIXED = REGION + QI_BYTES + kMaxHC * kBlockQ * 4;  // + HC * nW * 4 bitmap bytes
};

// This thread's place in the CTA: 4 warps x 16 rows; in an mma fragment, rows g and g + 8, key columns 2t, 2t + 1.
struct ThreadPos {
  int tid, warp, lane, g, t;
};

// Stage A, per head with tau > 0: exact fp32 statistics over R on the smoothed logits
// z_ij = scale * q_i . k_j - c_i (visible keys only): m_i = max_j z_ij, l_i = sum_j exp(z_ij - m_i), online over the
// R blocks; then thr_i = (m_i + ln tau) + ln l_i, the reference's order (+inf for rows past Lq), into thr_s[h][64].
// Uses region A of shared memory; the caller synchronizes before reusing it.
template <typename T, int D, int HC>
__device__ __forceinline__ void reference_thresholds(const SelectParams& p, const BlockRange& br, const int b,
                                                     const int hq0, const int hkv, const ThreadPos& th,
                                                     unsigned char* smem, float* thr_s) {
  constexpr bool BF = TypeTraits<T>::kBF16;
  constexpr int RB = D * 2;  // bytes per row (16-bit tiles)
  constexpr int Q_BYTES = kBlockQ * RB;
  const int tid = th.tid, warp = th.warp, lane = th.lane, g = th.g, t = th.t;
  const uint32_t sQ = smem_u32(smem);
  const uint32_t sK = sQ + Q_BYTES;
  const T* kg = reinterpret_cast<const T*>(p.k) + (size_t)(b * p.Hkv + hkv) * p.Lk * D;
  constexpr int CPR = D / 8;
  const int row_a = br.r0 + warp * 16 + g, row_b = row_a + 8;  // in the call
  const int nR = br.nsink + (br.lend - max(br.lstart, br.nsink) + 1);
  for (int h = 0; h < HC; ++h) {
    const int hq = hq0 + h;
    const float tau = p.tau[hq];
    if (!(tau > 0.f)) continue;  // uniform
    __syncthreads();  // previous head's tiles fully consumed
    const T* qg = reinterpret_cast<const T*>(p.q) + ((size_t)(b * p.Hq + hq) * p.Lq + br.r0) * D;
    for (int i = tid; i < kBlockQ * CPR; i += kThreads) {
      const int r = i / CPR, c = i % CPR;
      const bool ok = br.r0 + r < p.Lq;
      cp_async16(sQ + swz<RB>(r, c), ok ? qg + (size_t)r * D + c * 8 : qg, ok);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    uint32_t qf[D / 16][4];
    load_q_fragments<D>(sQ, warp, lane, qf);
    const float* qkmg = p.qkm + (size_t)(b * p.Hq + hq) * p.LqPad;
    const float c_a = qkmg[row_a], c_b = qkmg[row_b];
    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;
    for (int ri = 0; ri < nR; ++ri) {
      const int kb = ri < br.nsink ? ri : max(br.lstart, br.nsink) + (ri - br.nsink);
      __syncthreads();  // previous K tile fully consumed
      for (int i = tid; i < kBlockK * CPR; i += kThreads) {
        const int r = i / CPR, c = i % CPR;
        const bool ok = kb * kBlockK + r < p.Lk;
        cp_async16(sK + swz<RB>(r, c), ok ? kg + ((size_t)kb * kBlockK + r) * D + c * 8 : kg, ok);
      }
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      float s[4][4];
      warp_qk_16x32<BF, D>(qf, sK, lane, s);
      float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
      for (int n = 0; n < 4; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          // the key's position relative to the call's rows (key - off): visible to row i iff <= i
          const int key = kb * kBlockK - p.off + n * 8 + 2 * t + (e & 1);
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
    if (t == 0) {
      thr_s[h * kBlockQ + warp * 16 + g] =
          row_a < p.Lq ? __fadd_rn(__fadd_rn(m_a, log_tau), logf(l_a)) : INFINITY;
      thr_s[h * kBlockQ + warp * 16 + g + 8] =
          row_b < p.Lq ? __fadd_rn(__fadd_rn(m_b, log_tau), logf(l_b)) : INFINITY;
    }
  }
}

// Stage B's values of one head for this thread's rows g and g + 8 (index rr): the exact threshold, the prefilter
// bounds below and above it (unscaled units) and the Q quantization step.
struct RowTests {
  float thr[2], pre[2], post[2], sq[2];
};

// Per head of the CTA: its RowTests and whether it is active (tau > 0, bit h of the result); its integer Q rows
// into registers (mma.sync path: qa) or, WG, as a cp.async copy into its Q tile in shared memory at sQi (joining the
// pipeline's first cp.async group). t_soff, RPB: this thread's 16-byte chunk of a tile and the rows between copies.
template <int HC, int IB, bool WG, int KS>
__device__ __forceinline__ unsigned load_row_tests(const SelectParams& p, const BlockRange& br, const int b,
                                                   const int hq0, const ThreadPos& th, const float* thr_s,
                                                   const uint32_t sQi, const int lr, const int lc,
                                                   const uint32_t t_soff, uint32_t (&qa)[HC][KS][4],
                                                   RowTests (&rows)[HC]) {
  constexpr int RPB = kThreads / (IB / 16);
  const int warp = th.warp, g = th.g, t = th.t;
  unsigned active = 0u;  // heads with tau > 0
  const float inv_scale = 1.f / p.scale;
#pragma unroll
  for (int h = 0; h < HC; ++h) {
    const int hq = hq0 + h;
    const bool act = p.tau[hq] > 0.f;
    active |= act ? (1u << h) : 0u;
    if constexpr (WG) {  // Q tile of head h -> shared memory (joins the pipeline's first cp.async group)
      const int8_t* qit = p.qi + ((size_t)(b * p.Hq + hq) * p.LqPad + br.r0 + lr) * IB + lc * 16;
      const uint32_t base = sQi + h * kBlockQ * 128;
#pragma unroll
      for (int k = 0; k < kBlockQ / RPB; ++k)
        cp_async16(base + t_soff + k * RPB * 128, qit + (size_t)k * RPB * IB, true);
    } else {
      const int8_t* qig = p.qi + ((size_t)(b * p.Hq + hq) * p.LqPad + br.r0 + warp * 16) * IB;
#pragma unroll
      for (int kk = 0; kk < IB / 32; ++kk) {
        qa[h][kk][0] = act ? *reinterpret_cast<const uint32_t*>(qig + (size_t)g * IB + kk * 32 + t * 4) : 0u;
        qa[h][kk][1] = act ? *reinterpret_cast<const uint32_t*>(qig + (size_t)(g + 8) * IB + kk * 32 + t * 4) : 0u;
        qa[h][kk][2] = act ? *reinterpret_cast<const uint32_t*>(qig + (size_t)g * IB + kk * 32 + 16 + t * 4) : 0u;
        qa[h][kk][3] =
            act ? *reinterpret_cast<const uint32_t*>(qig + (size_t)(g + 8) * IB + kk * 32 + 16 + t * 4) : 0u;
      }
    }
    const float* sqg = p.sq + (size_t)(b * p.Hq + hq) * p.LqPad;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const float th_r = act ? thr_s[h * kBlockQ + warp * 16 + g + 8 * rr] : INFINITY;
      rows[h].thr[rr] = th_r;
      // prefilter bounds in unscaled units, below and above the threshold: the fp32 reassociation error is far
      // below this margin, so a value under pre fails the exact test and one over post passes it
      const float margin = 2e-3f + 1e-5f * fabsf(th_r);
      rows[h].pre[rr] = th_r == INFINITY ? INFINITY : (th_r - margin) * inv_scale;
      rows[h].post[rr] = th_r == INFINITY ? INFINITY : (th_r + margin) * inv_scale;
      rows[h].sq[rr] = sqg[br.r0 + warp * 16 + g + 8 * rr];
    }
  }
  return active;
}

// Stage B's copies of this thread, planned once and advanced by one tile per load() (tiles are loaded in order):
// its 16-byte chunks of the integer K rows, and one side copy: a 16-byte chunk of sk or of a head's qm
// (tid < 16 + 16 * HC), a head's per-block qm maximum (4 bytes, the next 2 * HC threads), or a block's 4 skq
// values (16 bytes, the next 2 threads). The second block of the last tile may lie past bend: its values are still
// below nKpad / LkPad. Slots of the kStagesB-deep ring are STAGE_B bytes apart from sB.
template <typename SM, int HC>
struct TileLoader {
  static constexpr int IB = SM::IB, IRB = SM::IRB, RPB = kThreads / (IB / 16);
  const int8_t* k_src;
  const float* f_src = nullptr;  // none past the side-copy threads
  uint32_t f_dst = 0u;
  int f_step = 0;
  bool f4 = false;  // a 4-byte side copy (else 16 bytes)
  bool f16;
  uint32_t t_soff;
  uint32_t load_off = 0u;  // the slot load() fills next

  // the ring slot after the one at `off`
  __device__ __forceinline__ static uint32_t next_slot(uint32_t off) {
    return off + SM::STAGE_B == kStagesB * SM::STAGE_B ? 0u : off + SM::STAGE_B;
  }

  __device__ __forceinline__ TileLoader(const SelectParams& p, const int b, const int hq0, const int hkv,
                                        const int bstart, const int tid, const int lr, const int lc,
                                        const uint32_t t_soff_)
      : t_soff(t_soff_) {
    const int8_t* kig = p.ki + (size_t)(b * p.Hkv + hkv) * p.LkPad * IB;
    const float* skg = p.sk + (size_t)(b * p.Hkv + hkv) * p.LkPad;
    const float* qmg = p.qm + (size_t)(b * p.Hq + hq0) * p.LkPad;
    const float* qmbg = p.qmb + (size_t)(b * p.Hq + hq0) * p.nKpad;
    const float* skqg = p.skq + (size_t)(b * p.Hkv + hkv) * p.nKpad * 4;
    k_src = kig + (size_t)(bstart * kBlockK + lr) * IB + lc * 16;
    if (tid < 16) {
      f_src = skg + bstart * kBlockK + tid * 4;
      f_dst = SM::IT_BYTES + tid * 16;
      f_step = kTileKeys;
    } else if (tid < 16 + 16 * HC) {
      const int h = (tid - 16) / 16, c = (tid - 16) % 16;
      f_src = qmg + (size_t)h * p.LkPad + bstart * kBlockK + c * 4;
      f_dst = SM::IT_BYTES + (1 + h) * SM::F_BYTES + c * 16;
      f_step = kTileKeys;
    } else if (tid < 16 + 18 * HC) {
      const int j = tid - 16 - 16 * HC, h = j / 2, hb = j % 2;
      f_src = qmbg + (size_t)h * p.nKpad + bstart + hb;
      f_dst = SM::QMB_OFF + (hb * kMaxHC + h) * 4;
      f_step = 2;
      f4 = true;
    } else if (tid < 18 + 18 * HC) {
      const int j = tid - 16 - 18 * HC;
      f_src = skqg + (size_t)(bstart + j) * 4;
      f_dst = SM::SKQ_OFF + j * 16;
      f_step = 8;
    }
    f16 = f_src != nullptr && !f4;
  }

  // the next tile into the next ring slot (cp.async; the caller commits)
  __device__ __forceinline__ void load(const uint32_t sB) {
    const uint32_t base = sB + load_off;
#pragma unroll
    for (int k = 0; k < kTileKeys / RPB; ++k)
      cp_async16(base + t_soff + k * RPB * IRB, k_src + (size_t)k * RPB * IB, true);
    if (f16) cp_async16(base + f_dst, f_src, true);
    if (f4) cp_async4(base + f_dst, f_src);
    k_src += kTileKeys * IB;
    f_src += f_step;
    load_off = next_slot(load_off);
  }
};

// The row bound of one key block for one head on this thread's accumulators a[n0 .. n0 + 3] (rows g and g + 8,
// 8 keys): 2 tests per thread instead of 8 per row. With x = sq_i * acc_ij (rounded) and sk_j >= 0,
// fma(x, sk_j, qm_j) <= fma(sq_i * max(max_j acc_ij, 0), max_j sk_j, max_j qm_j) (rounding is monotone; sk over the
// thread's 8 keys: skm, qm over the block: qmx), so when this bound fails in every row of the warp the prefilter
// fails for every key of those rows, and so does the exact test.
template <typename Acc>
__device__ __forceinline__ bool row_bound(const Acc& a, const int n0, const RowTests& r, const float skm,
                                          const float qmx) {
  int am0 = 0, am1 = 0;
#pragma unroll
  for (int n = 0; n < 4; ++n) {
    am0 = max(am0, max(a[n0 + n][0], a[n0 + n][1]));
    am1 = max(am1, max(a[n0 + n][2], a[n0 + n][3]));
  }
  return (fmaf(r.sq[0] * (float)am0, skm, qmx) > r.pre[0]) | (fmaf(r.sq[1] * (float)am1, skm, qmx) > r.pre[1]);
}

// The selection test of key block kb for head h, for a warp where the row bound passed (accumulators a[n0 ..
// n0 + 3]; half `half` of the tile whose sk / qm values start at sks): the prefilter z' = fma(sq_i * acc, sk_j,
// qm_j) against the bounds, then, only where some element lies between them, the exact reference-order
// expression. Sets the block's bit in bitmap (row h, p.nW words) when some element passes.
template <typename Acc>
__device__ __forceinline__ void test_block(const SelectParams& p, const Acc& a, const int n0, const int h,
                                           const int kb, const int half, const float* sks, const RowTests& r,
                                           uint32_t* bitmap, const int t, const int lane) {
  // another warp already selected this block for head h (one shared load, uniform within the warp)
  if ((reinterpret_cast<volatile uint32_t*>(bitmap)[h * p.nW + (kb >> 5)] >> (kb & 31)) & 1u) return;
  const float* qms = sks + (1 + h) * kTileKeys;
  float2 qmv[4];
#pragma unroll
  for (int n = 0; n < 4; ++n) qmv[n] = *reinterpret_cast<const float2*>(qms + half * 32 + n * 8 + 2 * t);
  float2 skv[4];
#pragma unroll
  for (int n = 0; n < 4; ++n) skv[n] = *reinterpret_cast<const float2*>(sks + half * 32 + n * 8 + 2 * t);
  // prefilter on each row's largest z': over pre, a candidate; over post, a sure pass (no exact test needed)
  float zm[2][4];
#pragma unroll
  for (int n = 0; n < 4; ++n) {
    const float a0 = r.sq[0] * (float)a[n0 + n][0], a1 = r.sq[0] * (float)a[n0 + n][1];
    const float a2 = r.sq[1] * (float)a[n0 + n][2], a3 = r.sq[1] * (float)a[n0 + n][3];
    zm[0][n] = fmaxf(fmaf(a0, skv[n].x, qmv[n].x), fmaf(a1, skv[n].y, qmv[n].y));
    zm[1][n] = fmaxf(fmaf(a2, skv[n].x, qmv[n].x), fmaf(a3, skv[n].y, qmv[n].y));
  }
  const float z0 = fmaxf(fmaxf(zm[0][0], zm[0][1]), fmaxf(zm[0][2], zm[0][3]));
  const float z1 = fmaxf(fmaxf(zm[1][0], zm[1][1]), fmaxf(zm[1][2], zm[1][3]));
  const bool cand = (z0 > r.pre[0]) | (z1 > r.pre[1]), sure = (z0 > r.post[0]) | (z1 > r.post[1]);
  if (!__any_sync(0xffffffffu, cand)) return;
  if (__any_sync(0xffffffffu, sure)) {
    if (lane == 0) atomicOr(&bitmap[h * p.nW + (kb >> 5)], 1u << (kb & 31));
    return;
  }
  // exact test, the reference's fp32 order: zhat = scale * ((sq * sk) * acc + qm), no contraction
  bool pass = false;
#pragma unroll
  for (int n = 0; n < 4; ++n) {
    const float s0 = __fmul_rn(r.sq[0], skv[n].x), s1 = __fmul_rn(r.sq[0], skv[n].y);
    const float s2 = __fmul_rn(r.sq[1], skv[n].x), s3 = __fmul_rn(r.sq[1], skv[n].y);
    const float e0 = __fmul_rn(p.scale, __fadd_rn(__fmul_rn(s0, (float)a[n0 + n][0]), qmv[n].x));
    const float e1 = __fmul_rn(p.scale, __fadd_rn(__fmul_rn(s1, (float)a[n0 + n][1]), qmv[n].y));
    const float e2 = __fmul_rn(p.scale, __fadd_rn(__fmul_rn(s2, (float)a[n0 + n][2]), qmv[n].x));
    const float e3 = __fmul_rn(p.scale, __fadd_rn(__fmul_rn(s3, (float)a[n0 + n][3]), qmv[n].y));
    pass |= (e0 > r.thr[0]) | (e1 > r.thr[0]) | (e2 > r.thr[1]) | (e3 > r.thr[1]);
  }
  if (__any_sync(0xffffffffu, pass) && lane == 0) atomicOr(&bitmap[h * p.nW + (kb >> 5)], 1u << (kb & 31));
}

// wgmma path: head h's int8 estimate of both blocks of a tile, one warpgroup-wide chain of m64n64k32 over D / 32
// k-steps, one commit group. Descriptors: k chunk kk and head h add (kk * 32 + h * 64 * 128) / 16 to the address
// field of the first chunk's (no carry: shared addresses are below 256 KiB).
template <int D>
__device__ __forceinline__ void issue_wgmma_chain(const int h, int (&a)[8][4], const uint64_t dq0,
                                                  const uint64_t dk0) {
  reg_fence(a);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 32; ++kk)
    wgmma_s8_m64n64k32_ss(a, dq0 + (h * kBlockQ * 128 + kk * 32) / 16, dk0 + kk * 2, kk > 0);
  wgmma_commit();
}

// The heads of the CTA that still need key block kb (active ones whose bit is not set yet), uniform in the warp
// (a benign race on bits set by other warps: bits are only added).
template <int HC>
__device__ __forceinline__ unsigned heads_needing_block(const SelectParams& p, uint32_t* bitmap, const int kb,
                                                        const unsigned active, const int lane) {
  unsigned need = 0u;
  if (lane == 0) {
#pragma unroll
    for (int h = 0; h < HC; ++h) {
      const uint32_t wbits = reinterpret_cast<volatile uint32_t*>(bitmap)[h * p.nW + (kb >> 5)];
      need |= ((wbits >> (kb & 31)) & 1u) ? 0u : (1u << h);
    }
    need &= active;
  }
  return __shfl_sync(0xffffffffu, need, 0);
}

// mma.sync path: the integer estimate of one key block (half `half` of the tile at cKi) for every head in `need`,
// interleaved (16 independent accumulator chains per warp); K fragments loaded once per k-step for all heads.
template <bool I4, int HC, int KS, int IRB>
__device__ __forceinline__ void estimate_block_mma(int (&acc)[HC][4][4], const uint32_t (&qa)[HC][KS][4],
                                                   const uint32_t cKi, const int half, const int lane,
                                                   const unsigned need) {
#pragma unroll
  for (int h = 0; h < HC; ++h)
#pragma unroll
    for (int n = 0; n < 4; ++n) acc[h][n][0] = acc[h][n][1] = acc[h][n][2] = acc[h][n][3] = 0;
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    uint32_t kf[2][4];
#pragma unroll
    for (int np = 0; np < 2; ++np) {
      const int mi = lane / 8, r = lane % 8;
      const int key = half * 32 + np * 16 + (mi / 2) * 8 + r;
      const int byte = kk * 32 + (mi % 2) * 16;
      ldmatrix_x4(cKi + key * IRB + byte, kf[np][0], kf[np][1], kf[np][2], kf[np][3]);
    }
#pragma unroll
    for (int h = 0; h < HC; ++h) {
      if (!((need >> h) & 1u)) continue;  // uniform
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        mma_int<I4>(acc[h][2 * np], qa[h][kk], kf[np][0], kf[np][1]);
        mma_int<I4>(acc[h][2 * np + 1], qa[h][kk], kf[np][2], kf[np][3]);
      }
    }
  }
}

// The bitmap words of query block qb for each head, and its computed-pair count added to p.pairs.
template <int HC>
__device__ __forceinline__ void write_bits(const SelectParams& p, const int b, const int hq0, const int qb,
                                           const uint32_t* bitmap, const ThreadPos& th) {
  for (int h = 0; h < HC; ++h) {
    const int hq = hq0 + h;
    uint32_t* bg = p.bits + ((size_t)(b * p.Hq + hq) * p.nQ + qb) * p.nW;
    int cnt = 0;
    for (int w = th.tid; w < p.nW; w += kThreads) {
      const uint32_t m = bitmap[h * p.nW + w];
      bg[w] = m;
      cnt += __popc(m);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) cnt += __shfl_xor_sync(0xffffffffu, cnt, o);
    if (th.lane == 0 && cnt > 0) atomicAdd(p.pairs + b * p.Hq + hq, cnt);
  }
}

}  // namespace sale
