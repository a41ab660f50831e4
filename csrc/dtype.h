// The logits dtypes every native kernel accepts (the integer the Python wrappers pass), and the tag
// the backends' dtype switches hand to their kernels: cpu/rows.h (dispatch_dtype) and
// cuda/common.cuh (cu::dispatch_dtype) map each DType to a storage type T and an accumulation
// type Acc (float; double for F64).
#pragma once

namespace rk {

enum class DType : int { F32 = 0, F64 = 1, BF16 = 2, F16 = 3 };

// Storage type T and accumulation type Acc of one dtype; kernels deduce both from the tag.
template <typename T_, typename Acc_>
struct Types {
  using T = T_;
  using Acc = Acc_;
};

}  // namespace rk
