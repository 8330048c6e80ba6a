// Thin torch binding for the SALE CUDA kernels: checks, allocations, launches on the current stream.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>  // at::cuda::getCurrentCUDAStream is this function
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>

#include "sale_launch.cuh"

#include <algorithm>

namespace {

#define SALE_CHECK_CUDA(expr)                                                                  \
  do {                                                                                         \
    cudaError_t err__ = (expr);                                                                \
    TORCH_CHECK(err__ == cudaSuccess, "SALE CUDA error: ", cudaGetErrorString(err__), " at ", \
                #expr);                                                                        \
  } while (0)

void check_qkv(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 4, name, " must be [B, H, L, d]");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, name,
              " must be float16 or bfloat16");
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
  const auto d = x.size(3);
  TORCH_CHECK(d == sale::kHeadDimSmall || d == sale::kHeadDimLarge, name, ": head_dim must be ", sale::kHeadDimSmall,
              " or ", sale::kHeadDimLarge, ", got ", d);
}

// rows of a quantized buffer: whole multiples of sale::kRowPad (64)
int64_t pad64(int64_t L) { return (L + sale::kRowPad - 1) / sale::kRowPad * sale::kRowPad; }

at::Tensor channel_mean(const at::Tensor& x, cudaStream_t stream) {
  const int64_t B = x.size(0), H = x.size(1), L = x.size(2), D = x.size(3);
  const int64_t nchunk = (L + sale::kColsumRows - 1) / sale::kColsumRows;
  auto partial = at::empty({B * H, nchunk, D}, x.options().dtype(at::kFloat));
  SALE_CHECK_CUDA(sale::launch_colsum(x.data_ptr(), partial.data_ptr<float>(), (int)(B * H), (int)L, (int)D,
                                      (int)nchunk, x.scalar_type() == at::kBFloat16, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial.sum(1).div_((double)L);  // [B*H, D]
}

}  // namespace

// Stage 1. Returns {kint, sk, qint, sq, qm, qkm}; kint/qint rows are D bytes (int8) or D / 2 (int4, packed).
// q [B, Hq, Lq, D] and k [B, Hkv, Lk, D] with Lq <= Lk (the queries are the last Lq positions): K's mean, steps
// and qm run over the Lk keys (padded to LkPad), Q's mean, steps and qkm over the Lq rows (LqPad).
std::vector<at::Tensor> sale_quantize(at::Tensor q, at::Tensor k, int64_t per_block, int64_t bits, double scale) {
  check_qkv(q, "q");
  check_qkv(k, "k");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "q and k must have the same dtype");
  const c10::cuda::CUDAGuard guard(q.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3), Hkv = k.size(1), Lk = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D, "k shape mismatch");
  TORCH_CHECK(Lq >= 1 && Lq <= Lk, "need 1 <= Lq <= Lk, got Lq=", Lq, ", Lk=", Lk);
  TORCH_CHECK(Hq % Hkv == 0, "Hq must be a multiple of Hkv");
  const int64_t G = Hq / Hkv;
  TORCH_CHECK(G <= sale::kMaxGroup, "at most ", sale::kMaxGroup,
              " query heads per kv head are supported by the CUDA backend");
  TORCH_CHECK(bits == 8 || bits == 4, "estimate bits must be 8 or 4, got ", bits);
  const int64_t LqPad = pad64(Lq), LkPad = pad64(Lk);
  const int64_t IB = bits == 4 ? D / 2 : D;
  const int qmax = bits == 4 ? 7 : 127;
  const bool bf16 = q.scalar_type() == at::kBFloat16;

  auto kmean = channel_mean(k, stream);
  auto qmean = channel_mean(q, stream);

  auto f32 = q.options().dtype(at::kFloat);
  auto i8 = q.options().dtype(at::kChar);
  auto kint = at::empty({B, Hkv, LkPad, IB}, i8);
  auto sk = at::empty({B, Hkv, LkPad}, f32);
  auto qm = at::empty({B, Hq, LkPad}, f32);
  auto qint = at::empty({B, Hq, LqPad, IB}, i8);
  auto sq = at::empty({B, Hq, LqPad}, f32);
  auto qkm = at::empty({B, Hq, LqPad}, f32);

  sale::QuantParams pk{};
  pk.x = k.data_ptr();
  pk.mean = kmean.data_ptr<float>();
  pk.qmax = qmax;
  pk.ib = (int)IB;
  pk.xi = kint.data_ptr<int8_t>();
  pk.step = sk.data_ptr<float>();
  pk.qmean = qmean.data_ptr<float>();
  pk.qm = qm.data_ptr<float>();
  pk.L = (int)Lk;
  pk.Lpad = (int)LkPad;
  pk.H = (int)Hkv;
  pk.G = (int)G;
  pk.group_rows = per_block ? sale::kBlockK : 1;
  pk.kmean = nullptr;
  pk.qkm = nullptr;
  pk.scale = (float)scale;
  SALE_CHECK_CUDA(sale::launch_smooth_quant(pk, (int)(B * Hkv), (int)D, bf16, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  sale::QuantParams pq{};
  pq.x = q.data_ptr();
  pq.mean = qmean.data_ptr<float>();
  pq.qmax = qmax;
  pq.ib = (int)IB;
  pq.xi = qint.data_ptr<int8_t>();
  pq.step = sq.data_ptr<float>();
  pq.qmean = nullptr;
  pq.qm = nullptr;
  pq.L = (int)Lq;
  pq.Lpad = (int)LqPad;
  pq.H = (int)Hq;
  pq.G = (int)G;
  pq.group_rows = per_block ? sale::kBlockQ : 1;
  pq.kmean = kmean.data_ptr<float>();
  pq.qkm = qkm.data_ptr<float>();
  pq.scale = (float)scale;
  SALE_CHECK_CUDA(sale::launch_smooth_quant(pq, (int)(B * Hq), (int)D, bf16, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {kint, sk, qint, sq, qm, qkm};
}

// Stage 2. Returns {bits [B,Hq,nQ,nW] int32, pairs [B,Hq] int32}.
std::vector<at::Tensor> sale_select(at::Tensor q, at::Tensor k, at::Tensor qint, at::Tensor sq, at::Tensor kint,
                                    at::Tensor sk, at::Tensor qm, at::Tensor qkm, at::Tensor tau, double scale,
                                    int64_t sink_tokens, int64_t local_window) {
  check_qkv(q, "q");
  check_qkv(k, "k");
  TORCH_CHECK(tau.is_cuda() && tau.scalar_type() == at::kFloat && tau.is_contiguous(), "tau must be CUDA float32");
  const c10::cuda::CUDAGuard guard(q.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3), Hkv = k.size(1), Lk = k.size(2);
  TORCH_CHECK(tau.numel() == Hq, "thresholds must have Hq entries");
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && Hkv > 0 && Hq % Hkv == 0, "k shape mismatch");
  TORCH_CHECK(Lq >= 1 && Lq <= Lk, "need 1 <= Lq <= Lk, got Lq=", Lq, ", Lk=", Lk);
  const int64_t LqPad = pad64(Lq), LkPad = pad64(Lk);
  TORCH_CHECK(kint.size(2) == LkPad && sk.size(2) == LkPad && qm.size(2) == LkPad && qint.size(2) == LqPad &&
                  sq.size(2) == LqPad && qkm.size(2) == LqPad,
              "quantized buffers mismatch");
  const int64_t IB = kint.size(3);
  TORCH_CHECK((IB == D || IB == D / 2) && qint.size(3) == IB, "quantized rows must be D (int8) or D/2 (int4) bytes");
  const int64_t nQ = (Lq + sale::kBlockQ - 1) / sale::kBlockQ;
  const int64_t nK = (Lk + sale::kBlockK - 1) / sale::kBlockK;
  const int64_t nW = (nK + sale::kBitmapWordBits - 1) / sale::kBitmapWordBits;
  auto bits = at::empty({B, Hq, nQ, nW}, q.options().dtype(at::kInt));
  // the row bound's qm: one max per (query head, key block)
  auto qmb = qm.view({B, Hq, LkPad / sale::kBlockK, sale::kBlockK}).amax(-1).contiguous();
  // the row bound's sk: per key block, the max over the 8 keys of each accumulator column class t (keys 8n + 2t and
  // 8n + 2t + 1, n = 0..3: the keys of one thread's mma / wgmma accumulator fragment)
  auto skq = sk.view({B, Hkv, LkPad / sale::kBlockK, 4, 4, 2}).amax({3, 5}).contiguous();
  auto pairs = at::zeros({B, Hq}, q.options().dtype(at::kInt));
  sale::SelectParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.qi = qint.data_ptr<int8_t>();
  p.sq = sq.data_ptr<float>();
  p.ki = kint.data_ptr<int8_t>();
  p.sk = sk.data_ptr<float>();
  p.qm = qm.data_ptr<float>();
  p.qmb = qmb.data_ptr<float>();
  p.skq = skq.data_ptr<float>();
  p.qkm = qkm.data_ptr<float>();
  p.tau = tau.data_ptr<float>();
  p.bits = reinterpret_cast<uint32_t*>(bits.data_ptr<int>());
  p.pairs = pairs.data_ptr<int>();
  p.B = (int)B;
  p.Hq = (int)Hq;
  p.Hkv = (int)Hkv;
  p.Lq = (int)Lq;
  p.Lk = (int)Lk;
  p.LqPad = (int)LqPad;
  p.LkPad = (int)LkPad;
  p.off = (int)(Lk - Lq);
  p.nQ = (int)nQ;
  p.nK = (int)nK;
  p.nW = (int)nW;
  p.nKpad = (int)(LkPad / sale::kBlockK);
  p.sink_tokens = (int)std::min<int64_t>(sink_tokens, Lk);
  p.local_window = (int)std::min<int64_t>(local_window, Lk);
  p.scale = (float)scale;
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  SALE_CHECK_CUDA(sale::launch_select(p, (int)D, bf16, IB != D, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {bits, pairs};
}

// Stage 3. Returns {o, lse ([0, Hq, Lq] if !need_lse)}; q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], Lq <= Lk.
std::vector<at::Tensor> sale_compute(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor bits, double scale,
                                     bool need_lse) {
  check_qkv(q, "q");
  check_qkv(k, "k");
  check_qkv(v, "v");
  TORCH_CHECK(q.scalar_type() == v.scalar_type() && q.scalar_type() == k.scalar_type(), "dtype mismatch");
  TORCH_CHECK(bits.is_cuda() && bits.scalar_type() == at::kInt && bits.is_contiguous() && bits.dim() == 4,
              "bits must be a contiguous CUDA int32 [B,Hq,nQ,nW]");
  const c10::cuda::CUDAGuard guard(q.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3), Hkv = v.size(1), Lk = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D && Hkv > 0 && Hq % Hkv == 0,
              "k/v shape mismatch");
  TORCH_CHECK(Lq >= 1 && Lq <= Lk, "need 1 <= Lq <= Lk, got Lq=", Lq, ", Lk=", Lk);
  const int64_t nQ = (Lq + sale::kBlockQ - 1) / sale::kBlockQ;
  const int64_t nK = (Lk + sale::kBlockK - 1) / sale::kBlockK;
  const int64_t nW = (nK + sale::kBitmapWordBits - 1) / sale::kBitmapWordBits;
  TORCH_CHECK(bits.size(0) == B && bits.size(1) == Hq && bits.size(2) == nQ && bits.size(3) == nW,
              "bits shape mismatch");
  auto o = at::empty_like(q);
  // without need_lse an empty tensor (custom ops return tensors, never None)
  auto lse = at::empty({need_lse ? B : 0, Hq, Lq}, q.options().dtype(at::kFloat));
  sale::ComputeParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.bits = reinterpret_cast<const uint32_t*>(bits.data_ptr<int>());
  p.o = o.data_ptr();
  p.lse = need_lse ? lse.data_ptr<float>() : nullptr;
  p.B = (int)B;
  p.Hq = (int)Hq;
  p.Hkv = (int)Hkv;
  p.Lq = (int)Lq;
  p.Lk = (int)Lk;
  p.off = (int)(Lk - Lq);
  p.nQ = (int)nQ;
  p.nW = (int)nW;
  p.scale_log2 = (float)(scale * 1.4426950408889634);
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  SALE_CHECK_CUDA(sale::launch_compute(p, (int)D, bf16, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {o, lse};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "SALE block-sparse attention CUDA kernels";
  m.def("quantize", &sale_quantize, "SALE stage 1: smoothing + int8 / int4 quantization");
  m.def("select", &sale_select, "SALE stage 2: block selection");
  m.def("compute", &sale_compute, "SALE stage 3: block-sparse attention");
}
