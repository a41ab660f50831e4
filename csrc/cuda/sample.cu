// CUDA sampler (contract: ../sample.h). One thread block per row, no sorting:
//
//   pass 1      max and the NaN / +inf check (block reductions);
//   top-k       radix select on the keys of e = exp((z - m) / T) (non-negative floats order like
//               their uint32 bit patterns, and e <= 1 keeps keys below 2^30): 4 passes of 8/8/8/6
//               bits, each a 256-bin shared-memory histogram of counts, keep the largest key K with
//               #{key >= K} >= k, i.e. the k-th largest e;
//   top-p       one pass for S_k (the mass over key >= K_k), then the same radix search over masses
//               restricted to key >= K_k: the largest K with mass{key >= K} >= top_p * S_k. Masses
//               are 2^40 fixed point in uint64 atomics, so the result is exact and deterministic
//               (float atomics would depend on the scheduling order);
//   min-p       the key of min_p (the max has e = 1);
//   draws       tile sums (1024 tokens per tile, one warp per tile, fixed order) and their prefix
//               (one thread); then one warp per draw: find the tile of u * Z, warp-scan it in
//               chunks of 32, take the first kept token with positive mass whose prefix exceeds
//               u * Z. u comes from Philox (../philox.h) keyed by (seed, row, draw).
// Every reduction has a fixed association independent of blockDim, so the result depends only on
// the inputs and the seed. The row is re-read (and e recomputed) by every pass instead of being
// staged in shared memory: 128k-token rows do not fit, and the re-reads mostly hit L2.
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "philox.h"
#include "sample.h"

namespace rk {
namespace {

using namespace cu;

constexpr int kMaxThreads = 512;
constexpr int kTile = 1024;                       // tokens per prefix-sum tile
constexpr double kFix = 1099511627776.0;          // 2^40: fixed-point scale of e in [0, 1]
constexpr unsigned kFull = 0xffffffffu;
constexpr int64_t kMaxTiles = 8191;  // 32 KiB of dynamic shared memory: V <= 8.4M

template <class Acc>
__device__ __forceinline__ Acc neg_inf() {
  return -static_cast<Acc>(INFINITY);
}

// The row and its scaled probabilities e_j in [0, 1] (float), recomputed identically by every pass.
template <class T, class Acc>
struct RowCtx {
  const T* z;
  int64_t v;
  Acc m, inv_t;
  __device__ __forceinline__ float e(int64_t j) const {
    const Acc x = to_acc(z[j]);
    return x == neg_inf<Acc>() ? 0.0f : static_cast<float>(ex((x - m) * inv_t));
  }
};

__device__ __forceinline__ uint32_t key_of(float e) { return __float_as_uint(e); }
__device__ __forceinline__ unsigned long long fixed_of(float e) {
  return static_cast<unsigned long long>(static_cast<double>(e) * kFix);
}

struct MaxOp {
  template <class X>
  __device__ X operator()(X a, X b) const {
    return a > b ? a : b;
  }
};
struct MinOp {
  template <class X>
  __device__ X operator()(X a, X b) const {
    return a < b ? a : b;
  }
};
struct SumOp {
  template <class X>
  __device__ X operator()(X a, X b) const {
    return a + b;
  }
};

template <class X, class Op>
__device__ __forceinline__ X warp_all_reduce(X x, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = op(x, __shfl_xor_sync(kFull, x, o));
  return x;
}

// Block-wide reduction; every thread gets the result. scratch: 32 entries of X in shared memory.
template <class X, class Op>
__device__ X block_all_reduce(X x, Op op, X* scratch) {
  x = warp_all_reduce(x, op);
  __syncthreads();  // scratch may still be read by a previous call
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = x;
  __syncthreads();
  X r = scratch[0];
  const int nw = blockDim.x >> 5;
  for (int w = 1; w < nw; ++w) r = op(r, scratch[w]);
  return r;
}

template <class X>
__device__ __forceinline__ X warp_inclusive_scan(X x) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const X y = __shfl_up_sync(kFull, x, o);
    if (lane >= o) x += y;
  }
  return x;
}

// Largest key K with W(K) >= target, W(K) = sum over tokens with key >= max(K, key_min) of the
// weight (1, or e in 2^40 fixed point when MASS). Digits of 8, 8, 8, 6 bits from bit 29 down.
template <bool MASS, class T, class Acc>
__device__ uint32_t radix_search(const RowCtx<T, Acc>& c, uint32_t key_min, double target,
                                 unsigned long long* hist) {
  uint32_t prefix = 0;
  unsigned long long above = 0;  // weight of the keys above the current prefix range
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = pass < 3 ? 22 - 8 * pass : 0;
    const int width = pass < 3 ? 8 : 6;
    const int hi = shift + width;  // bits >= hi are already fixed in prefix
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < c.v; j += blockDim.x) {
      const float e = c.e(j);
      const uint32_t key = key_of(e);
      if (key >= key_min && (key >> hi) == (prefix >> hi)) {
        const unsigned long long w = MASS ? fixed_of(e) : 1ull;
        if (w) atomicAdd(&hist[(key >> shift) & 255u], w);
      }
    }
    __syncthreads();
    // every thread scans the histogram the same way (no broadcast needed)
    unsigned long long acc = above;
    int sel = 0;
    for (int d = (1 << width) - 1; d >= 0; --d) {
      if (static_cast<double>(acc + hist[d]) >= target) {
        sel = d;
        break;
      }
      acc += hist[d];
    }
    above = acc;
    prefix |= static_cast<uint32_t>(sel) << shift;
    __syncthreads();  // before the next pass clears hist
  }
  return prefix;
}

template <class T, class Acc>
__global__ void __launch_bounds__(kMaxThreads) sample_kernel(const SampleArgs a) {
  extern __shared__ float carry[];  // [ntiles + 1] prefix mass before each tile
  __shared__ Acc s_acc[32];
  __shared__ long long s_ll[32];
  __shared__ unsigned long long s_ull[32];
  __shared__ unsigned long long hist[256];

  const int64_t r = blockIdx.x;
  const int64_t V = a.v, S = a.num_samples;
  const T* z = static_cast<const T*>(a.logits) + r * a.logits_ld;
  int64_t* ids = a.ids + r * S;
  Acc* lp = a.logprobs ? static_cast<Acc*>(a.logprobs) + r * S : nullptr;
  const int tid = threadIdx.x;

  // pass 1: max, NaN / +inf
  Acc m = neg_inf<Acc>();
  int bad = 0;
  for (int64_t j = tid; j < V; j += blockDim.x) {
    const Acc x = to_acc(z[j]);
    m = x > m ? x : m;
    bad |= (x != x) | (x == -neg_inf<Acc>());
  }
  bad = __syncthreads_or(bad);
  m = block_all_reduce(m, MaxOp(), s_acc);
  if (bad || m == neg_inf<Acc>()) {  // block-uniform
    for (int64_t d = tid; d < S; d += blockDim.x) {
      ids[d] = bad ? -1 : -2;
      if (lp) lp[d] = static_cast<Acc>(NAN);
    }
    return;
  }
  const Acc temp = a.temperature ? static_cast<Acc>(static_cast<const float*>(a.temperature)[r])
                                 : static_cast<Acc>(a.temperature_s);
  if (temp == Acc(0)) {  // greedy: the lowest index of the maximum
    long long am = LLONG_MAX;
    for (int64_t j = tid; j < V; j += blockDim.x) {
      if (to_acc(z[j]) == m) {
        am = j;
        break;
      }
    }
    am = block_all_reduce(am, MinOp(), s_ll);
    for (int64_t d = tid; d < S; d += blockDim.x) {
      ids[d] = am;
      if (lp) lp[d] = Acc(0);
    }
    return;
  }
  const Acc big = sizeof(Acc) == 4 ? static_cast<Acc>(FLT_MAX) : static_cast<Acc>(DBL_MAX);
  const Acc inv_t = Acc(1) / temp < big ? Acc(1) / temp : big;
  const RowCtx<T, Acc> c{z, V, m, inv_t};

  // top-k
  const int64_t k = a.top_k ? a.top_k[r] : a.top_k_s;
  uint32_t key_k = 0;
  if (k > 0 && k < V) key_k = radix_search<false>(c, 0u, static_cast<double>(k), hist);
  // top-p over the top-k survivors
  const float top_p =
      a.top_p ? static_cast<const float*>(a.top_p)[r] : static_cast<float>(a.top_p_s);
  uint32_t key_p = 0;
  if (top_p < 1.0f) {
    unsigned long long sk = 0;
    for (int64_t j = tid; j < V; j += blockDim.x) {
      const float e = c.e(j);
      if (key_of(e) >= key_k) sk += fixed_of(e);
    }
    sk = block_all_reduce(sk, SumOp(), s_ull);
    key_p = radix_search<true>(c, key_k, static_cast<double>(top_p) * static_cast<double>(sk),
                               hist);
  }
  // min-p
  float min_p = a.min_p ? static_cast<const float*>(a.min_p)[r] : static_cast<float>(a.min_p_s);
  min_p = min_p > 0.0f ? min_p : 0.0f;  // -0.0f has the largest key
  uint32_t thr = key_k > key_p ? key_k : key_p;
  thr = thr > key_of(min_p) ? thr : key_of(min_p);

  // tile sums (one warp per tile, lanes strided, butterfly reduction) and the last kept token
  const int lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  const int64_t ntiles = (V + kTile - 1) / kTile;
  long long last = -1;
  for (int64_t t = warp; t < ntiles; t += nwarps) {
    float s = 0.0f;
    for (int i = 0; i < kTile / 32; ++i) {
      const int64_t j = t * kTile + i * 32 + lane;
      if (j < V) {
        const float e = c.e(j);
        if (key_of(e) >= thr && e > 0.0f) {
          s += e;
          last = j;
        }
      }
    }
    s = warp_all_reduce(s, SumOp());
    if (lane == 0) carry[t + 1] = s;
  }
  last = block_all_reduce(last, MaxOp(), s_ll);  // includes a barrier after the carry writes
  if (tid == 0) {
    carry[0] = 0.0f;
    for (int64_t t = 0; t < ntiles; ++t) carry[t + 1] += carry[t];
  }
  __syncthreads();
  const float z_tot = carry[ntiles];
  const Acc log_z = lg(static_cast<Acc>(z_tot));

  // draws: one warp per draw
  for (int64_t d = warp; d < S; d += nwarps) {
    const float u = bits_to_unit(
        sample_bits(a.seed, static_cast<uint32_t>(r), static_cast<uint32_t>(d)));
    const float target = u * z_tot;
    // first tile whose end prefix exceeds the target (carry is non-decreasing)
    int64_t lo = 0, hi = ntiles;  // answer in [lo, hi]; hi = ntiles means none
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (carry[mid + 1] > target) hi = mid;
      else lo = mid + 1;
    }
    long long pick = last;
    if (lo < ntiles) {
      float run = carry[lo];
      long long last_in_tile = -1;
      bool found = false;
      for (int i = 0; i < kTile / 32 && !found; ++i) {
        const int64_t j = lo * kTile + i * 32 + lane;
        float w = 0.0f;
        if (j < V) {
          const float e = c.e(j);
          w = key_of(e) >= thr ? e : 0.0f;
        }
        const float incl = warp_inclusive_scan(w) + run;
        const unsigned hit = __ballot_sync(kFull, incl > target && w > 0.0f);
        const unsigned pos = __ballot_sync(kFull, w > 0.0f);
        if (hit) {
          pick = lo * kTile + i * 32 + (__ffs(hit) - 1);
          found = true;
        } else if (pos) {
          last_in_tile = lo * kTile + i * 32 + (31 - __clz(pos));
        }
        run = __shfl_sync(kFull, incl, 31);
      }
      if (!found && last_in_tile >= 0) pick = last_in_tile;  // rounding ran out inside the tile
    }
    if (lane == 0) {
      ids[d] = pick;
      if (lp) lp[d] = (to_acc(z[pick]) - m) * inv_t - log_z;
    }
  }
}

template <class T, class Acc>
const char* launch(Types<T, Acc>, const SampleArgs& a, cudaStream_t stream) {
  const int64_t ntiles = (a.v + kTile - 1) / kTile;
  if (ntiles > kMaxTiles) return "vocabulary too large for the CUDA sampler";
  if (a.b > INT_MAX) return "too many rows for the CUDA sampler";
  if (a.num_samples > static_cast<int64_t>(UINT32_MAX)) return "num_samples too large";
  int threads = kMaxThreads;
  while (threads > 64 && static_cast<int64_t>(threads) * 4 > a.v) threads /= 2;
  const size_t smem = static_cast<size_t>(ntiles + 1) * sizeof(float);
  sample_kernel<T, Acc><<<static_cast<unsigned>(a.b), threads, smem, stream>>>(a);
  return launch_error();
}

}  // namespace

const char* sample_rows_cuda(DType dtype, const SampleArgs& a, void* stream) {
  if (a.b == 0) return nullptr;
  const auto s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, "sample_rows_cuda: unsupported dtype",
                        [&](auto types) { return launch(types, a, s); });
}

}  // namespace rk
