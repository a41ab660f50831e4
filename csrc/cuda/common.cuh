// Device helpers shared by the CUDA kernels (rationale_loss.cu, sequence_logprobs.cu, sample.cu):
// accurate exp / log, storage <-> accumulation conversions, 16-byte packed row access, and the
// host-side dtype switch and launch-error check. Everything lives in rk::cu; each .cu file pulls
// it into its anonymous namespace with `using namespace cu;`.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../dtype.h"

namespace rk {
namespace cu {

// Accurate libm (not __expf): results are checked against a float64 reference.
__device__ __forceinline__ float ex(float x) { return expf(x); }
__device__ __forceinline__ double ex(double x) { return exp(x); }
__device__ __forceinline__ float lg(float x) { return logf(x); }
__device__ __forceinline__ double lg(double x) { return log(x); }

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }

template <class T, class Acc>
__device__ __forceinline__ T from_acc(Acc x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16(static_cast<float>(x));
  else if constexpr (std::is_same_v<T, __half>) return __float2half(static_cast<float>(x));
  else return static_cast<T>(x);
}

template <class Acc>
__device__ __forceinline__ Acc max_of(Acc a, Acc b) { return a > b ? a : b; }  // drops NaN

template <class T>
struct alignas(16) Pack { T x[16 / sizeof(T)]; };

// 16-byte global accesses. Stores use __stwb (st.global.wb.v4, the default write-back policy)
// because plain uint4/Pack stores were split into narrow ones by the compiler for some kernels.
template <class T>
__device__ __forceinline__ Pack<T> load_pack(const T* src) {
  const uint4 bits = *reinterpret_cast<const uint4*>(src);
  Pack<T> pk;
  memcpy(&pk, &bits, sizeof(pk));
  return pk;
}
template <class T>
__device__ __forceinline__ void store_pack(T* dst, const Pack<T>& pk) {
  uint4 bits;
  memcpy(&bits, &pk, sizeof(bits));
  __stwb(reinterpret_cast<uint4*>(dst), bits);
}

// Leading scalar elements before every non-null pointer is 16-byte aligned; len when the pointers'
// misalignments differ or are not a multiple of the element size es (then the whole range goes
// through the scalar path).
__device__ __forceinline__ int64_t aligned_head(int64_t len, size_t es, const void* a,
                                                const void* b = nullptr, const void* c = nullptr) {
  const uintptr_t mis = reinterpret_cast<uintptr_t>(a) % 16;
  if (mis % es != 0 || (b && reinterpret_cast<uintptr_t>(b) % 16 != mis) ||
      (c && reinterpret_cast<uintptr_t>(c) % 16 != mis))
    return len;
  const int64_t head = static_cast<int64_t>((16 - mis) % 16 / es);
  return head < len ? head : len;
}

// Zeros g[0, len), the threads tid in [0, step) striding over 16-byte packs between a scalar head
// and tail.
template <class T>
__device__ __forceinline__ void fill_zero(T* g, int64_t len, int64_t tid, int64_t step) {
  constexpr int W = 16 / sizeof(T);
  const T zero = from_acc<T>(0.0f);
  const int64_t head = aligned_head(len, sizeof(T), g);
  const int64_t nvec = (len - head) / W, tail = head + nvec * W;
  for (int64_t j = tid; j < head; j += step) g[j] = zero;
  for (int64_t j = tail + tid; j < len; j += step) g[j] = zero;
  Pack<T> zp;
#pragma unroll
  for (int e = 0; e < W; ++e) zp.x[e] = zero;
  for (int64_t k = tid; k < nvec; k += step) store_pack(g + head + k * W, zp);
}

// Host: returns f(Types<T, Acc>{}) for dtype (F32 float/float, F64 double/double, BF16
// __nv_bfloat16/float, F16 __half/float); `unsupported` for any other value.
template <class F>
inline const char* dispatch_dtype(DType dtype, const char* unsupported, F&& f) {
  switch (dtype) {
    case DType::F32: return f(Types<float, float>{});
    case DType::F64: return f(Types<double, double>{});
    case DType::BF16: return f(Types<__nv_bfloat16, float>{});
    case DType::F16: return f(Types<__half, float>{});
  }
  return unsupported;
}

// Host, right after a launch: nullptr, or the launch error's message.
inline const char* launch_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace cu
}  // namespace rk
