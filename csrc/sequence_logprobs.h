// Shared contract of the token log-prob row kernels behind rk.sequence_logprobs
// (cpu/sequence_logprobs.cpp, cuda/sequence_logprobs.cu; triton/sequence_logprobs.py mirrors it).
// Torch-free: raw pointers + sizes. The Python wrapper validates everything before calling.
//
// Rows are addressed as a [B, T, V] view with element strides (stride_b, stride_t, 1): row r = b*T + t
// starts at logits + b*stride_b + t*stride_t. A packed [N, V] tensor is B = 1, T = N, stride_t = row
// stride; a shifted view logits[:, :-1] of [B, T+1, V] works without a copy.
//
// Forward, for every row r with label y = labels[r] != ignore_index (z = that row):
//   lse[r] = logsumexp(z)   (centred on the row max: m + log sum e^{z-m})
//   logp[r] = z_y - lse[r]  (computed as (z_y - m) - log s)
// Ignored rows: logp = 0, lse = 0. NaN or +inf anywhere in a row gives NaN logp (never a finite wrong
// value); -inf logits have probability 0 (a label whose logit is -inf gives logp = -inf).
//
// Backward: grad[r, j] = w[r] * ([j == y] - exp(z_j - lse[r])) for valid rows, 0 for ignored rows
// (and for rows with w[r] == 0 the kernel may skip the exp but must still write zeros).
// grad rows: grad + r * grad_ld (contiguous rows of the caller's choosing). grad may alias logits when
// the addressing coincides (a contiguous chunk, grad_ld == stride_t, B == 1): each element is read
// before it is written. One pass over the row: lse comes from the forward.
//
// Accumulation in float (double for F64 inputs); logp, lse and w are that accumulation type.
#pragma once
#include <cstdint>

#include "dtype.h"

namespace rk {

struct TokenRowsArgs {
  int64_t b = 0, t = 0, v = 0;  // rows = b * t
  const void* logits = nullptr;
  int64_t stride_b = 0, stride_t = 0;  // element strides of the [B, T, V] view, unit column stride
  const int64_t* labels = nullptr;     // [b * t] contiguous
  int64_t ignore_index = -100;
  int num_threads = 0;  // CPU: OpenMP threads (0 = runtime default)
};

// logp, lse: [b * t] acc type, contiguous.
void token_logprobs_fwd_cpu(DType dtype, const TokenRowsArgs& a, void* logp, void* lse);
// lse, w: [b * t] acc type; grad: rows of v elements of dtype, row r at grad + r * grad_ld.
void token_logprobs_bwd_cpu(DType dtype, const TokenRowsArgs& a, const void* lse, const void* w,
                            void* grad, int64_t grad_ld);
#ifdef RK_WITH_CUDA
// stream is a cudaStream_t; each returns a non-empty error message on failure, else nullptr.
const char* token_logprobs_fwd_cuda(DType dtype, const TokenRowsArgs& a, void* logp, void* lse,
                                    void* stream);
const char* token_logprobs_bwd_cuda(DType dtype, const TokenRowsArgs& a, const void* lse,
                                    const void* w, void* grad, int64_t grad_ld, void* stream);
#endif

}  // namespace rk
