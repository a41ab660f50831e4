// CPU row kernel of the rationale loss (contract and math: ../rationale_loss.h).
// One OpenMP task per row. The reduction loops carry `omp simd` (reassociation allowed there only)
// and the file is built with -fno-trapping-math so that guarded selects become vector blends. Each row is processed in blocks of kBlock elements converted to the
// accumulation type: pass 1 keeps an online-softmax state per segment ([0, K) and [K, V)), pass 2
// writes d loss / d logits (possibly in place). The block loops are branch-free so GCC vectorises them.
#include <algorithm>
#include <cmath>
#include <limits>

#include "../rationale_loss.h"
#include "rows.h"
#include "vec_math.h"

namespace rk {
namespace {

constexpr int64_t kBlock = 512;

// Online softmax state of one segment: m = running max, s = sum e^{z-m}, t = sum e^{z-m}(z-m) and,
// with a reference r (running max mr, sr = sum e^{r-mr}): u = sum e^{z-m}((z-m) - (r-mr)).
// Everything is centred on the running maxima so that large logits (|z| ~ 1e4) do not cancel
// catastrophically in float: KL = u/s - log s + log sr is then as accurate as log_softmax's.
template <typename Acc>
struct SegState {
  Acc m = -std::numeric_limits<Acc>::infinity();
  Acc s = 0, t = 0, u = 0;
  Acc mr = -std::numeric_limits<Acc>::infinity();
  Acc sr = 0;
};

template <typename T, typename Acc>
inline void load_block(const T* src, int64_t len, Acc* dst) {
  for (int64_t i = 0; i < len; ++i) dst[i] = to_acc(src[i]);
}

// Block max that does not lose NaN (a plain max skips it): NaN is reported through `nan`.
template <typename Acc>
inline Acc block_max(const Acc* x, int64_t len, int& nan) {
  Acc bm = -std::numeric_limits<Acc>::infinity();
#pragma omp simd reduction(max : bm) reduction(| : nan)
  for (int64_t i = 0; i < len; ++i) {
    bm = x[i] > bm ? x[i] : bm;
    nan |= (x[i] != x[i]);
  }
  return bm;
}

// Adds z[0, len) (and, when r != null, the reference terms) to the state.
template <typename Acc>
inline void accumulate(SegState<Acc>& st, const Acc* z, const Acc* r, int64_t len) {
  constexpr Acc ninf = -std::numeric_limits<Acc>::infinity();
  int nan = 0;
  const Acc bz = block_max(z, len, nan);
  const Acc br = r ? block_max(r, len, nan) : ninf;
  if (nan) {  // poison the state explicitly so NaN reaches the loss
    st.s = st.sr = std::numeric_limits<Acc>::quiet_NaN();
    return;
  }
  const Acc m = std::max(st.m, bz), mr = std::max(st.mr, br);
  if (r && mr > st.mr && st.mr > ninf) {
    st.sr *= exp_acc(st.mr - mr);
  }
  if (m > ninf && st.m > ninf) {  // rescale the old sums to the new maxima
    const Acc f = exp_acc(st.m - m);
    st.t = f * (st.t + st.s * (st.m - m));
    if (r) st.u = f * (st.u + st.s * ((st.m - m) - (st.mr - mr)));
    st.s *= f;
  }
  st.m = m;
  st.mr = mr;
  if (r && mr > ninf) {
    Acc sr = 0;
#pragma omp simd reduction(+ : sr)
    for (int64_t i = 0; i < len; ++i) sr += exp_acc(r[i] - mr);
    st.sr += sr;
  }
  if (m == ninf) return;  // all -inf so far: nothing to add
  Acc s = 0, t = 0, u = 0;
  if (r != nullptr) {
#pragma omp simd reduction(+ : s, t, u)
    for (int64_t i = 0; i < len; ++i) {
      const Acc d = z[i] - m;
      const Acc e = exp_acc(d);
      s += e;
      t += e > 0 ? e * d : Acc(0);  // e == 0 for -inf logits: skip 0 * inf
      u += e > 0 ? e * (d - (r[i] - mr)) : Acc(0);
    }
  } else {
#pragma omp simd reduction(+ : s, t)
    for (int64_t i = 0; i < len; ++i) {
      const Acc d = z[i] - m;
      const Acc e = exp_acc(d);
      s += e;
      t += e > 0 ? e * d : Acc(0);
    }
  }
  st.s += s;
  st.t += t;
  st.u += u;
}

// Merges two policy segments (same formulas as a block update); u and the reference are not merged
// because only segment [0, K) carries them.
template <typename Acc>
inline SegState<Acc> merge(const SegState<Acc>& a, const SegState<Acc>& b) {
  const Acc ninf = -std::numeric_limits<Acc>::infinity();
  if (b.m == ninf && !(b.s != b.s)) return a;
  if (a.m == ninf && !(a.s != a.s)) return b;
  SegState<Acc> o;
  o.m = std::max(a.m, b.m);
  const Acc fa = exp_acc(a.m - o.m), fb = exp_acc(b.m - o.m);
  o.s = fa * a.s + fb * b.s;
  o.t = fa * (a.t + a.s * (a.m - o.m)) + fb * (b.t + b.s * (b.m - o.m));
  return o;
}

// Cloned per ISA so wheels built for baseline x86-64 still use AVX2/AVX-512 where the CPU has it.
// x86-64-v3/v4 rather than avx2/avx512f: those bring F16C + FMA too, so fp16 conversions are
// instructions, not libcalls (1024 x 32000 fp16 NLL+entropy fwd+bwd, 2 cores: 2515 -> 110 ms).
template <typename T, typename Acc>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
void row(const RowLossArgs& a, int64_t n) {
  Acc* terms = static_cast<Acc*>(a.terms) + n * 4;
  const int64_t y = a.labels[n];
  T* grad = a.grad ? static_cast<T*>(a.grad) + n * a.grad_ld : nullptr;
  const int64_t V = a.v;
  if (y == a.ignore_index) {
    terms[0] = terms[1] = terms[2] = terms[3] = 0;
    if (grad) std::fill(grad, grad + V, from_acc<T>(Acc(0)));
    return;
  }
  const T* z = static_cast<const T*>(a.logits) + n * a.logits_ld;
  const bool full = a.kl_mode == static_cast<int>(KLMode::FULL);
  const T* r = full ? static_cast<const T*>(a.ref_logits) + n * a.ref_ld : nullptr;
  const int64_t K = full ? a.kl_vocab : V;
  const Acc w = a.weights ? static_cast<const Acc*>(a.weights)[n] : Acc(1);
  const Acc scale = a.row_scale ? static_cast<const Acc*>(a.row_scale)[n] : Acc(1);
  const Acc beta = static_cast<Acc>(a.kl_coef), alpha = static_cast<Acc>(a.entropy_coef);
  const Acc zy = to_acc(z[y]);  // read before pass 2 may overwrite it

  alignas(64) Acc zb[kBlock];
  alignas(64) Acc rb[kBlock];
  SegState<Acc> A, B;  // policy (+ reference) over [0, K), policy over [K, V)
  for (int64_t j0 = 0; j0 < K; j0 += kBlock) {
    const int64_t len = std::min(kBlock, K - j0);
    load_block(z + j0, len, zb);
    if (r) load_block(r + j0, len, rb);
    accumulate(A, zb, r ? rb : static_cast<const Acc*>(nullptr), len);
  }
  for (int64_t j0 = K; j0 < V; j0 += kBlock) {
    const int64_t len = std::min(kBlock, V - j0);
    load_block(z + j0, len, zb);
    accumulate(B, zb, static_cast<const Acc*>(nullptr), len);
  }
  const SegState<Acc> all = merge(A, B);
  // log-probs are formed as (z - m) - log s, never as z - lse, to keep large logits exact
  const Acc m = all.m, log_s = std::log(all.s);
  const Acc entropy = log_s - all.t / all.s;
  const Acc nll = (m - zy) + log_s;
  Acc kl = 0, c = 0, ratio = 0, log_sk = 0, log_sr = 0;
  if (full) {
    log_sk = std::log(A.s);
    log_sr = std::log(A.sr);
    kl = A.u / A.s - log_sk + log_sr;
    ratio = std::exp((m - A.m) + (log_s - log_sk));  // Z / Z_K
  } else if (a.kl_mode == static_cast<int>(KLMode::K1)) {
    kl = -nll - static_cast<const Acc*>(a.ref_logprobs)[n];
    c = 1;
  } else if (a.kl_mode == static_cast<int>(KLMode::K3)) {
    const Acc rho = static_cast<const Acc*>(a.ref_logprobs)[n] + nll;
    const Acc em1 = std::expm1(rho);  // exp(rho) - 1 without cancellation for small rho
    kl = em1 - rho;
    c = -em1;
  }
  terms[0] = w * nll + beta * kl - alpha * entropy;
  terms[1] = nll;
  terms[2] = kl;
  terms[3] = entropy;
  if (!grad) return;

  // grad_j = p_j [w' + alpha (log p_j + H) + beta (Z/Z_K)(log p~_j - log q~_j - kl)] - [j == y] w'
  const Acc wp = w - beta * c;
  const Acc mk = A.m, mr = A.mr;
  alignas(64) Acc gb[kBlock];
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t len = std::min(kBlock, V - j0);
    load_block(z + j0, len, zb);
    const int64_t kl_len = r ? std::max<int64_t>(0, std::min(len, K - j0)) : 0;
    if (kl_len > 0) load_block(r + j0, kl_len, rb);
    for (int64_t i = 0; i < kl_len; ++i) {
      const Acc logp = (zb[i] - m) - log_s;
      const Acc p = exp_acc(logp);
      const Acc dkl = ((zb[i] - mk) - log_sk) - ((rb[i] - mr) - log_sr) - kl;
      const Acc base = wp + alpha * (logp + entropy) + beta * ratio * dkl;
      gb[i] = p > 0 ? p * base : Acc(0);
    }
    for (int64_t i = kl_len; i < len; ++i) {
      const Acc logp = (zb[i] - m) - log_s;
      const Acc p = exp_acc(logp);
      const Acc base = wp + alpha * (logp + entropy);
      gb[i] = p > 0 ? p * base : Acc(0);
    }
    if (y >= j0 && y < j0 + len) gb[y - j0] -= wp;
    if (!(log_s == log_s)) std::fill(gb, gb + len, log_s);  // NaN row: NaN gradient
    for (int64_t i = 0; i < len; ++i) grad[j0 + i] = from_acc<T>(scale * gb[i]);
  }
}

template <typename T, typename Acc>
void rows(Types<T, Acc>, const RowLossArgs& a) {
  parallel_rows(a.n, a.num_threads, [&](int64_t n) { row<T, Acc>(a, n); });
}

}  // namespace

void rationale_loss_rows_cpu(DType dtype, const RowLossArgs& a) {
  dispatch_dtype(dtype, [&](auto types) { rows(types, a); });
}

}  // namespace rk
