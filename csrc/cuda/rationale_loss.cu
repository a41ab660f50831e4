// CUDA row kernels of the rationale loss. The math, aliasing rules and NaN/-inf behaviour are the
// contract in ../rationale_loss.h; this file only decides how to compute it on the GPU.
//
// One thread block per row. Pass 1 streams the row once and keeps, per thread, online-softmax
// states for segment A = [0, K) (plus the reference softmax over A when kl_mode == FULL) and
// segment B = [K, V); the states are merged across the block. Pass 2 (only when grad is wanted)
// streams the row again and writes the gradient; grad may alias logits because every element is
// read and written by the same thread, and pass 2 starts after a block barrier.
#include "rationale_loss.h"

#include <climits>
#include <cmath>
#include <cstdint>

#include "common.cuh"

namespace rk {
namespace {

using namespace cu;

constexpr int kMaxThreads = 512;

// Accurate libm like ex / lg (common.cuh); expm1 for the K3 estimator near rho = 0.
__device__ __forceinline__ float em1(float x) { return expm1f(x); }
__device__ __forceinline__ double em1(double x) { return expm1(x); }

template <class Acc, int N>
struct Vals { Acc v[N]; };

// Online-softmax state relative to its max m: s = sum e, t = sum e*(z - m), e = exp(z - m).
// REF (segment A under FULL) adds the reference softmax (max mr, sr = sum exp(r - mr)) and
// u = sum e*((z - m) - (r - mr)): centring both on their maxima keeps KL exact for large logits
// (as the CPU kernel does). m == -inf means empty (s = t = u = 0). NaN never becomes a max
// (comparisons are false) but reaches s/sr through exp(NaN), and +inf gives exp(inf - inf) = NaN,
// so a non-finite row always ends with s = NaN. A -inf reference logit under p > 0 gives u = +inf.
template <class Acc>
struct Soft { Acc m, s, t, u, mr, sr; };

template <class Acc>
__device__ __forceinline__ Soft<Acc> empty_soft() {
  return {Acc(-INFINITY), Acc(0), Acc(0), Acc(0), Acc(-INFINITY), Acc(0)};
}

// Re-expresses st relative to larger maxima M (and MR); no-op where they are not larger.
template <bool REF, class Acc>
__device__ __forceinline__ void rebase(Soft<Acc>& st, Acc M, Acc MR) {
  const bool empty = st.s == Acc(0);  // guards 0 * -inf below
  if constexpr (REF) {
    if (MR > st.mr) {
      const Acc dr = st.mr - MR;
      st.u = empty ? Acc(0) : st.u - st.s * dr;
      st.sr *= ex(dr);
      st.mr = MR;
    }
  }
  if (M > st.m) {
    const Acc d = st.m - M, f = ex(d);
    st.t = empty ? Acc(0) : f * (st.t + st.s * d);
    if constexpr (REF) st.u = empty ? Acc(0) : f * (st.u + st.s * d);
    st.s *= f;
    st.m = M;
  }
}

template <bool REF, class Acc>
__device__ __forceinline__ void merge(Soft<Acc>& a, Soft<Acc> b) {
  const Acc M = max_of(a.m, b.m), MR = max_of(a.mr, b.mr);
  rebase<REF>(a, M, MR);
  rebase<REF>(b, M, MR);
  a.s += b.s;
  a.t += b.t;
  if constexpr (REF) {
    a.u += b.u;
    a.sr += b.sr;
  }
}

// Adds N logits z (and, REF, their reference logits r) to st: one rebase per pack.
template <bool REF, class Acc, int N>
__device__ __forceinline__ void accumulate(Soft<Acc>& st, const Vals<Acc, N>& z, const Vals<Acc, N>& r) {
  Acc mx = st.m, mxr = st.mr;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    mx = max_of(mx, z.v[i]);
    if constexpr (REF) mxr = max_of(mxr, r.v[i]);
  }
  rebase<REF>(st, mx, mxr);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const bool dead = z.v[i] == Acc(-INFINITY);  // probability 0; also avoids -inf - -inf
    const Acc d = dead ? Acc(0) : z.v[i] - st.m;
    const Acc e = dead ? Acc(0) : ex(d);
    st.s += e;
    st.t += e * d;
    if constexpr (REF) {
      const bool rdead = r.v[i] == Acc(-INFINITY);
      const Acc dr = rdead ? Acc(-INFINITY) : r.v[i] - st.mr;
      st.sr += rdead ? Acc(0) : ex(dr);
      st.u += e == Acc(0) ? Acc(0) : e * (d - dr);  // 0 * inf guard
    }
  }
}

template <bool REF, class Acc>
__device__ __forceinline__ void warp_merge(Soft<Acc>& a) {
  constexpr unsigned kAll = 0xffffffffu;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Soft<Acc> b = empty_soft<Acc>();
    b.m = __shfl_xor_sync(kAll, a.m, o);
    b.s = __shfl_xor_sync(kAll, a.s, o);
    b.t = __shfl_xor_sync(kAll, a.t, o);
    if constexpr (REF) {
      b.u = __shfl_xor_sync(kAll, a.u, o);
      b.mr = __shfl_xor_sync(kAll, a.mr, o);
      b.sr = __shfl_xor_sync(kAll, a.sr, o);
    }
    merge<REF>(a, b);
  }
}

// Calls f(j, z[j..j+N), r[j..j+N)) for the columns [lo, hi) of one row, the block's threads striding
// over 16-byte packs (N = 16 / sizeof(T)) between a scalar head and tail (N = 1). REF: r is read,
// else r holds zeros. OUT: f returns the N values stored to g at the same columns.
template <class T, class Acc, bool REF, bool OUT, class F>
__device__ __forceinline__ void sweep(const T* z, const T* r, T* g, int64_t lo, int64_t hi, F&& f) {
  // Two packs in flight per thread hide latency; f64 (a test/reference dtype) keeps one to save
  // registers.
  constexpr int W = 16 / sizeof(T), U = sizeof(T) == 8 ? 1 : 2;
  const int64_t len = hi - lo;
  if (len <= 0) return;
  const int64_t head = aligned_head(len, sizeof(T), z + lo, REF ? r + lo : nullptr, OUT ? g + lo : nullptr);
  const int64_t nvec = (len - head) / W, tail = head + nvec * W, step = blockDim.x;

  auto one = [&](int64_t j) {
    Vals<Acc, 1> zv{{to_acc(z[j])}}, rv{{Acc(0)}};
    if constexpr (REF) rv.v[0] = to_acc(r[j]);
    if constexpr (OUT) g[j] = from_acc<T>(f(j, zv, rv).v[0]);
    else f(j, zv, rv);
  };
  for (int64_t j = lo + threadIdx.x; j < lo + head; j += step) one(j);
  for (int64_t j = lo + tail + threadIdx.x; j < hi; j += step) one(j);

  const int64_t base = lo + head;
  for (int64_t k = threadIdx.x; k < nvec; k += U * step) {
    Pack<T> zp[U] = {}, rp[U] = {};
#pragma unroll
    for (int u = 0; u < U; ++u) {  // issue all loads before any math (and any store)
      const int64_t j = base + (k + u * step) * W;
      if (k + u * step < nvec) {
        zp[u] = load_pack(z + j);
        if constexpr (REF) rp[u] = load_pack(r + j);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t j = base + (k + u * step) * W;
      if (k + u * step >= nvec) break;
      Vals<Acc, W> zv, rv{};
#pragma unroll
      for (int e = 0; e < W; ++e) {
        zv.v[e] = to_acc(zp[u].x[e]);
        if constexpr (REF) rv.v[e] = to_acc(rp[u].x[e]);
      }
      if constexpr (OUT) {
        const Vals<Acc, W> gv = f(j, zv, rv);
        Pack<T> gp;
#pragma unroll
        for (int e = 0; e < W; ++e) gp.x[e] = from_acc<T>(gv.v[e]);
        store_pack(g + j, gp);
      } else {
        f(j, zv, rv);
      }
    }
  }
}

// Per-row constants of d loss / d z_j (see the header), kept relative to the maxima so that large
// logits do not cost precision: p_j = exp((z_j - m) - log s), E_p z - m = ts. KL (j < K under
// FULL): kr = kl_coef * Z / Z_K and log p~_j - log q~_j - kl = (z_j - ma) - (r_j - mr) - dd.
template <class Acc, bool KL>
struct GradFn {
  Acc m, log_s, ts, wp, ec, rs, kr, ma, mr, dd;
  int64_t y;
  template <int N>
  __device__ __forceinline__ Vals<Acc, N> operator()(int64_t j, const Vals<Acc, N>& z,
                                                     const Vals<Acc, N>& r) const {
    Vals<Acc, N> g;
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const Acc zm = z.v[e] - m, p = ex(zm - log_s);
      Acc b = wp + ec * (zm - ts);
      if constexpr (KL) b += kr * (((z.v[e] - ma) - (r.v[e] - mr)) - dd);
      Acc ge = p == Acc(0) ? Acc(0) : p * b;  // p == 0 terms are 0, even where b is inf or NaN
      if (j + e == y) ge -= wp;
      g.v[e] = rs * ge;
    }
    return g;
  }
};

template <class T, class Acc>
struct Params {
  int64_t n, v, k;
  const T* z;
  int64_t ldz;
  const int64_t* labels;
  const Acc* w;
  const T* r;
  int64_t ldr;
  const Acc* ref_lp;
  int mode;
  Acc kc, ec;
  int64_t ignore;
  const Acc* rs;
  T* g;
  int64_t ldg;
  Acc* terms;
};

template <class Acc>
struct Totals { Soft<Acc> a, b; Acc zy; };

// Register budget per thread: <= 40 for the common kernels (3 blocks of 512 per SM), <= 64 with
// FULL KL; f64 (a test/reference dtype) gets what it needs, it spilled at 64 on sm_90.
template <class T, bool FULL>
constexpr int kMinBlocks = sizeof(T) == 8 ? 1 : FULL ? 2 : 3;

template <class T, class Acc, bool FULL>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks<T, FULL>) rows_kernel(const Params<T, Acc> p) {
  __shared__ Soft<Acc> sh_a[32], sh_b[32];
  __shared__ Totals<Acc> sh_tot;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;

  for (int64_t row = blockIdx.x; row < p.n; row += gridDim.x) {
    const int64_t y = p.labels[row];
    Acc* terms = p.terms + row * 4;
    T* g = p.g ? p.g + row * p.ldg : nullptr;
    if (y == p.ignore) {  // block-uniform
      if (threadIdx.x < 4) terms[threadIdx.x] = Acc(0);
      if (g) fill_zero(g, p.v, threadIdx.x, blockDim.x);
      continue;
    }
    const T* z = p.z + row * p.ldz;
    const T* r = FULL ? p.r + row * p.ldr : nullptr;
    const int64_t K = FULL ? p.k : p.v;

    // ---- pass 1: per-thread states, then block totals.
    Soft<Acc> A = empty_soft<Acc>(), B = empty_soft<Acc>();
    if constexpr (FULL) {
      sweep<T, Acc, true, false>(z, r, nullptr, 0, K, [&](int64_t, const auto& zv, const auto& rv) {
        accumulate<true>(A, zv, rv);
      });
      sweep<T, Acc, false, false>(z, nullptr, nullptr, K, p.v, [&](int64_t, const auto& zv, const auto& rv) {
        accumulate<false>(B, zv, rv);
      });
    } else {
      sweep<T, Acc, false, false>(z, nullptr, nullptr, 0, p.v, [&](int64_t, const auto& zv, const auto& rv) {
        accumulate<false>(A, zv, rv);
      });
    }
    warp_merge<FULL>(A);
    if constexpr (FULL) warp_merge<false>(B);
    if (lane == 0) {
      sh_a[warp] = A;
      if constexpr (FULL) sh_b[warp] = B;
    }
    __syncthreads();
    if (warp == 0) {  // warp 0 merges the per-warp states; the other warps wait at the barrier
      A = lane < nwarps ? sh_a[lane] : empty_soft<Acc>();
      warp_merge<FULL>(A);
      if constexpr (FULL) {
        B = lane < nwarps ? sh_b[lane] : empty_soft<Acc>();
        warp_merge<false>(B);
      }
      if (lane == 0) sh_tot = {A, B, to_acc(z[y])};  // z_y read before any grad write
    }
    __syncthreads();
    const Totals<Acc> tot = sh_tot;  // sh_tot is next written after the next row's first barrier

    // ---- row terms (every thread computes them; pass 2 needs most of them). Log-probabilities
    // are formed as (z - m) - log s, never as z - lse, so large logits do not cancel.
    Soft<Acc> all = tot.a;
    merge<false>(all, tot.b);
    const Acc log_s = lg(all.s), ts = all.t / all.s;
    const Acc ent = log_s - ts, nll = (all.m - tot.zy) + log_s;
    const Acc w = p.w ? p.w[row] : Acc(1);
    Acc kl = 0, c = 0, log_ratio = 0;  // FULL: log_ratio = log(s_K / s_rK)
    if constexpr (FULL) {
      log_ratio = lg(tot.a.s / tot.a.sr);
      kl = tot.a.u / tot.a.s - log_ratio;
    } else if (p.mode == static_cast<int>(KLMode::K1)) {
      kl = -nll - p.ref_lp[row];
      c = 1;
    } else if (p.mode == static_cast<int>(KLMode::K3)) {
      const Acc rho = p.ref_lp[row] + nll, em = em1(rho);  // expm1: no cancellation near rho = 0
      kl = em - rho;
      c = -em;
    }
    if (threadIdx.x == 0) {
      terms[0] = w * nll + p.kc * kl - p.ec * ent;
      terms[1] = nll;
      terms[2] = kl;
      terms[3] = ent;
    }
    if (!g) continue;

    // ---- pass 2: gradient (after the barriers above, so in-place grad is safe).
    const Acc wp = w - p.kc * c, rs = p.rs ? p.rs[row] : Acc(1);
    const GradFn<Acc, false> fb{all.m, log_s, ts, wp, p.ec, rs, Acc(0), Acc(0), Acc(0), Acc(0), y};
    if constexpr (FULL) {
      const Acc ratio = ex(all.m - tot.a.m) * (all.s / tot.a.s);  // Z / Z_K
      const GradFn<Acc, true> fa{all.m, log_s, ts, wp, p.ec, rs,
                                 p.kc * ratio, tot.a.m, tot.a.mr, log_ratio + kl, y};
      sweep<T, Acc, true, true>(z, r, g, 0, K, fa);
      sweep<T, Acc, false, true>(z, nullptr, g, K, p.v, fb);
    } else {
      sweep<T, Acc, false, true>(z, nullptr, g, 0, p.v, fb);
    }
  }
}

template <class T, class Acc>
const char* launch(Types<T, Acc>, const RowLossArgs& a, cudaStream_t stream) {
  const bool full = a.kl_mode == static_cast<int>(KLMode::FULL);
  const Params<T, Acc> p{a.n,
                         a.v,
                         full ? a.kl_vocab : a.v,
                         static_cast<const T*>(a.logits),
                         a.logits_ld,
                         a.labels,
                         static_cast<const Acc*>(a.weights),
                         static_cast<const T*>(a.ref_logits),
                         a.ref_ld,
                         static_cast<const Acc*>(a.ref_logprobs),
                         a.kl_mode,
                         static_cast<Acc>(a.kl_coef),
                         static_cast<Acc>(a.entropy_coef),
                         a.ignore_index,
                         static_cast<const Acc*>(a.row_scale),
                         static_cast<T*>(a.grad),
                         a.grad_ld,
                         static_cast<Acc*>(a.terms)};
  // Small vocabularies: fewer threads, so each still gets ~2 packs and the reductions stay cheap.
  constexpr int W = 16 / sizeof(T);
  int threads = kMaxThreads;
  while (threads > 64 && static_cast<int64_t>(threads) * W * 2 > a.v) threads /= 2;
  const unsigned grid = static_cast<unsigned>(a.n < INT_MAX ? a.n : INT_MAX);  // rows grid-stride beyond
  if (full) rows_kernel<T, Acc, true><<<grid, threads, 0, stream>>>(p);
  else rows_kernel<T, Acc, false><<<grid, threads, 0, stream>>>(p);
  return launch_error();
}

}  // namespace

const char* rationale_loss_rows_cuda(DType dtype, const RowLossArgs& a, void* stream) {
  if (a.n == 0) return nullptr;
  const auto s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, "rationale_loss_rows_cuda: unsupported dtype",
                        [&](auto types) { return launch(types, a, s); });
}

}  // namespace rk
