// SALE CUDA kernels: common device helpers (PTX wrappers for cp.async, ldmatrix, mma.sync).
// CUDA headers only (no torch), so every .cu can be compile-checked standalone with nvcc.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace sale {

// ---------------------------------------------------------------------------------------------
// element type traits
// ---------------------------------------------------------------------------------------------
template <typename T>
struct TypeTraits;

template <>
struct TypeTraits<__half> {
  static constexpr bool kBF16 = false;
  __device__ __forceinline__ static uint32_t pack2(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static float2 unpack2(uint32_t u) {
    __half2 h = *reinterpret_cast<__half2*>(&u);
    return __half22float2(h);
  }
};

template <>
struct TypeTraits<__nv_bfloat16> {
  static constexpr bool kBF16 = true;
  __device__ __forceinline__ static uint32_t pack2(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static float2 unpack2(uint32_t u) {
    __nv_bfloat162 h = *reinterpret_cast<__nv_bfloat162*>(&u);
    return __bfloat1622float2(h);
  }
};

// ---------------------------------------------------------------------------------------------
// shared memory / async copies
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; when !pred the 16 bytes are zero-filled (src not read).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool pred) {
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
// 4-byte async copy global -> shared (through L1)
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                                  uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

// ---------------------------------------------------------------------------------------------
// tensor-core MMA
// ---------------------------------------------------------------------------------------------
// D = A(16x16, row) * B(16x8, col) + D ; fp16/bf16 inputs, fp32 accumulators.
template <bool BF16>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<false>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<true>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// D = A(16x32 s8, row) * B(32x8 s8, col) + D ; exact int32 accumulation.
__device__ __forceinline__ void mma_s8_16832(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// D = A(16x64 s4, row) * B(64x8 s4, col) + D ; exact int32 accumulation. Two s4 per byte, the lower k index in
// the low nibble: in bytes, the fragments are laid out exactly as m16n8k32 s8's over 32-byte k chunks.
__device__ __forceinline__ void mma_s4_16864(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// one 32-byte k chunk of the integer estimate: s8 (m16n8k32) or packed s4 (m16n8k64)
template <bool I4>
__device__ __forceinline__ void mma_int(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (I4) {
    mma_s4_16864(c, a, b0, b1);
  } else {
    mma_s8_16832(c, a, b0, b1);
  }
}

// ---------------------------------------------------------------------------------------------
// Hopper warpgroup MMA (sm_90a only). Shared-memory operands are described by descriptors (start address, LBO,
// SBO, layout type); the kernels use the 128-byte swizzle layout (wgmma_desc_sw128), which the tensor cores read
// far faster than the no-swizzle one (docs/history/PERF_KERNEL_NOTES.md). int8 m64n64k32: A = 64 rows x 32 bytes and
// B = 64 keys x 32 bytes, both K-major. The accumulator layout per warp (rows 16 * warp + 0..15) equals
// mma.m16n8k32's C layout for n8 chunks 0..7.
// ---------------------------------------------------------------------------------------------
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SALE_WGMMA_ASM(...) asm volatile(__VA_ARGS__)
constexpr bool kWgmmaArch = true;  // this compilation pass targets sm_90a: wgmma available
#else
#define SALE_WGMMA_ASM(...) __trap()
constexpr bool kWgmmaArch = false;
#endif
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo) {
  return (uint64_t)((saddr & 0x3FFFFu) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32);
}
// the same for the 128-byte swizzle layout (atoms of 8 rows x 128 bytes, 16-byte chunk c of row r stored at chunk
// c ^ (r % 8); atoms 1024-byte aligned)
__device__ __forceinline__ uint64_t wgmma_desc_sw128(uint32_t saddr, uint32_t lbo, uint32_t sbo) {
  return wgmma_desc(saddr, lbo, sbo) | (1ull << 62);
}
__device__ __forceinline__ void wgmma_fence() { SALE_WGMMA_ASM("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  SALE_WGMMA_ASM("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  SALE_WGMMA_ASM("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async_smem() {
  SALE_WGMMA_ASM("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// keep the compiler from moving accumulator accesses across wgmma issue / wait
template <int N>
__device__ __forceinline__ void reg_fence(int (&d)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n)
    asm volatile("" : "+r"(d[n][0]), "+r"(d[n][1]), "+r"(d[n][2]), "+r"(d[n][3])::"memory");
}
// d = (accumulate ? d : 0) + A(64 rows x 32 s8, smem descriptor) * B(64 keys x 32 s8, smem descriptor)
__device__ __forceinline__ void wgmma_s8_m64n64k32_ss(int (&d)[8][4], uint64_t desc_a, uint64_t desc_b,
                                                      int accumulate) {
  SALE_WGMMA_ASM(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15"
      ",%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p;\n}\n"
      : "+r"(d[0][0]), "+r"(d[0][1]), "+r"(d[0][2]), "+r"(d[0][3]), "+r"(d[1][0]), "+r"(d[1][1]), "+r"(d[1][2]),
        "+r"(d[1][3]), "+r"(d[2][0]), "+r"(d[2][1]), "+r"(d[2][2]), "+r"(d[2][3]), "+r"(d[3][0]), "+r"(d[3][1]),
        "+r"(d[3][2]), "+r"(d[3][3]), "+r"(d[4][0]), "+r"(d[4][1]), "+r"(d[4][2]), "+r"(d[4][3]), "+r"(d[5][0]),
        "+r"(d[5][1]), "+r"(d[5][2]), "+r"(d[5][3]), "+r"(d[6][0]), "+r"(d[6][1]), "+r"(d[6][2]), "+r"(d[6][3]),
        "+r"(d[7][0]), "+r"(d[7][1]), "+r"(d[7][2]), "+r"(d[7][3])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// fp16/bf16 wgmma with A (64 rows x 16, fp16/bf16) from registers: per warp (rows 16 * warp + 0..15) the A
// fragment of mma.m16n8k16; B from shared memory (descriptor); fp32 accumulators d[n8 chunk][4] in mma.sync's C
// layout; TR "1": B MN-major (transposed). The macros name the operands d, a, desc_b and accumulate.
#define SALE_WGMMA_RS_N64(DT, TR)                                                                                   \
  SALE_WGMMA_ASM(                                                                                                   \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                                  \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." DT "." DT " "                                                   \
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15"                                                      \
      ",%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, "                                         \
      "{%32, %33, %34, %35}, %36, p, 1, 1, " TR ";\n}\n"                                                            \
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),                                                 \
        "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),                                                 \
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),                                                 \
        "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),                                                 \
        "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),                                                 \
        "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),                                                 \
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),                                                 \
        "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])                                                  \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate))

#define SALE_WGMMA_RS_N128(DT, TR)                                                                                  \
  SALE_WGMMA_ASM(                                                                                                   \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                                  \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." DT "." DT " "                                                  \
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15"                                                      \
      ",%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31"                                            \
      ",%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47"                                            \
      ",%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, "                                         \
      "{%64, %65, %66, %67}, %68, p, 1, 1, " TR ";\n}\n"                                                            \
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),                                                 \
        "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),                                                 \
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),                                                 \
        "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),                                                 \
        "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),                                                 \
        "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),                                                 \
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),                                                 \
        "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),                                                 \
        "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),                                                 \
        "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),                                                 \
        "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),                                             \
        "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),                                             \
        "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),                                             \
        "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),                                             \
        "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),                                             \
        "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])                                              \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate))

// S (64 x 64) = Q K^T over 16 channels: B = 64 keys x 16 channels, K-major
template <bool BF>
__device__ __forceinline__ void wgmma_qk_n64(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b, int accumulate) {
  if constexpr (BF) {
    SALE_WGMMA_RS_N64("bf16", "0");
  } else {
    SALE_WGMMA_RS_N64("f16", "0");
  }
}
// O (64 x D) += P V over 16 keys: B = 16 keys x D channels, MN-major (stored key-row-major)
template <bool BF, int D>
__device__ __forceinline__ void wgmma_pv(float (&d)[D / 8][4], const uint32_t (&a)[4], uint64_t desc_b) {
  [[maybe_unused]] constexpr int accumulate = 1;  // unused off sm_90a, where the macro traps
  static_assert(D == 64 || D == 128, "head dim 64 or 128");
  if constexpr (D == 64 && BF) {
    SALE_WGMMA_RS_N64("bf16", "1");
  } else if constexpr (D == 64) {
    SALE_WGMMA_RS_N64("f16", "1");
  } else if constexpr (BF) {
    SALE_WGMMA_RS_N128("bf16", "1");
  } else {
    SALE_WGMMA_RS_N128("f16", "1");
  }
}
template <int N>
__device__ __forceinline__ void reg_fence(float (&d)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n)
    asm volatile("" : "+f"(d[n][0]), "+f"(d[n][1]), "+f"(d[n][2]), "+f"(d[n][3])::"memory");
}

// fast 2^x (ex2.approx.ftz): 2^-inf = +0
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return x;
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

// XOR swizzle of 16-byte chunks inside a row of a 16-bit tile (row = ROW_BYTES bytes, ROW_BYTES a multiple
// of 128): 8 consecutive rows reading the same logical chunk hit 8 different bank groups (ldmatrix and
// cp.async conflict free).
template <int ROW_BYTES>
__device__ __forceinline__ uint32_t swz(int row, int chunk) {
  return static_cast<uint32_t>(row * ROW_BYTES + ((chunk ^ (row & 7)) << 4));
}

// A warp's mma A fragments of its 16 rows (warp * 16 ..) of a swizzled 16-bit Q tile at shared address q_tile.
template <int D>
__device__ __forceinline__ void load_q_fragments(uint32_t q_tile, int warp, int lane, uint32_t (&qf)[D / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int row = warp * 16 + (lane % 16);
    const int ch = kk * 2 + lane / 16;
    ldmatrix_x4(q_tile + swz<D * 2>(row, ch), qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3]);
  }
}

// One warp's 16 x 32 tile of S = Q K^T: Q fragments of its 16 rows (qf, from ldmatrix) times 32 keys of a
// swizzled 16-bit K tile at shared address k_tile (row = D * 2 bytes); fp32 accumulators s[n] per 8-key chunk.
template <bool BF, int D>
__device__ __forceinline__ void warp_qk_16x32(const uint32_t (&qf)[D / 16][4], uint32_t k_tile, int lane,
                                              float (&s)[4][4]) {
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
      ldmatrix_x4(k_tile + swz<D * 2>(key, ch), b0, b1, b2, b3);
      mma_16816<BF>(s[2 * np], qf[kk], b0, b1);
      mma_16816<BF>(s[2 * np + 1], qf[kk], b2, b3);
    }
  }
}

// Key blocks of the always-computed set R of a query block (causal, bottom-right: the call's rows are the last Lq
// positions, row i at absolute position i + off with off = Lk - Lq): sink blocks [0, nsink) and local blocks
// [lstart, lend]; visible blocks are [0, lend]. Rows are counted in the call (r0, r1), key blocks absolutely.
struct BlockRange {
  int r0, r1;     // first / last valid row of the query block (in the call)
  int nsink;      // sink blocks (clamped to visible)
  int lstart;     // first local block
  int lend;       // last visible block (= last local block)
};

__device__ __forceinline__ BlockRange block_range(int qb, int Lq, int off, int bq, int bk, int sink_tokens,
                                                  int local_window) {
  BlockRange r;
  r.r0 = qb * bq;
  r.r1 = min(r.r0 + bq, Lq) - 1;
  r.lend = (r.r1 + off) / bk;
  const int ls = r.r0 + off - local_window;
  r.lstart = ls > 0 ? ls / bk : 0;
  const int ns = sink_tokens > 0 ? (sink_tokens + bk - 1) / bk : 0;
  r.nsink = min(ns, r.lend + 1);
  return r;
}

}  // namespace sale
