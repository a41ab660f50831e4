// Row dispatch shared by the CPU kernels (rationale_loss.cpp, sequence_logprobs.cpp, sample.cpp):
// the dtype switch onto (storage, accumulation) types and the OpenMP loop that hands out rows.
#pragma once
#include <cstdint>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "../dtype.h"
#include "vec_math.h"

namespace rk {

// Calls f(Types<T, Acc>{}): F32 float/float, F64 double/double, BF16 bf16_t/float, F16 f16_t/float.
template <typename F>
inline void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::F32: f(Types<float, float>{}); break;
    case DType::F64: f(Types<double, double>{}); break;
    case DType::BF16: f(Types<bf16_t, float>{}); break;
    case DType::F16: f(Types<f16_t, float>{}); break;
  }
}

// Calls body(r) for every row r in [0, n): one OpenMP task per row, handed out dynamically 4 at a
// time, on num_threads threads (0 = the runtime default); serial when n <= 1 or without OpenMP.
template <typename Body>
inline void parallel_rows(int64_t n, int num_threads, Body&& body) {
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads) if (n > 1)
#else
  (void)num_threads;
#endif
  for (int64_t r = 0; r < n; ++r) body(r);
}

// The same with per-thread scratch: each thread makes s = make_scratch() once, then runs
// body(r, s) for its rows.
template <typename MakeScratch, typename Body>
inline void parallel_rows(int64_t n, int num_threads, MakeScratch&& make_scratch, Body&& body) {
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel num_threads(threads) if (n > 1)
#else
  (void)num_threads;
#endif
  {
    auto scratch = make_scratch();
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 4)
#endif
    for (int64_t r = 0; r < n; ++r) body(r, scratch);
  }
}

}  // namespace rk
