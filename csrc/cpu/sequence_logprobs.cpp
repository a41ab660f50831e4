// 2048 x 32000 fp32, 2 cores: fwd 10 ms (torch log_softmax+gather 98 ms), bwd 19 ms (torch 155).
// CPU token log-prob row kernels (contract: ../sequence_logprobs.h).
// One OpenMP task per row. Forward: blocks of kBlock logits are converted to the accumulation
// type, their max found (NaN reported apart, a plain max skips it), the running sum rescaled to the
// new max and e^{z-m} added: one read of the row. Backward: one read and one write per element,
// grad_j = w ([j == y] - e^{z_j - lse}), blockwise through a buffer so that grad may alias logits.
// The reduction loops carry `omp simd` and the file is built with -fno-trapping-math
// (CMakeLists.txt) so that exp_f32 (vec_math.h) and the guarded selects vectorise.
#include <algorithm>
#include <cmath>
#include <limits>

#include "../sequence_logprobs.h"
#include "rows.h"
#include "vec_math.h"

namespace rk {
namespace {

constexpr int64_t kBlock = 512;

template <typename T, typename Acc>
inline void load_block(const T* src, int64_t len, Acc* dst) {
  for (int64_t i = 0; i < len; ++i) dst[i] = to_acc(src[i]);
}
template <typename T, typename Acc>
inline void store_block(const Acc* src, int64_t len, T* dst) {
  for (int64_t i = 0; i < len; ++i) dst[i] = from_acc<T>(src[i]);
}

template <typename T>
inline const T* row_ptr(const TokenRowsArgs& a, int64_t r) {
  const int64_t bi = r / a.t, ti = r - bi * a.t;
  return static_cast<const T*>(a.logits) + bi * a.stride_b + ti * a.stride_t;
}

// Online max / sum of one row: m = max, s = sum e^{z-m}; s = NaN when the row holds a NaN (+inf
// gives NaN through e^{inf - inf}); m = -inf, s = 0 while every logit so far is -inf.
template <typename Acc>
struct Online {
  Acc m = -std::numeric_limits<Acc>::infinity();
  Acc s = 0;
};

template <typename Acc>
inline void accumulate(Online<Acc>& st, const Acc* z, int64_t len) {
  constexpr Acc ninf = -std::numeric_limits<Acc>::infinity();
  Acc bm = ninf;
  int nan = 0;
#pragma omp simd reduction(max : bm) reduction(| : nan)
  for (int64_t i = 0; i < len; ++i) {
    bm = z[i] > bm ? z[i] : bm;
    nan |= (z[i] != z[i]);
  }
  if (nan) {
    st.s = std::numeric_limits<Acc>::quiet_NaN();
    return;
  }
  if (bm == ninf) return;  // nothing to add (exp(-inf) = 0); also keeps -inf - -inf out
  if (bm > st.m) {
    if (st.m > ninf) st.s *= exp_acc(st.m - bm);
    st.m = bm;
  }
  const Acc m = st.m;
  Acc s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < len; ++i) s += exp_acc(z[i] - m);
  st.s += s;
}

// Cloned per ISA so wheels built for baseline x86-64 still use AVX2/AVX-512 where the CPU has it.
// The x86-64-v3/v4 levels, not bare "avx2"/"avx512f": those imply neither F16C nor FMA in GCC, and
// without F16C every fp16 <-> float conversion is a libgcc call (measured, 1024 x 32000 fp16, one
// thread: fwd 159 ms -> 17 ms, bwd 2445 ms -> 25 ms; fp32 9 ms, 16 ms).
template <typename T, typename Acc>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
void fwd_row(const TokenRowsArgs& a, int64_t r, Acc* logp, Acc* lse) {
  const int64_t y = a.labels[r];
  if (y == a.ignore_index) {
    logp[r] = lse[r] = 0;
    return;
  }
  const T* z = row_ptr<T>(a, r);
  const int64_t V = a.v;
  alignas(64) Acc zb[kBlock];
  Online<Acc> st;
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t len = std::min(kBlock, V - j0);
    load_block(z + j0, len, zb);
    accumulate(st, zb, len);
  }
  // Centred like log_softmax: (z_y - m) - log s does not round against a large lse.
  const Acc log_s = std::log(st.s);
  logp[r] = (to_acc(z[y]) - st.m) - log_s;
  lse[r] = st.m + log_s;
}

template <typename T, typename Acc>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
void bwd_row(const TokenRowsArgs& a, int64_t r, const Acc* lse, const Acc* w, T* grad,
             int64_t grad_ld) {
  const int64_t y = a.labels[r];
  T* g = grad + r * grad_ld;
  const int64_t V = a.v;
  const Acc wr = y == a.ignore_index ? Acc(0) : w[r];
  if (wr == Acc(0)) {  // ignored row or zero weight: zeros, even for non-finite logits
    std::fill(g, g + V, from_acc<T>(Acc(0)));
    return;
  }
  const T* z = row_ptr<T>(a, r);
  const Acc l = lse[r];
  alignas(64) Acc zb[kBlock];
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t len = std::min(kBlock, V - j0);
    load_block(z + j0, len, zb);  // the whole block is read before any of it is written
    const bool has_y = y >= j0 && y < j0 + len;
    const Acc zy = has_y ? zb[y - j0] : Acc(0);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) zb[i] = -wr * exp_acc(zb[i] - l);
    if (has_y) zb[y - j0] = wr * (Acc(1) - exp_acc(zy - l));
    store_block(zb, len, g + j0);
  }
}

template <typename T, typename Acc>
void fwd_rows(Types<T, Acc>, const TokenRowsArgs& a, void* logp, void* lse) {
  Acc* lp = static_cast<Acc*>(logp);
  Acc* ls = static_cast<Acc*>(lse);
  parallel_rows(a.b * a.t, a.num_threads, [&](int64_t r) { fwd_row<T, Acc>(a, r, lp, ls); });
}

template <typename T, typename Acc>
void bwd_rows(Types<T, Acc>, const TokenRowsArgs& a, const void* lse, const void* w, void* grad,
              int64_t grad_ld) {
  const Acc* ls = static_cast<const Acc*>(lse);
  const Acc* wt = static_cast<const Acc*>(w);
  T* g = static_cast<T*>(grad);
  parallel_rows(a.b * a.t, a.num_threads,
                [&](int64_t r) { bwd_row<T, Acc>(a, r, ls, wt, g, grad_ld); });
}

}  // namespace

void token_logprobs_fwd_cpu(DType dtype, const TokenRowsArgs& a, void* logp, void* lse) {
  dispatch_dtype(dtype, [&](auto types) { fwd_rows(types, a, logp, lse); });
}

void token_logprobs_bwd_cpu(DType dtype, const TokenRowsArgs& a, const void* lse, const void* w,
                            void* grad, int64_t grad_ld) {
  dispatch_dtype(dtype, [&](auto types) { bwd_rows(types, a, lse, w, grad, grad_ld); });
}

}  // namespace rk
