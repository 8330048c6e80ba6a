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
