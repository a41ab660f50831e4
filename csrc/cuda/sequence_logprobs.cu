// CUDA token log-prob row kernels (contract, numerics and aliasing: ../sequence_logprobs.h).
//
// Rows go to "groups" of threads: a whole block per row for large vocabularies, a single warp per
// row when V <= kWarpMaxV. Both kernels are memory bound (one read of the row forward; one read and
// one write backward). With a block per row, a small row leaves most threads idle and the forward
// pays two block barriers and a shared-memory round trip for a few hundred elements; a warp per row
// reduces with shuffles only and puts 8 rows in flight per 256-thread block, so small vocabularies
// (and the tests' odd shapes) keep the SM busy. Large vocabularies (32k-152k) use up to 512 threads
// per row so that one row's bytes are in flight at once.
//
// Loads and stores are 16-byte packs where the row pointer allows it (a scalar head aligns it, a
// scalar tail finishes; rows whose pointers disagree in misalignment take the scalar path), because
// the [B, T, V] strides may be arbitrary. Every element is read and written by the same thread, and
// each thread issues its loads before its stores, so grad may alias logits.
#include "sequence_logprobs.h"

#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace rk {
namespace {

using namespace cu;

constexpr int kMaxThreads = 512;
constexpr int kWarpThreads = 256;  // warp-per-row kernels: 8 rows per block
constexpr int64_t kWarpMaxV = 2048;

// The threads that own one row: tid in [0, size). A warp (WARP) or the whole block.
template <bool WARP>
struct Group {
  int64_t id, count;  // this group's first row, number of groups in the grid
  int tid, size;
  __device__ __forceinline__ Group() {
    if constexpr (WARP) {
      const int per_block = blockDim.x >> 5;
      id = static_cast<int64_t>(blockIdx.x) * per_block + (threadIdx.x >> 5);
      count = static_cast<int64_t>(gridDim.x) * per_block;
      tid = threadIdx.x & 31;
      size = 32;
    } else {
      id = blockIdx.x;
      count = gridDim.x;
      tid = threadIdx.x;
      size = blockDim.x;
    }
  }
};

// Calls f(j, Acc z[N]) over the row's columns [0, len): 16-byte packs (N = 16 / sizeof(T), two in
// flight per thread) between a scalar head and tail (N = 1). OUT: f returns the N values stored to
// g at the same columns (each pack is loaded before anything is stored).
template <class T, class Acc, bool OUT, class F>
__device__ __forceinline__ void sweep(const T* z, T* g, int64_t len, int tid, int step, F&& f) {
  constexpr int W = 16 / sizeof(T), U = sizeof(T) == 8 ? 1 : 2;
  if (len <= 0) return;
  const int64_t head = aligned_head(len, sizeof(T), z, OUT ? g : nullptr);
  const int64_t nvec = (len - head) / W, tail = head + nvec * W;
  auto one = [&](int64_t j) {
    const Acc zv[1] = {to_acc(z[j])};
    if constexpr (OUT) {
      Acc gv[1];
      f(j, zv, gv);
      g[j] = from_acc<T>(gv[0]);
    } else {
      f(j, zv);
    }
  };
  for (int64_t j = tid; j < head; j += step) one(j);
  for (int64_t j = tail + tid; j < len; j += step) one(j);
  for (int64_t k = tid; k < nvec; k += U * step) {
    Pack<T> zp[U] = {};
#pragma unroll
    for (int u = 0; u < U; ++u) {  // all loads before any math or store
      if (k + u * step < nvec) zp[u] = load_pack(z + head + (k + u * step) * W);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (k + u * step >= nvec) break;
      const int64_t j = head + (k + u * step) * W;
      Acc zv[W];
#pragma unroll
      for (int e = 0; e < W; ++e) zv[e] = to_acc(zp[u].x[e]);
      if constexpr (OUT) {
        Acc gv[W];
        f(j, zv, gv);
        Pack<T> gp;
#pragma unroll
        for (int e = 0; e < W; ++e) gp.x[e] = from_acc<T>(gv[e]);
        store_pack(g + j, gp);
      } else {
        f(j, zv);
      }
    }
  }
}

// Online softmax state: m = max, s = sum e^{z-m}. m == -inf with s == 0 is empty. NaN never becomes
// a max (comparisons are false) but reaches s through e^{NaN - m}; +inf gives e^{inf - inf} = NaN;
// rescaling multiplies s, so a NaN s survives every merge (NaN * 0 = NaN).
template <class Acc>
struct Soft { Acc m, s; };

template <class Acc>
__device__ __forceinline__ void rebase(Soft<Acc>& st, Acc M) {
  if (M > st.m) {  // st.m = -inf: e^{-inf} = 0 keeps s = 0 (or NaN)
    st.s *= ex(st.m - M);
    st.m = M;
  }
}

template <class Acc>
__device__ __forceinline__ void merge(Soft<Acc>& a, Soft<Acc> b) {
  const Acc M = max_of(a.m, b.m);
  rebase(a, M);
  rebase(b, M);
  a.s += b.s;
}

template <class Acc, int N>
__device__ __forceinline__ void accumulate(Soft<Acc>& st, const Acc (&z)[N]) {
  Acc mx = st.m;
#pragma unroll
  for (int i = 0; i < N; ++i) mx = max_of(mx, z[i]);
  rebase(st, mx);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    // -inf is probability 0 (and -inf - -inf must not make a NaN); NaN != -inf goes through
    st.s += z[i] == Acc(-INFINITY) ? Acc(0) : ex(z[i] - st.m);
  }
}

template <class Acc>
__device__ __forceinline__ void warp_merge(Soft<Acc>& a) {
  constexpr unsigned kAll = 0xffffffffu;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Soft<Acc> b;
    b.m = __shfl_xor_sync(kAll, a.m, o);
    b.s = __shfl_xor_sync(kAll, a.s, o);
    merge(a, b);
  }
}

template <class T, class Acc>
struct Params {
  int64_t t, v;
  const T* z;
  int64_t sb, st;
  const int64_t* labels;
  int64_t ignore;
  int64_t rows;
};

template <class T, class Acc>
__device__ __forceinline__ const T* row_ptr(const Params<T, Acc>& p, int64_t r) {
  const int64_t bi = r / p.t, ti = r - bi * p.t;
  return p.z + bi * p.sb + ti * p.st;
}

// Forward: logp = (z_y - m) - log s, lse = m + log s for each row (0, 0 when ignored).
template <class T, class Acc, bool WARP>
__global__ void __launch_bounds__(kMaxThreads) fwd_kernel(const Params<T, Acc> p, Acc* logp,
                                                          Acc* lse) {
  __shared__ Soft<Acc> sh[32];
  const Group<WARP> grp;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int64_t r = grp.id; r < p.rows; r += grp.count) {  // uniform over the group
    const int64_t y = p.labels[r];
    if (y == p.ignore) {
      if (grp.tid == 0) logp[r] = lse[r] = Acc(0);
      continue;
    }
    const T* z = row_ptr(p, r);
    Soft<Acc> st{Acc(-INFINITY), Acc(0)};
    sweep<T, Acc, false>(z, nullptr, p.v, grp.tid, grp.size,
                         [&](int64_t, const auto& zv) { accumulate(st, zv); });
    warp_merge(st);
    if constexpr (!WARP) {
      if (lane == 0) sh[warp] = st;
      __syncthreads();
      if (warp == 0) {
        st = lane < nwarps ? sh[lane] : Soft<Acc>{Acc(-INFINITY), Acc(0)};
        warp_merge(st);
      }
    }
    if (grp.tid == 0) {  // lane 0 of the group holds the row total
      const Acc log_s = lg(st.s);
      logp[r] = (to_acc(z[y]) - st.m) - log_s;  // centred: no rounding against a large lse
      lse[r] = st.m + log_s;
    }
    if constexpr (!WARP) __syncthreads();  // sh is rewritten by the next row
  }
}

// Backward: g_j = w ([j == y] - e^{z_j - lse}); zeros for ignored rows and w == 0. No reduction.
template <class T, class Acc, bool WARP>
__global__ void __launch_bounds__(kMaxThreads) bwd_kernel(const Params<T, Acc> p, const Acc* lse,
                                                          const Acc* w, T* grad, int64_t ldg) {
  const Group<WARP> grp;
  for (int64_t r = grp.id; r < p.rows; r += grp.count) {
    const int64_t y = p.labels[r];
    T* g = grad + r * ldg;
    const Acc wr = y == p.ignore ? Acc(0) : w[r];
    if (wr == Acc(0)) {
      fill_zero(g, p.v, grp.tid, grp.size);
      continue;
    }
    const Acc l = lse[r];
    sweep<T, Acc, true>(row_ptr(p, r), g, p.v, grp.tid, grp.size,
                        [&](int64_t j, const auto& zv, auto& gv) {
                          constexpr int N = std::extent_v<std::remove_reference_t<decltype(zv)>>;
#pragma unroll
                          for (int e = 0; e < N; ++e) {
                            const Acc pe = ex(zv[e] - l);
                            gv[e] = j + e == y ? wr * (Acc(1) - pe) : -wr * pe;
                          }
                        });
  }
}

struct LaunchShape {
  bool warp;
  int threads;
  unsigned grid;
};

template <class T>
LaunchShape shape_for(int64_t rows, int64_t v) {
  constexpr int W = 16 / sizeof(T);
  if (v <= kWarpMaxV) {
    const int64_t per_block = kWarpThreads / 32;
    const int64_t blocks = (rows + per_block - 1) / per_block;
    return {true, kWarpThreads, static_cast<unsigned>(blocks < INT_MAX ? blocks : INT_MAX)};
  }
  // ~2 packs per thread at least; rows beyond the grid are taken grid-stride
  int threads = kMaxThreads;
  while (threads > 64 && static_cast<int64_t>(threads) * W * 2 > v) threads /= 2;
  return {false, threads, static_cast<unsigned>(rows < INT_MAX ? rows : INT_MAX)};
}

template <class T, class Acc>
Params<T, Acc> params(const TokenRowsArgs& a) {
  return {a.t, a.v, static_cast<const T*>(a.logits), a.stride_b, a.stride_t, a.labels,
          a.ignore_index, a.b * a.t};
}

template <class T, class Acc>
const char* launch_fwd(Types<T, Acc>, const TokenRowsArgs& a, void* logp, void* lse,
                       cudaStream_t stream) {
  const Params<T, Acc> p = params<T, Acc>(a);
  const LaunchShape ls = shape_for<T>(p.rows, a.v);
  Acc* lp = static_cast<Acc*>(logp);
  Acc* l = static_cast<Acc*>(lse);
  if (ls.warp) fwd_kernel<T, Acc, true><<<ls.grid, ls.threads, 0, stream>>>(p, lp, l);
  else fwd_kernel<T, Acc, false><<<ls.grid, ls.threads, 0, stream>>>(p, lp, l);
  return launch_error();
}

template <class T, class Acc>
const char* launch_bwd(Types<T, Acc>, const TokenRowsArgs& a, const void* lse, const void* w,
                       void* grad, int64_t grad_ld, cudaStream_t stream) {
  const Params<T, Acc> p = params<T, Acc>(a);
  const LaunchShape ls = shape_for<T>(p.rows, a.v);
  const Acc* l = static_cast<const Acc*>(lse);
  const Acc* wt = static_cast<const Acc*>(w);
  T* g = static_cast<T*>(grad);
  if (ls.warp) bwd_kernel<T, Acc, true><<<ls.grid, ls.threads, 0, stream>>>(p, l, wt, g, grad_ld);
  else bwd_kernel<T, Acc, false><<<ls.grid, ls.threads, 0, stream>>>(p, l, wt, g, grad_ld);
  return launch_error();
}

}  // namespace

const char* token_logprobs_fwd_cuda(DType dtype, const TokenRowsArgs& a, void* logp, void* lse,
                                    void* stream) {
  if (a.b * a.t == 0) return nullptr;
  const auto s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, "token_logprobs_fwd_cuda: unsupported dtype",
                        [&](auto types) { return launch_fwd(types, a, logp, lse, s); });
}

const char* token_logprobs_bwd_cuda(DType dtype, const TokenRowsArgs& a, const void* lse,
                                    const void* w, void* grad, int64_t grad_ld, void* stream) {
  if (a.b * a.t == 0) return nullptr;
  const auto s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, "token_logprobs_bwd_cuda: unsupported dtype",
                        [&](auto types) { return launch_bwd(types, a, lse, w, grad, grad_ld, s); });
}

}  // namespace rk
