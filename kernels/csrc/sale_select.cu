// SALE stage 2: block selection. One CTA per (b, 64-row query block, chunk of HC <= 4 query heads of one kv
// group; HC = the largest of 4/3/2/1 dividing G, a template parameter), 4 warps x 16 rows.
//   A. per head, exact fp32 statistics over the always-computed set R (sink + local blocks), on the smoothed
//      logits z_ij = scale * q_i . (k_j - kmean) = scale * q_i . k_j - c_i  (c_i = scale * q_i . kmean, from
//      stage 1; the original K is exact in the input dtype, a rounded smoothed copy would not be):
//      m_i = max_j z_ij, l_i = sum_j exp(z_ij - m_i), visible keys only;
//      per-row threshold thr_i = m_i + ln(tau) + ln(l_i) (+inf for rows past L), kept in shared memory.
//   B. for every visible key block outside R (a contiguous range [nsink, lstart)), the integer estimate
//      zhat_ij = scale * ((sq_i * sk_j) * (Qint_i . Kint_j) + qm_j), exact int32 dot products: int8 with
//      wgmma m64n64k32 (sm_90a) or mma.sync m16n8k32, packed int4 with mma.sync m16n8k64; the block is selected
//      iff some row i and key j have zhat_ij > thr_i. Data flow:
//      * every integer K tile (64 keys = 2 blocks, 16-byte cp.async, 3-stage pipeline) in shared memory serves
//        the HC heads of the CTA (wgmma: Q tiles in shared memory, one chain per head over both blocks, in two
//        accumulator sets, so head h is tested while h + 1 runs and h + 2 is issued after; every head's chain is
//        issued, with no branch around it, which ptxas would answer with a warpgroup.arrive; mma.sync: per
//        block, K fragments loaded once per warp and k-step, Q fragments of all heads in registers, heads
//        interleaved);
//      * row bound, 2 tests per thread: fma(sq_i * max_j acc_ij, max sk over the thread's keys (precomputed per
//        block and accumulator column class by the host, skq), max qm over the block) against the prefilter bound;
//        only warps where it passes go on;
//      * prefilter: z' = fma(sq_i * acc, sk_j, qm_j) against (thr_i -+ margin) / scale: an element over the upper
//        bound selects the block; only a warp where some element lies between the two evaluates the exact
//        reference-order expression scale * ((sq_i * sk_j) * acc + qm_j) > thr_i (the margin covers the rounding
//        differences, so neither bound changes the selection);
//      * a head skips a block already selected by another warp (early exit of the OR over the block).
//   Output: bitmap of computed key blocks (R | selected) per query block, and per-head pair counts.
//   tau == 0: every visible block.
//   Lq < Lk (a chunk of a chunked prefill): the call's rows are the last Lq positions; query blocks are counted
//   from the call's first row, key blocks (R, visibility, the bitmap) in absolute key positions. The offset
//   off = Lk - Lq enters only per-CTA constants (block_range) and stage A's causal test (key - off vs the row);
//   stage B's candidates lie wholly below every row of the block, so its loop is the same for any offset.
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

// I4: the estimate in packed int4 (two per byte, m16n8k64 s4 mma.sync; Hopper emulates it, so on sm_90 it is for
// parity only); else int8. WG (sm_90a build, int8): the int8 Q tiles of stage B live in shared memory (wgmma
// reads A and B from there), which frees the 64 registers of the A fragments: 3 CTAs per SM instead of 2.
template <typename T, int D, bool I4, int HC>
__global__ void __launch_bounds__(kThreads, (kWgmmaArch && !I4) ? 3 : 1) sale_select_kernel(SelectParams p) {
  constexpr bool BF = TypeTraits<T>::kBF16;
  constexpr bool WG = kWgmmaArch && !I4;
  using SM = SelectSmem<D, I4, WG>;
  constexpr int IB = SM::IB;
  constexpr int RB = D * 2;           // bytes per row (16-bit tiles)
  constexpr int IRB = SM::IRB;
  constexpr int Q_BYTES = kBlockQ * RB;
  constexpr int IT_BYTES = SM::IT_BYTES;
  constexpr int F_BYTES = SM::F_BYTES;
  constexpr int STAGE_B = SM::STAGE_B;
  constexpr int REGION = SM::REGION;
  extern __shared__ __align__(1024) unsigned char smem[];
  float* thr_s = reinterpret_cast<float*>(smem + REGION + SM::QI_BYTES);                           // [kMaxHC][64]
  uint32_t* bitmap = reinterpret_cast<uint32_t*>(smem + REGION + SM::QI_BYTES + kMaxHC * kBlockQ * 4);  // [HC][nW]
  if (WG && smem_u32(smem) % 1024 != 0) __trap();  // swizzle atoms must be 1024-byte aligned

  const int qb = p.nQ - 1 - blockIdx.x;
  const int hq0 = blockIdx.y * HC, b = blockIdx.z;
  const int G = p.Hq / p.Hkv;
  const int hkv = hq0 / G;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const BlockRange br = block_range(qb, p.Lq, p.off, kBlockQ, kBlockK, p.sink_tokens, p.local_window);

  for (int i = tid; i < HC * p.nW; i += kThreads) {
    const int h = i / p.nW, w = i % p.nW;
    const float tau = p.tau[hq0 + h];
    uint32_t m = 0u;
    const int lo = w * 32;
#pragma unroll 4
    for (int j = 0; j < 32; ++j) {
      const int kb = lo + j;
      const bool in = kb <= br.lend && (tau == 0.f || kb < br.nsink || kb >= br.lstart);
      m |= in ? (1u << j) : 0u;
    }
    bitmap[i] = m;
  }

  const int bstart = br.nsink, bend = br.lstart;  // candidate blocks [bstart, bend)
  bool any_sparse = false;
  for (int h = 0; h < HC; ++h) any_sparse |= p.tau[hq0 + h] > 0.f;
  if (any_sparse && bstart < bend) {
    // ---------------- A: exact statistics over R, per head ----------------
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
    __syncthreads();  // region A is reused by stage B; thr_s complete

    // ---------------- B: int8 estimate over candidate blocks, all heads of the CTA ----------------
    // this thread's 16-byte chunks of an integer Q or K tile: chunk lc of rows lr + k * RPB. WG: row r, chunk c at
    // r * 128 + (c ^ (r % 8)) * 16 (the 128-byte swizzle; RPB is a multiple of 8, so r % 8 = lr % 8); else rows
    // padded to IRB bytes. Computed once: the copies of a tile then differ by constants.
    constexpr int ICPR = IB / 16, RPB = kThreads / ICPR;
    const int lr = tid / ICPR, lc = tid % ICPR;
    const uint32_t t_soff = WG ? lr * 128 + ((lc ^ (lr % 8)) << 4) : lr * IRB + lc * 16;
    uint32_t qa[HC][WG ? 1 : IB / 32][4];  // mma.sync path: integer Q fragments of every head
    float thr[HC][2], pre[HC][2], post[HC][2], sqr[HC][2];
    unsigned active = 0u;  // heads with tau > 0
    const float inv_scale = 1.f / p.scale;
#pragma unroll
    for (int h = 0; h < HC; ++h) {
      const int hq = hq0 + h;
      const bool act = p.tau[hq] > 0.f;
      active |= act ? (1u << h) : 0u;
      if constexpr (WG) {  // Q tile of head h -> shared memory (joins the pipeline's first cp.async group)
        const int8_t* qit = p.qi + ((size_t)(b * p.Hq + hq) * p.LqPad + br.r0 + lr) * IB + lc * 16;
        const uint32_t base = smem_u32(smem) + REGION + h * kBlockQ * 128;
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
        const float th = act ? thr_s[h * kBlockQ + warp * 16 + g + 8 * rr] : INFINITY;
        thr[h][rr] = th;
        // prefilter bounds in unscaled units, below and above the threshold: the fp32 reassociation error is far
        // below this margin, so a value under pre fails the exact test and one over post passes it
        const float margin = 2e-3f + 1e-5f * fabsf(th);
        pre[h][rr] = th == INFINITY ? INFINITY : (th - margin) * inv_scale;
        post[h][rr] = th == INFINITY ? INFINITY : (th + margin) * inv_scale;
        sqr[h][rr] = sqg[br.r0 + warp * 16 + g + 8 * rr];
      }
    }
    const int8_t* kig = p.ki + (size_t)(b * p.Hkv + hkv) * p.LkPad * IB;
    const float* skg = p.sk + (size_t)(b * p.Hkv + hkv) * p.LkPad;
    const float* qmg = p.qm + (size_t)(b * p.Hq + hq0) * p.LkPad;
    const float* qmbg = p.qmb + (size_t)(b * p.Hq + hq0) * p.nKpad;
    const float* skqg = p.skq + (size_t)(b * p.Hkv + hkv) * p.nKpad * 4;
    const uint32_t sB = smem_u32(smem);
    const uint32_t sQi = sB + REGION;  // wgmma path
    const unsigned char* sBp = smem;
    const int ntile = (bend - bstart + 1) / 2;

    // this thread's copies of a stage-B tile, planned once and advanced by one tile per load_b call (tiles are
    // loaded in order): its 16-byte chunks of the integer K rows, and one side copy: a 16-byte chunk of sk or of a
    // head's qm (tid < 16 + 16 * HC), a head's per-block qm maximum (4 bytes, the next 2 * HC threads), or a block's
    // 4 skq values (16 bytes, the next 2 threads). The second block of the last tile may lie past bend: its values
    // are still below nKpad / LkPad.
    const int8_t* k_src = kig + (size_t)(bstart * kBlockK + lr) * IB + lc * 16;
    const float* f_src = nullptr;  // none past the side-copy threads
    uint32_t f_dst = 0u;
    int f_step = 0;
    bool f4 = false;  // a 4-byte side copy (else 16 bytes)
    if (tid < 16) {
      f_src = skg + bstart * kBlockK + tid * 4;
      f_dst = IT_BYTES + tid * 16;
      f_step = kTileKeys;
    } else if (tid < 16 + 16 * HC) {
      const int h = (tid - 16) / 16, c = (tid - 16) % 16;
      f_src = qmg + (size_t)h * p.LkPad + bstart * kBlockK + c * 4;
      f_dst = IT_BYTES + (1 + h) * F_BYTES + c * 16;
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
    const bool f16 = f_src != nullptr && !f4;
    // shared-memory offsets of ring slots: the next one after `off`
    auto next_slot = [](uint32_t off) { return off + STAGE_B == kStagesB * STAGE_B ? 0u : off + STAGE_B; };
    uint32_t load_off = 0u;  // the slot load_b fills next
    auto load_b = [&]() {
      const uint32_t base = sB + load_off;
#pragma unroll
      for (int k = 0; k < kTileKeys / RPB; ++k)
        cp_async16(base + t_soff + k * RPB * IRB, k_src + (size_t)k * RPB * IB, true);
      if (f16) cp_async16(base + f_dst, f_src, true);
      if (f4) cp_async4(base + f_dst, f_src);
      k_src += kTileKeys * IB;
      f_src += f_step;
      load_off = next_slot(load_off);
    };

    // the tests of one key block for head h on this thread's accumulators a[n0 .. n0 + 3] (rows g and g + 8, 8 keys)
    // row bound (2 tests per thread instead of 8 per row): with x = sq_i * acc_ij (rounded) and sk_j >= 0,
    // fma(x, sk_j, qm_j) <= fma(sq_i * max(max_j acc_ij, 0), max_j sk_j, max_j qm_j) (rounding is monotone; sk over
    // the thread's 8 keys, qm over the block), so when this bound fails in every row of the warp the prefilter fails
    // for every key of those rows, and so does the exact test
    auto row_bound = [&](const auto& a, const int n0, const int h, const float skm, const float qmx) {
      int am0 = 0, am1 = 0;
#pragma unroll
      for (int n = 0; n < 4; ++n) {
        am0 = max(am0, max(a[n0 + n][0], a[n0 + n][1]));
        am1 = max(am1, max(a[n0 + n][2], a[n0 + n][3]));
      }
      return (fmaf(sqr[h][0] * (float)am0, skm, qmx) > pre[h][0]) |
             (fmaf(sqr[h][1] * (float)am1, skm, qmx) > pre[h][1]);
    };
    // the rest, for a warp where the row bound passed for block kb (half `half` of the tile in slot sks): sets the
    // block's bit when some element passes
    auto test_block = [&](const auto& a, const int n0, const int h, const int kb, const int half, const float* sks) {
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
        const float a0 = sqr[h][0] * (float)a[n0 + n][0], a1 = sqr[h][0] * (float)a[n0 + n][1];
        const float a2 = sqr[h][1] * (float)a[n0 + n][2], a3 = sqr[h][1] * (float)a[n0 + n][3];
        zm[0][n] = fmaxf(fmaf(a0, skv[n].x, qmv[n].x), fmaf(a1, skv[n].y, qmv[n].y));
        zm[1][n] = fmaxf(fmaf(a2, skv[n].x, qmv[n].x), fmaf(a3, skv[n].y, qmv[n].y));
      }
      const float z0 = fmaxf(fmaxf(zm[0][0], zm[0][1]), fmaxf(zm[0][2], zm[0][3]));
      const float z1 = fmaxf(fmaxf(zm[1][0], zm[1][1]), fmaxf(zm[1][2], zm[1][3]));
      const bool cand = (z0 > pre[h][0]) | (z1 > pre[h][1]), sure = (z0 > post[h][0]) | (z1 > post[h][1]);
      if (!__any_sync(0xffffffffu, cand)) return;
      if (__any_sync(0xffffffffu, sure)) {
        if (lane == 0) atomicOr(&bitmap[h * p.nW + (kb >> 5)], 1u << (kb & 31));
        return;
      }
      // exact test, the reference's fp32 order: zhat = scale * ((sq * sk) * acc + qm), no contraction
      bool pass = false;
#pragma unroll
      for (int n = 0; n < 4; ++n) {
        const float s0 = __fmul_rn(sqr[h][0], skv[n].x), s1 = __fmul_rn(sqr[h][0], skv[n].y);
        const float s2 = __fmul_rn(sqr[h][1], skv[n].x), s3 = __fmul_rn(sqr[h][1], skv[n].y);
        const float z0 = __fmul_rn(p.scale, __fadd_rn(__fmul_rn(s0, (float)a[n0 + n][0]), qmv[n].x));
        const float z1 = __fmul_rn(p.scale, __fadd_rn(__fmul_rn(s1, (float)a[n0 + n][1]), qmv[n].y));
        const float z2 = __fmul_rn(p.scale, __fadd_rn(__fmul_rn(s2, (float)a[n0 + n][2]), qmv[n].x));
        const float z3 = __fmul_rn(p.scale, __fadd_rn(__fmul_rn(s3, (float)a[n0 + n][3]), qmv[n].y));
        pass |= (z0 > thr[h][0]) | (z1 > thr[h][0]) | (z2 > thr[h][1]) | (z3 > thr[h][1]);
      }
      if (__any_sync(0xffffffffu, pass) && lane == 0) atomicOr(&bitmap[h * p.nW + (kb >> 5)], 1u << (kb & 31));
    };

#pragma unroll
    for (int s = 0; s < kStagesB - 1; ++s) {
      if (s < ntile) load_b();
      cp_async_commit();
    }
    uint32_t slot_off = 0u;  // the slot of tile it
    for (int it = 0; it < ntile; ++it) {
      cp_async_wait<kStagesB - 2>();
      if constexpr (WG) fence_proxy_async_smem();  // written through the generic proxy, wgmma reads it async
      __syncthreads();
      if (it + kStagesB - 1 < ntile) load_b();
      cp_async_commit();
      const uint32_t cKi = sB + slot_off;
      const float* sks = reinterpret_cast<const float*>(sBp + slot_off + IT_BYTES);
      slot_off = next_slot(slot_off);
      const int kb0 = bstart + 2 * it;
      // the row bound's operands, loaded before the MMAs are issued (once issued, the wgmmas' operand reads occupy
      // shared memory and these loads would queue behind them): per head, the largest qm over the whole block, and
      // the largest sk over this thread's 8 keys (skq; both copied with the tile). The 8 sk values themselves are
      // loaded only by a warp that runs the prefilter: keeping them live across the MMAs cost more.
      float qmx[2][HC], skm[2];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
#pragma unroll
        for (int h = 0; h < HC; ++h) qmx[half][h] = sks[(SM::QMB_OFF - IT_BYTES) / 4 + half * kMaxHC + h];
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) skm[half] = sks[(SM::SKQ_OFF - IT_BYTES) / 4 + half * 4 + t];
      const int nb = kb0 + 1 < bend ? 2 : 1;  // the last tile may hold one candidate block
      if constexpr (WG) {
        // one warpgroup-wide int8 wgmma chain m64n64k32 (4 k-steps, both blocks of the tile) per head, one commit
        // group each, in two accumulator sets: heads h and h + 1 in flight while head h is tested, head h + 2 issued
        // into head h's set once its tests are done. Inactive heads are issued too (no branch between chains, which
        // ptxas would answer with a warpgroup.arrive). Descriptors: k chunk kk and head h add
        // (kk * 32 + h * 64 * 128) / 16 to the address field of the first chunk's (no carry: shared addresses are
        // below 256 KiB).
        const uint64_t dq0 = wgmma_desc_sw128(sQi, 16, 1024);
        const uint64_t dk0 = wgmma_desc_sw128(cKi, 16, 1024);
        int acc[2][8][4];
        auto issue = [&](const int h, int (&a)[8][4]) {
          reg_fence(a);
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < D / 32; ++kk)
            wgmma_s8_m64n64k32_ss(a, dq0 + (h * kBlockQ * 128 + kk * 32) / 16, dk0 + kk * 2, kk > 0);
          wgmma_commit();
        };
        issue(0, acc[0]);
        if constexpr (HC > 1) issue(1, acc[1]);
#pragma unroll
        for (int h = 0; h < HC; ++h) {
          if (h + 1 < HC) wgmma_wait<1>();  // head h's group done (head h + 1's may still run)
          else wgmma_wait<0>();
          reg_fence(acc[h & 1]);
          if ((active >> h) & 1u) {  // CTA-uniform; both blocks' row bounds first (two independent chains)
            const bool rb0 = row_bound(acc[h & 1], 0, h, skm[0], qmx[0][h]);
            const bool rb1 = row_bound(acc[h & 1], 4, h, skm[1], qmx[1][h]) & (nb == 2);
            const bool go0 = __any_sync(0xffffffffu, rb0), go1 = __any_sync(0xffffffffu, rb1);
            if (go0) test_block(acc[h & 1], 0, h, kb0, 0, sks);
            if (go1) test_block(acc[h & 1], 4, h, kb0 + 1, 1, sks);
          }
          if (h + 2 < HC) issue(h + 2, acc[h & 1]);
        }
      } else {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          if (half >= nb) break;  // uniform
          const int kb = kb0 + half;
          // heads that still need this block (a benign race on bits set by other warps: bits are only added)
          unsigned need = 0u;
          if (lane == 0) {
#pragma unroll
            for (int h = 0; h < HC; ++h) {
              const uint32_t wbits = reinterpret_cast<volatile uint32_t*>(bitmap)[h * p.nW + (kb >> 5)];
              need |= ((wbits >> (kb & 31)) & 1u) ? 0u : (1u << h);
            }
            need &= active;
          }
          need = __shfl_sync(0xffffffffu, need, 0);
          if (need == 0u) continue;
          // integer mma of every head that needs the block, interleaved (16 independent accumulator chains per warp)
          int acc[HC][4][4];
#pragma unroll
          for (int h = 0; h < HC; ++h)
#pragma unroll
            for (int n = 0; n < 4; ++n) acc[h][n][0] = acc[h][n][1] = acc[h][n][2] = acc[h][n][3] = 0;
#pragma unroll
          for (int kk = 0; kk < IB / 32; ++kk) {
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
#pragma unroll
          for (int h = 0; h < HC; ++h)
            if (((need >> h) & 1u) && __any_sync(0xffffffffu, row_bound(acc[h], 0, h, skm[half], qmx[half][h])))
              test_block(acc[h], 0, h, kb, half, sks);
        }
      }
    }
    cp_async_wait<0>();
  }
  __syncthreads();

  // write the bitmaps and count the computed pairs
  for (int h = 0; h < HC; ++h) {
    const int hq = hq0 + h;
    uint32_t* bg = p.bits + ((size_t)(b * p.Hq + hq) * p.nQ + qb) * p.nW;
    int cnt = 0;
    for (int w = tid; w < p.nW; w += kThreads) {
      const uint32_t m = bitmap[h * p.nW + w];
      bg[w] = m;
      cnt += __popc(m);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) cnt += __shfl_xor_sync(0xffffffffu, cnt, o);
    if (lane == 0 && cnt > 0) atomicAdd(p.pairs + b * p.Hq + hq, cnt);
  }
}

template <typename T, int D, bool I4, int HC>
static cudaError_t select_launch(const SelectParams& p, cudaStream_t s) {
  // the wgmma path (int8 Q tiles in shared memory, 128-byte swizzle) exists in sm_90a builds only
  const int fixed = (wgmma_device() && !I4) ? SelectSmem<D, I4, true>::FIXED : SelectSmem<D, I4, false>::FIXED;
  const int smem = fixed + HC * p.nW * 4;
  cudaError_t e;
  e = cudaFuncSetAttribute(sale_select_kernel<T, D, I4, HC>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  dim3 grid(p.nQ, p.Hq / HC, p.B);
  sale_select_kernel<T, D, I4, HC><<<grid, kThreads, smem, s>>>(p);
  return cudaGetLastError();
}

template <typename T, int D, bool I4>
static cudaError_t select_dispatch(const SelectParams& p, cudaStream_t s) {
  const int G = p.Hq / p.Hkv;
  if (G % 4 == 0) return select_launch<T, D, I4, 4>(p, s);
  if (G % 3 == 0) return select_launch<T, D, I4, 3>(p, s);
  if (G % 2 == 0) return select_launch<T, D, I4, 2>(p, s);
  return select_launch<T, D, I4, 1>(p, s);
}

template <typename T, int D>
static cudaError_t select_bits(const SelectParams& p, bool int4, cudaStream_t s) {
  return int4 ? select_dispatch<T, D, true>(p, s) : select_dispatch<T, D, false>(p, s);
}

cudaError_t launch_select(const SelectParams& p, int D, bool bf16, bool int4, cudaStream_t stream) {
  if (D == 64)
    return bf16 ? select_bits<__nv_bfloat16, 64>(p, int4, stream) : select_bits<__half, 64>(p, int4, stream);
  if (D == 128)
    return bf16 ? select_bits<__nv_bfloat16, 128>(p, int4, stream) : select_bits<__half, 128>(p, int4, stream);
  return cudaErrorInvalidValue;
}

}  // namespace sale
