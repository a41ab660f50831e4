// Shared contract of the sampler row kernels (cpu/sample.cpp, cuda/sample.cu; Triton:
// rationale_kernels/triton/sample.py). Torch-free: raw pointers + sizes; the Python wrapper
// (rationale_kernels/ops/sample.py) validates every argument before calling.
//
// For every row r with logits z = logits[r, :V] and parameters T, k, top_p, min_p (the per-row
// array entry when its pointer is non-null, else the scalar):
//   m = max z; e_j = exp((z_j - m) / T)  (so the max has e = 1; p_j = e_j / sum e)
//   top-k   (0 < k < V): t_k = the k-th largest e (ties with it are kept), else t_k = 0
//   top-p   (top_p < 1): over the tokens with e >= t_k, t_p = the smallest e value x such that the
//           mass of tokens with e > x is < top_p * (mass of e >= t_k); else t_p = 0
//   min-p   t_m = min_p (= min_p * max e)
//   kept = { j : e_j >= max(t_k, t_p, t_m) }, Z = sum of e over kept
//   draw d: u = bits_to_unit(sample_bits(seed, r, d)), id = the first kept j (index order) whose
//           inclusive prefix mass exceeds u * Z (the last kept j with e_j > 0 if rounding runs out)
//   logprobs[r, d] = (z_id - m) / T - log Z
// T == 0 is greedy: id = the lowest index of the maximum, logprob 0.
// A row holding a NaN or +inf gets ids -1, a row that is entirely -inf ids -2 (logprobs NaN):
// the wrapper raises. Every filter is an upper set of e, hence the single threshold: no sorting.
// Accumulation: float (double for F64), prefix and total masses in double on the CPU.
#pragma once
#include <cstdint>

#include "dtype.h"

namespace rk {

struct SampleArgs {
  int64_t b = 0, v = 0;
  const void* logits = nullptr;  // [b, v] of dtype, row stride logits_ld (elements), unit col stride
  int64_t logits_ld = 0;
  // per-row parameters ([b], contiguous) or null to use the scalar; floating arrays are double on
  // the CPU and float on CUDA
  const void* temperature = nullptr;
  double temperature_s = 1.0;
  const int64_t* top_k = nullptr;
  int64_t top_k_s = 0;
  const void* top_p = nullptr;
  double top_p_s = 1.0;
  const void* min_p = nullptr;
  double min_p_s = 0.0;
  int64_t num_samples = 1;
  uint64_t seed = 0;
  int64_t* ids = nullptr;      // [b, num_samples]
  void* logprobs = nullptr;    // [b, num_samples] acc type (float; double for F64), or null
  int num_threads = 0;         // CPU: OpenMP threads (0 = runtime default)
};

void sample_rows_cpu(DType dtype, const SampleArgs& a);
#ifdef RK_WITH_CUDA
// stream is a cudaStream_t; returns a non-empty error message on failure.
const char* sample_rows_cuda(DType dtype, const SampleArgs& a, void* stream);
#endif

}  // namespace rk
