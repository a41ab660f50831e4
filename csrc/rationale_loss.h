// Shared contract of the rationale-loss row kernels (cpu/rationale_loss.cpp, cuda/rationale_loss.cu).
// Torch-free: raw pointers + sizes. The Python wrapper validates everything before calling.
//
// For every row n (token) with label y = labels[n] != ignore_index, policy logits z = logits[n, :V]:
//   lse = logsumexp(z), nll = lse - z_y, H = lse - sum_v p_v z_v (p = softmax(z))
//   kl_mode FULL: over the first K = kl_vocab ids, p~ = softmax(z[:K]), q~ = softmax(r[:K]),
//                 kl = sum_{v<K} p~_v (log p~_v - log q~_v)
//   kl_mode K1:   kl = logp_y - ref_logprobs[n]            (logp_y = -nll)
//   kl_mode K3:   rho = ref_logprobs[n] - logp_y, kl = exp(rho) - 1 - rho
//   loss = w * nll + kl_coef * kl - entropy_coef * H        (w = weights[n], 1 when null)
// terms[n*4 + {0,1,2,3}] = {loss, nll, kl, H}; all four are 0 for an ignored row.
// When grad != null: grad[n, j] = row_scale[n] * d loss / d z_j (0 for an ignored row), i.e.
//   w' = w - kl_coef * c  with c = 1 (K1), 1 - exp(rho) (K3), 0 otherwise
//   grad_j = p_j * [w' + entropy_coef * (z_j - E_p z) + (j < K) kl_coef * (Z/Z_K) * (z_j - r_j - D)]
//            - (j == y) * w'
//   with Z/Z_K = exp(lse - lse_K), D = lse_K - lse_rK + kl (FULL only). Terms with p_j == 0 are 0.
// Numerics (all backends): keep every log-prob centred on its running max, i.e. log p_j = (z_j - m) -
// log s, log p~_j = (z_j - m_K) - log s_K, log q~_j = (r_j - m_r) - log s_r, nll = (m - z_y) + log s,
// and accumulate the KL cross term centred as u = sum_{j<K} e^{z_j - m_K} ((z_j - m_K) - (r_j - m_r)),
// kl = u / s_K - log s_K + log s_r (rescaling u when m_K or m_r moves: u <- f (u + s (dm_K - dm_r)),
// f = e^{dm_K}, dm = old - new max). With |logits| ~ 1e4, the uncentred z_j - lse loses ~1e-3 in float.
// The gradient is then p_j [w' + a (log p_j + H) + b (Z/Z_K) (log p~_j - log q~_j - kl)] - [j==y] w'.
// grad may alias logits (in-place): each element is read before it is written.
// Logits containing NaN or +inf give NaN terms (never a finite wrong value); -inf logits are
// probability 0. Accumulation in float (double for F64 inputs).
#pragma once
#include <cstdint>

#include "dtype.h"

namespace rk {

enum class KLMode : int { NONE = 0, FULL = 1, K1 = 2, K3 = 3 };

struct RowLossArgs {
  int64_t n = 0, v = 0;
  const void* logits = nullptr;     // [n, v] of dtype, row stride logits_ld (elements), unit col stride
  int64_t logits_ld = 0;
  const int64_t* labels = nullptr;  // [n]
  const void* weights = nullptr;    // [n] acc type (float; double for F64) or null
  const void* ref_logits = nullptr; // [n, >= kl_vocab] of dtype or null (FULL only)
  int64_t ref_ld = 0;
  const void* ref_logprobs = nullptr;  // [n] acc type or null (K1/K3 only)
  int kl_mode = 0;
  int64_t kl_vocab = 0;  // K, 1 <= K <= v when FULL
  double kl_coef = 0.0, entropy_coef = 0.0;
  int64_t ignore_index = -100;
  const void* row_scale = nullptr;  // [n] acc type or null (= 1); scales grad only
  void* grad = nullptr;             // [n, v] of dtype, row stride grad_ld, or null
  int64_t grad_ld = 0;
  void* terms = nullptr;            // [n, 4] acc type, contiguous
  int num_threads = 0;              // CPU: OpenMP threads (0 = runtime default)
};

void rationale_loss_rows_cpu(DType dtype, const RowLossArgs& a);
#ifdef RK_WITH_CUDA
// stream is a cudaStream_t; returns a non-empty error message on failure.
const char* rationale_loss_rows_cuda(DType dtype, const RowLossArgs& a, void* stream);
#endif

}  // namespace rk
