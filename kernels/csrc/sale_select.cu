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
//        accumulator sets, so head h is tested while h + 1 runs and h + 2 is issued after; mma.sync: per block,
//        K fragments loaded once per warp and k-step, Q fragments of all heads in registers, heads interleaved);
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
// The stages are device functions in sale_select_stages.cuh; docs/DESIGN.md has the code-shape
// choices made for ptxas.
#include "sale_common.cuh"
#include "sale_launch.cuh"
#include "sale_select_stages.cuh"
#include "sale_static_switch.cuh"

namespace sale {

// I4: the estimate in packed int4 (two per byte, m16n8k64 s4 mma.sync; Hopper emulates it, so on sm_90 it is for
// parity only); else int8. WG (sm_90a build, int8): the int8 Q tiles of stage B live in shared memory (wgmma
// reads A and B from there), which frees the registers of the A fragments: 3 CTAs per SM instead of 2.
template <typename T, int D, bool I4, int HC>
__global__ void __launch_bounds__(kThreads, (kWgmmaArch && !I4) ? 3 : 1) sale_select_kernel(SelectParams p) {
  constexpr bool WG = kWgmmaArch && !I4;
  using SM = SelectSmem<D, I4, WG>;
  constexpr int IB = SM::IB;
  constexpr int IRB = SM::IRB;
  constexpr int IT_BYTES = SM::IT_BYTES;
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
  const int t = lane % 4;
  const ThreadPos th{tid, warp, lane, lane / 4, t};
  const BlockRange br = block_range(qb, p.Lq, p.off, kBlockQ, kBlockK, p.sink_tokens, p.local_window);

  // the initial bitmap words [HC][nW]: R of every head, and every visible block of a head at tau 0 (kept inline:
  // docs/DESIGN.md)
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
    // ---------------- A: exact statistics over R, per head -> row thresholds ----------------
    reference_thresholds<T, D, HC>(p, br, b, hq0, hkv, th, smem, thr_s);
    __syncthreads();  // region A is reused by stage B; thr_s complete

    // ---------------- B: integer estimate over candidate blocks, all heads of the CTA ----------------
    // this thread's 16-byte chunks of an integer Q or K tile: chunk lc of rows lr + k * RPB. WG: row r, chunk c at
    // r * 128 + (c ^ (r % 8)) * 16 (the 128-byte swizzle; RPB is a multiple of 8, so r % 8 = lr % 8); else rows
    // padded to IRB bytes. Computed once: the copies of a tile then differ by constants.
    constexpr int ICPR = IB / 16;
    const int lr = tid / ICPR, lc = tid % ICPR;
    const uint32_t t_soff = WG ? lr * 128 + ((lc ^ (lr % 8)) << 4) : lr * IRB + lc * 16;
    const uint32_t sB = smem_u32(smem);
    const uint32_t sQi = sB + REGION;  // wgmma path
    uint32_t qa[HC][WG ? 1 : IB / 32][4];  // mma.sync path: integer Q fragments of every head
    RowTests rows[HC];
    const unsigned active = load_row_tests<HC, IB, WG>(p, br, b, hq0, th, thr_s, sQi, lr, lc, t_soff, qa, rows);
    const unsigned char* sBp = smem;
    const int ntile = (bend - bstart + 1) / 2;
    TileLoader<SM, HC> loader(p, b, hq0, hkv, bstart, tid, lr, lc, t_soff);

#pragma unroll
    for (int s = 0; s < kStagesB - 1; ++s) {
      if (s < ntile) loader.load(sB);
      cp_async_commit();
    }
    uint32_t slot_off = 0u;  // the slot of tile it
    for (int it = 0; it < ntile; ++it) {
      cp_async_wait<kStagesB - 2>();
      if constexpr (WG) fence_proxy_async_smem();  // written through the generic proxy, wgmma reads it async
      __syncthreads();
      if (it + kStagesB - 1 < ntile) loader.load(sB);
      cp_async_commit();
      const uint32_t cKi = sB + slot_off;
      const float* sks = reinterpret_cast<const float*>(sBp + slot_off + IT_BYTES);
      slot_off = TileLoader<SM, HC>::next_slot(slot_off);
      const int kb0 = bstart + 2 * it;
      // the row bound's operands, loaded before the MMAs are issued: per head, the largest qm over the whole block,
      // and the largest sk over this thread's 8 keys (skq; both copied with the tile)
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
        // one chain per head in two accumulator sets: heads h and h + 1 in flight while head h is tested, head
        // h + 2 issued into head h's set once its tests are done; inactive heads are issued too (no branch)
        const uint64_t dq0 = wgmma_desc_sw128(sQi, 16, 1024);
        const uint64_t dk0 = wgmma_desc_sw128(cKi, 16, 1024);
        int acc[2][8][4];
        issue_wgmma_chain<D>(0, acc[0], dq0, dk0);
        if constexpr (HC > 1) issue_wgmma_chain<D>(1, acc[1], dq0, dk0);
#pragma unroll
        for (int h = 0; h < HC; ++h) {
          if (h + 1 < HC) wgmma_wait<1>();  // head h's group done (head h + 1's may still run)
          else wgmma_wait<0>();
          reg_fence(acc[h & 1]);
          if ((active >> h) & 1u) {  // CTA-uniform; both blocks' row bounds first (two independent chains)
            const bool rb0 = row_bound(acc[h & 1], 0, rows[h], skm[0], qmx[0][h]);
            const bool rb1 = row_bound(acc[h & 1], 4, rows[h], skm[1], qmx[1][h]) & (nb == 2);
            const bool go0 = __any_sync(0xffffffffu, rb0), go1 = __any_sync(0xffffffffu, rb1);
            if (go0) test_block(p, acc[h & 1], 0, h, kb0, 0, sks, rows[h], bitmap, t, lane);
            if (go1) test_block(p, acc[h & 1], 4, h, kb0 + 1, 1, sks, rows[h], bitmap, t, lane);
          }
          if (h + 2 < HC) issue_wgmma_chain<D>(h + 2, acc[h & 1], dq0, dk0);
        }
      } else {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          if (half >= nb) break;  // uniform
          const int kb = kb0 + half;
          const unsigned need = heads_needing_block<HC>(p, bitmap, kb, active, lane);
          if (need == 0u) continue;
          int acc[HC][4][4];
          estimate_block_mma<I4, HC, IB / 32, IRB>(acc, qa, cKi, half, lane, need);
#pragma unroll
          for (int h = 0; h < HC; ++h)
            if (((need >> h) & 1u) && __any_sync(0xffffffffu, row_bound(acc[h], 0, rows[h], skm[half], qmx[half][h])))
              test_block(p, acc[h], 0, h, kb, half, sks, rows[h], bitmap, t, lane);
        }
      }
    }
    cp_async_wait<0>();
  }
  __syncthreads();

  write_bits<HC>(p, b, hq0, qb, bitmap, th);
}

// ---- warp-specialized selection (sm_90a, int8): NC query blocks per CTA, one consumer warpgroup each, and a
// producer warp that streams the integer K tiles of the union of their candidate ranges through an S-slot ring
// (cp.async, completion signalled on a per-slot mbarrier; consumers release a slot on a second one). Every K tile
// serves NC query blocks x HC heads, and no CTA-wide barrier sits in the tile loop: one consumer's tests run
// while the other's MMAs do.
#ifndef SALE_SEL_NC
#define SALE_SEL_NC 3
#endif
#ifndef SALE_SEL_RR
#define SALE_SEL_RR 1  // 1: no producer warp; the consumers load the tiles in turn (tile j by rank j % n)
#endif
#ifndef SALE_SEL_PP
#define SALE_SEL_PP 1  // ping-pong: the warpgroups issue each tile's first MMAs in turn (rank order, named barriers)
#endif
#ifndef SALE_SEL_AHEAD
#define SALE_SEL_AHEAD 3  // SALE_SEL_RR: tiles loaded ahead of the one being tested (< SALE_SEL_STAGES)
#endif
#ifndef SALE_SEL_STAGES
#define SALE_SEL_STAGES 6
#endif
#ifndef SALE_SEL_NOTEST
#define SALE_SEL_NOTEST 0  // diagnostic: MMAs and tile pipeline only (accumulators folded into one register)
#endif
#ifndef SALE_SEL_ACC
#define SALE_SEL_ACC 2  // accumulator sets per consumer: heads in flight while one is tested
#endif
namespace {
constexpr int kWsNC = SALE_SEL_NC;
constexpr int kWsStages = SALE_SEL_STAGES;
constexpr int kWsThreads = kWsNC * kThreads + (SALE_SEL_RR ? 0 : 32);
static_assert(SALE_SEL_AHEAD < SALE_SEL_STAGES, "a slot must be free to load ahead");
}  // namespace

// Shared memory of the warp-specialized kernel: the ring; per consumer a region for stage A's 16-bit tiles, then
// (after stage A) its int8 Q tiles; per consumer its row thresholds; the mbarriers (full[S], empty[S]); per
// consumer its bitmap words (HC * nW, sized by the host).
template <int D, int NC, int S>
struct SelectSmemWs {
  using Ring = SelectSmem<D, false, true, S>;
  static constexpr int RING = S * Ring::STAGE_B;
  static constexpr int QREG = ((Ring::REGION_A > Ring::QI_BYTES ? Ring::REGION_A : Ring::QI_BYTES) + 1023) / 1024 * 1024;
  static constexpr int Q_OFF = RING;
  static constexpr int THR_BYTES = kMaxHC * kBlockQ * 4;
  static constexpr int THR_OFF = Q_OFF + NC * QREG;
  static constexpr int BAR_OFF = THR_OFF + NC * THR_BYTES;
  static constexpr int BITS_OFF = BAR_OFF + 2 * S * 8;
  static constexpr int FIXED = BITS_OFF;  // + NC * HC * nW * 4
};

template <typename T, int D, int HC, int NC, int S>
__global__ void __launch_bounds__(NC * kThreads + (SALE_SEL_RR ? 0 : 32), 1) sale_select_ws_kernel(SelectParams p) {
  using SM = SelectSmem<D, false, true, S>;
  using WS = SelectSmemWs<D, NC, S>;
  extern __shared__ __align__(1024) unsigned char smem[];
  if (smem_u32(smem) % 1024 != 0) __trap();  // swizzle atoms must be 1024-byte aligned
  const int hq0 = blockIdx.y * HC, b = blockIdx.z;
  const int G = p.Hq / p.Hkv;
  const int hkv = hq0 / G;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  bool any_sparse = false;
  for (int h = 0; h < HC; ++h) any_sparse |= p.tau[hq0 + h] > 0.f;
  // the consumers with candidates, and the union of their ranges (tiles counted from its start)
  int ustart = 0x7fffffff, uend = 0, nsparse = 0, rank = 0;  // rank: this warpgroup's among those with candidates
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    const int qc = p.nQ - 1 - (int)(blockIdx.x * NC + c);
    if (qc < 0 || !any_sparse) continue;
    const BlockRange r = block_range(qc, p.Lq, p.off, kBlockQ, kBlockK, p.sink_tokens, p.local_window);
    if (r.nsink >= r.lstart) continue;
    ustart = min(ustart, r.nsink);
    uend = max(uend, r.lstart);
    rank += c < warp / 4 ? 1 : 0;
    ++nsparse;
  }
  const int ntile = nsparse > 0 ? (uend - ustart + 1) / 2 : 0;
  const uint32_t sB = smem_u32(smem);
  const uint32_t full0 = sB + WS::BAR_OFF, empty0 = full0 + S * 8;
  if (tid == 0 && nsparse > 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(full0 + 8 * s, SALE_SEL_RR ? kThreads : 32);  // one cp.async arrival per loading thread
      mbar_init(empty0 + 8 * s, 4 * nsparse);    // one arrival per consumer warp
    }
  }
  __syncthreads();

#if !SALE_SEL_RR
  if (warp == NC * 4) {  // ---------------- producer warp ----------------
    if (ntile == 0) return;
    // the 128-thread copy plan of TileLoader, four virtual threads per lane
    constexpr int ICPR = SM::IB / 16;
    TileLoader<SM, HC> ld[4];
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int vt = lane + 32 * v, lr = vt / ICPR, lc = vt % ICPR;
      ld[v] = TileLoader<SM, HC>(p, b, hq0, hkv, ustart, vt, lr, lc, lr * 128 + ((lc ^ (lr % 8)) << 4));
    }
    int slot = 0, wrap = 0;
    for (int it = 0; it < ntile; ++it) {
      if (wrap > 0) mbar_wait(empty0 + 8 * slot, (wrap - 1) & 1);  // the slot's previous tile released
#pragma unroll
      for (int v = 0; v < 4; ++v) ld[v].load(sB);
      mbar_arrive_cp_async(full0 + 8 * slot);
      if (++slot == S) slot = 0, ++wrap;
    }
    cp_async_wait_all();
    return;
  }
#endif

  // ---------------- consumer warpgroup c: query block qb ----------------
  const int c = warp / 4;
  const int qb = p.nQ - 1 - (int)(blockIdx.x * NC + c);
  if (qb < 0) return;
  const int ctid = tid % kThreads;
  const ThreadPos th{ctid, warp % 4, lane, lane / 4, lane % 4};
  const int t = th.t;
  const WarpgroupSync sync{1 + c};
  const BlockRange br = block_range(qb, p.Lq, p.off, kBlockQ, kBlockK, p.sink_tokens, p.local_window);
  unsigned char* creg = smem + WS::Q_OFF + c * WS::QREG;
  float* thr_s = reinterpret_cast<float*>(smem + WS::THR_OFF + c * WS::THR_BYTES);
  uint32_t* bitmap = reinterpret_cast<uint32_t*>(smem + WS::BITS_OFF + c * HC * p.nW * 4);
  for (int i = ctid; i < HC * p.nW; i += kThreads) {  // R of every head, every visible block at tau 0
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
  const int bstart = br.nsink, bend = br.lstart;
  if (any_sparse && bstart < bend) {
    reference_thresholds<T, D, HC>(p, br, b, hq0, hkv, th, creg, thr_s, sync);
    sync();  // region A is reused by the int8 Q tiles; thr_s complete
    constexpr int ICPR = SM::IB / 16;
    const int lr = ctid / ICPR, lc = ctid % ICPR;
    const uint32_t t_soff = lr * 128 + ((lc ^ (lr % 8)) << 4);
    const uint32_t sQi = smem_u32(creg);
    uint32_t qa[HC][1][4];
    RowTests rows[HC];
    const unsigned active = load_row_tests<HC, SM::IB, true>(p, br, b, hq0, th, thr_s, sQi, lr, lc, t_soff, qa, rows);
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async_smem();
    sync();
    const uint64_t dq0 = wgmma_desc_sw128(sQi, 16, 1024);
    int slot = 0, notest_sink = 0;
    uint32_t phase = 0u, slot_off = 0u;
#if SALE_SEL_RR
    // tile `next` is loaded (by the warpgroup of rank next % nsparse) SALE_SEL_AHEAD tiles before it is tested
    TileLoader<SM, HC> loader(p, b, hq0, hkv, ustart, ctid, lr, lc, t_soff);
    int next = 0, nslot = 0, nwrap = 0, owner = 0;
    auto load_next = [&]() {
      if (owner == rank) {
        if (nwrap > 0) mbar_wait(empty0 + 8 * nslot, (nwrap - 1) & 1);  // the slot's previous tile released
        loader.load(sB);
        mbar_arrive_cp_async(full0 + 8 * nslot);
      } else {
        loader.skip();
      }
      ++next;
      if (++nslot == S) nslot = 0, ++nwrap;
      if (++owner == nsparse) owner = 0;
    };
    while (next < SALE_SEL_AHEAD && next < ntile) load_next();
#endif
    for (int it = 0; it < ntile; ++it) {
#if SALE_SEL_RR
      if (next < ntile) load_next();
#endif
      mbar_wait(full0 + 8 * slot, phase);
      fence_proxy_async_smem();  // the tile was written through the generic proxy, wgmma reads it async
      const int kb0 = ustart + 2 * it;
      const bool v0 = kb0 >= bstart && kb0 < bend, v1 = kb0 + 1 >= bstart && kb0 + 1 < bend;
      // ping-pong: wait for the previous rank to have issued its first MMAs of this tile (rank 0: of the last)
      if (SALE_SEL_PP && nsparse > 1 && (it > 0 || rank > 0)) named_barrier_sync(NC + 1 + rank, 2 * kThreads);
      const bool pp_signal = SALE_SEL_PP && nsparse > 1 && (it + 1 < ntile || rank + 1 < nsparse);
      const int pp_next = NC + 1 + (rank + 1 == nsparse ? 0 : rank + 1);
      if (v0 | v1) {  // uniform: only the union's edge tiles lie outside this query block's range
        const uint32_t cKi = sB + slot_off;
        const float* sks = reinterpret_cast<const float*>(smem + slot_off + SM::IT_BYTES);
        float qmx[2][HC], skm[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
#pragma unroll
          for (int h = 0; h < HC; ++h) qmx[half][h] = sks[(SM::QMB_OFF - SM::IT_BYTES) / 4 + half * kMaxHC + h];
        }
#pragma unroll
        for (int half = 0; half < 2; ++half) skm[half] = sks[(SM::SKQ_OFF - SM::IT_BYTES) / 4 + half * 4 + t];
        // A = SALE_SEL_ACC accumulator sets: heads h + 1 .. h + A - 1 in flight while h is tested, head h + A
        // issued into h's set once its tests are done
        constexpr int A = SALE_SEL_ACC < HC ? SALE_SEL_ACC : HC;
        const uint64_t dk0 = wgmma_desc_sw128(cKi, 16, 1024);
        int acc[A][8][4];
#pragma unroll
        for (int h = 0; h < A; ++h) issue_wgmma_chain<D>(h, acc[h], dq0, dk0);
        if (pp_signal) named_barrier_arrive(pp_next, 2 * kThreads);
#pragma unroll
        for (int h = 0; h < HC; ++h) {
          const int pending = (HC - 1 - h) < (A - 1) ? (HC - 1 - h) : (A - 1);  // groups still allowed in flight
          if (pending >= 3) wgmma_wait<3>();
          else if (pending == 2) wgmma_wait<2>();
          else if (pending == 1) wgmma_wait<1>();
          else wgmma_wait<0>();
          reg_fence(acc[h % A]);
          if (SALE_SEL_NOTEST) notest_sink ^= acc[h % A][0][0] ^ acc[h % A][7][3];
          if (!SALE_SEL_NOTEST && ((active >> h) & 1u)) {
            const bool rb0 = row_bound(acc[h % A], 0, rows[h], skm[0], qmx[0][h]) & v0;
            const bool rb1 = row_bound(acc[h % A], 4, rows[h], skm[1], qmx[1][h]) & v1;
            const bool go0 = __any_sync(0xffffffffu, rb0), go1 = __any_sync(0xffffffffu, rb1);
            if (go0) test_block(p, acc[h % A], 0, h, kb0, 0, sks, rows[h], bitmap, t, lane);
            if (go1) test_block(p, acc[h % A], 4, h, kb0 + 1, 1, sks, rows[h], bitmap, t, lane);
          }
          if (h + A < HC) issue_wgmma_chain<D>(h + A, acc[h % A], dq0, dk0);
        }
      } else if (pp_signal) {
        named_barrier_arrive(pp_next, 2 * kThreads);
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(empty0 + 8 * slot);  // this warp is done with the slot (MMAs waited for)
      slot_off = TileLoader<SM, HC>::next_slot(slot_off);
      if (++slot == S) slot = 0, phase ^= 1u;
    }
    if (SALE_SEL_NOTEST && notest_sink == 0x7ffffff1) bitmap[0] |= 2u;
  }
  sync();
  write_bits<HC>(p, b, hq0, qb, bitmap, th);
}

template <typename T, int D, int HC>
static cudaError_t select_ws_launch(const SelectParams& p, cudaStream_t s) {
  using WS = SelectSmemWs<D, kWsNC, kWsStages>;
  const int smem = WS::FIXED + kWsNC * HC * p.nW * 4;
  auto kernel = sale_select_ws_kernel<T, D, HC, kWsNC, kWsStages>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  dim3 grid((p.nQ + kWsNC - 1) / kWsNC, p.Hq / HC, p.B);
  kernel<<<grid, kWsThreads, smem, s>>>(p);
  return cudaGetLastError();
}

template <typename T, int D, bool I4, int HC>
static cudaError_t select_launch(const SelectParams& p, cudaStream_t s) {
  if constexpr (!I4) {
    if (wgmma_device()) return select_ws_launch<T, D, HC>(p, s);
  }
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

// HC: the most query heads of one kv group (at most 4) that divide G
template <typename T, int D, bool I4>
static cudaError_t select_dispatch(const SelectParams& p, cudaStream_t s) {
  const int G = p.Hq / p.Hkv;
  if (G % 4 == 0) return select_launch<T, D, I4, 4>(p, s);
  if (G % 3 == 0) return select_launch<T, D, I4, 3>(p, s);
  if (G % 2 == 0) return select_launch<T, D, I4, 2>(p, s);
  return select_launch<T, D, I4, 1>(p, s);
}

cudaError_t launch_select(const SelectParams& p, int D, bool bf16, bool int4, cudaStream_t stream) {
  return SALE_HEADDIM_SWITCH(D, kD, [&] {
    return SALE_DTYPE_SWITCH(bf16, T, [&] {
      return SALE_BOOL_SWITCH(int4, kI4, [&] { return select_dispatch<T, kD, kI4>(p, stream); });
    });
  });
}

}  // namespace sale
