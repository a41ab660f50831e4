// CPU sampler (contract: ../sample.h). One OpenMP task per row, no full sort:
//   pass 1  load + max + NaN/+inf check;  pass 2  e_j = exp((z_j - m) / T) into a row buffer;
//   top-k   the k-th largest e by std::nth_element on a copy (O(V));
//   top-p   quickselect by mass over the top-k survivors: a 3-way partition around a pivot tells
//           whether the mass strictly above the pivot is < top_p * S_k, and the search continues
//           below (pivot qualifies) or above it (expected O(n));
//   min-p   the threshold min_p (the max has e = 1);
//   draws   one pass in index order over the kept tokens, the num_samples targets u * Z visited in
//           increasing order (sorted), so the cost is O(V + S log S) per row.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "../philox.h"
#include "../sample.h"
#include "rows.h"
#include "vec_math.h"

namespace rk {
namespace {

template <typename P>
inline P param(const void* arr, P scalar, int64_t r) {
  return arr ? static_cast<const double*>(arr)[r] : scalar;
}

// The smallest value x in w[0, n) such that the mass of the values > x is < P (P > 0, so the
// largest value always qualifies). Expected O(n): each round keeps one side of the pivot.
template <typename Acc>
Acc top_p_threshold(Acc* w, int64_t n, double P, double above = 0.0) {
  // above: mass of the discarded values, all larger than every remaining one
  Acc best = std::numeric_limits<Acc>::infinity();
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const Acc a = w[lo], b = w[lo + (hi - lo) / 2], c = w[hi - 1];
    const Acc piv = std::max(std::min(a, b), std::min(std::max(a, b), c));  // median of three
    // Dutch-flag partition of [lo, hi): > piv | == piv | < piv, summing the > part
    int64_t gt = lo, i = lo, lt = hi;
    double mass_gt = 0.0;
    while (i < lt) {
      const Acc v = w[i];
      if (v > piv) {
        mass_gt += static_cast<double>(v);
        w[i] = w[gt];
        w[gt] = v;
        ++gt;
        ++i;
      } else if (v < piv) {
        --lt;
        w[i] = w[lt];
        w[lt] = v;
      } else {
        ++i;
      }
    }
    if (above + mass_gt < P) {  // piv qualifies: look for a smaller one among the < part
      best = piv;
      above += mass_gt + static_cast<double>(piv) * static_cast<double>(lt - gt);
      lo = lt;
    } else {  // too much mass above piv: the threshold is larger
      hi = gt;
    }
  }
  return best;
}

// Float rows: e in [0, 1] orders like its bit pattern, so one pass builds a 2048-bin histogram of
// counts and masses over bits >> 20 (exponent + 3 mantissa bits); top-k and top-p then only look
// inside the one bin that holds their threshold (nth_element / quickselect-by-mass on a few
// elements) instead of the whole row.
struct Hist {
  uint32_t cnt[2048];
  double mass[2048];
};

inline uint32_t bin_of(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u >> 20;
}

// Gathers the elements of bin b that are >= lo into w; returns their count.
inline int64_t gather_bin(const float* e, int64_t V, uint32_t b, float lo, float* w) {
  int64_t n = 0;
  for (int64_t j = 0; j < V; ++j) {
    const float v = e[j];
    w[n] = v;
    n += (bin_of(v) == b) & (v >= lo);
  }
  return n;
}

float float_thresholds(const float* e, int64_t V, int64_t k, double top_p, float* w, Hist& h) {
  std::memset(h.cnt, 0, sizeof(h.cnt));
  std::memset(h.mass, 0, sizeof(h.mass));
  for (int64_t j = 0; j < V; ++j) {
    const uint32_t b = bin_of(e[j]);
    h.cnt[b] += 1;
    h.mass[b] += static_cast<double>(e[j]);
  }
  // top-k: the bin of the k-th largest, then nth_element inside it
  float thr = 0.0f;
  int kb = -1;            // bin holding the top-k threshold (-1: no top-k)
  double kb_mass = 0.0;   // mass of that bin's survivors (>= thr)
  if (k > 0) {
    int64_t above = 0;
    kb = 2047;
    while (above + static_cast<int64_t>(h.cnt[kb]) < k) above += h.cnt[kb--];
    const int64_t n = gather_bin(e, V, static_cast<uint32_t>(kb), 0.0f, w);
    const int64_t rank = k - above - 1;
    std::nth_element(w, w + rank, w + n, std::greater<float>());
    thr = w[rank];
    for (int64_t i = 0; i < n; ++i) kb_mass += w[i] >= thr ? static_cast<double>(w[i]) : 0.0;
  }
  if (top_p >= 1.0) return thr;
  // survivors' mass per bin: full bins above kb, kb_mass in kb, nothing below
  auto bin_mass = [&](int b) { return b == kb ? kb_mass : (b > kb ? h.mass[b] : 0.0); };
  const int lo_bin = kb < 0 ? 0 : kb;
  double total = 0.0;
  for (int b = 2047; b >= lo_bin; --b) total += bin_mass(b);
  const double P = top_p * total;
  // the threshold's bin: the lowest bin with mass whose mass above is still < P
  double above = 0.0, above_sel = 0.0;
  int sel = 2047;
  for (int b = 2047; b >= lo_bin && above < P; --b) {
    const double mb = bin_mass(b);
    if (mb > 0.0) {
      sel = b;
      above_sel = above;
    }
    above += mb;
  }
  const int64_t n = gather_bin(e, V, static_cast<uint32_t>(sel), sel == kb ? thr : 0.0f, w);
  return std::max(thr, top_p_threshold(w, n, P, above_sel));
}

template <typename T, typename Acc>
void row(const SampleArgs& a, int64_t r, std::vector<Acc>& e, std::vector<Acc>& work,
         std::vector<std::pair<double, int64_t>>& targets, Hist& hist) {
  const int64_t V = a.v, S = a.num_samples;
  const T* z = static_cast<const T*>(a.logits) + r * a.logits_ld;
  int64_t* ids = a.ids + r * S;
  Acc* lp = a.logprobs ? static_cast<Acc*>(a.logprobs) + r * S : nullptr;
  constexpr Acc inf = std::numeric_limits<Acc>::infinity();
  Acc* eb = e.data();

  // pass 1: load, max, NaN / +inf
  Acc m = -inf;
  int bad = 0;
#pragma omp simd reduction(max : m) reduction(| : bad)
  for (int64_t j = 0; j < V; ++j) {
    const Acc x = to_acc(z[j]);
    eb[j] = x;
    m = x > m ? x : m;
    bad |= (x != x) | (x == inf);
  }
  if (bad || m == -inf) {
    std::fill(ids, ids + S, bad ? int64_t(-1) : int64_t(-2));
    if (lp) std::fill(lp, lp + S, std::numeric_limits<Acc>::quiet_NaN());
    return;
  }
  const double temp = param(a.temperature, a.temperature_s, r);
  if (temp == 0.0) {  // greedy: the lowest index of the maximum
    const int64_t am = std::find(eb, eb + V, m) - eb;
    std::fill(ids, ids + S, am);
    if (lp) std::fill(lp, lp + S, Acc(0));
    return;
  }
  // (z - m) * (1/T); 1/T clamped to the largest finite value so that the max gives 0, not NaN
  const Acc inv_t = static_cast<Acc>(std::min(1.0 / temp, double(std::numeric_limits<Acc>::max())));
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) eb[j] = exp_acc((eb[j] - m) * inv_t);

  const int64_t k = a.top_k ? a.top_k[r] : a.top_k_s;
  const bool use_k = k > 0 && k < V;
  const double top_p = param(a.top_p, a.top_p_s, r);
  Acc thr = 0;
  if constexpr (std::is_same_v<Acc, float>) {
    if (use_k || top_p < 1.0) thr = float_thresholds(eb, V, use_k ? k : 0, top_p, work.data(), hist);
  } else {
    if (use_k) {  // top-k: the k-th largest e
      std::copy(eb, eb + V, work.begin());
      std::nth_element(work.begin(), work.begin() + (k - 1), work.begin() + V,
                       std::greater<Acc>());
      thr = work[k - 1];
    }
    if (top_p < 1.0) {  // top-p over the survivors of top-k
      int64_t n = 0;
      double mass = 0.0;
      Acc* w = work.data();
      for (int64_t j = 0; j < V; ++j) {
        const Acc v = eb[j];
        if (v >= thr) {
          w[n++] = v;
          mass += static_cast<double>(v);
        }
      }
      thr = std::max(thr, top_p_threshold(w, n, top_p * mass));
    }
  }
  // min-p (max e = 1)
  thr = std::max(thr, static_cast<Acc>(param(a.min_p, a.min_p_s, r)));

  // total kept mass, last kept token with positive mass
  double Z = 0.0;
#pragma omp simd reduction(+ : Z)
  for (int64_t j = 0; j < V; ++j) Z += eb[j] >= thr ? static_cast<double>(eb[j]) : 0.0;
  int64_t last = V - 1;
  while (last > 0 && !(eb[last] >= thr && eb[last] > 0)) --last;
  const double log_z = std::log(Z);
  const auto lp_of = [&](int64_t j) {
    return static_cast<Acc>((to_acc(z[j]) - m) * inv_t - static_cast<Acc>(log_z));
  };
  const uint32_t row32 = static_cast<uint32_t>(r);
  if (S == 1) {
    const double t = static_cast<double>(bits_to_unit(sample_bits(a.seed, row32, 0))) * Z;
    // blocks of 64: a vectorised block sum skips the blocks that end below the target
    double cum = 0.0;
    int64_t pick = last;
    bool done = false;
    for (int64_t j0 = 0; j0 < V && !done; j0 += 64) {
      const int64_t j1 = std::min(V, j0 + 64);
      double bs = 0.0;
#pragma omp simd reduction(+ : bs)
      for (int64_t j = j0; j < j1; ++j) bs += eb[j] >= thr ? static_cast<double>(eb[j]) : 0.0;
      if (cum + bs <= t) {
        cum += bs;
        continue;
      }
      for (int64_t j = j0; j < j1; ++j) {
        const Acc v = eb[j];
        if (v >= thr) {
          cum += static_cast<double>(v);
          if (cum > t && v > 0) {
            pick = j;
            done = true;
            break;
          }
        }
      }
    }
    ids[0] = pick;
    if (lp) lp[0] = lp_of(pick);
    return;
  }
  targets.resize(static_cast<size_t>(S));
  for (int64_t d = 0; d < S; ++d) {
    const uint32_t bits = sample_bits(a.seed, row32, static_cast<uint32_t>(d));
    targets[d] = {static_cast<double>(bits_to_unit(bits)) * Z, d};
  }
  std::sort(targets.begin(), targets.end());
  double cum = 0.0;
  int64_t next = 0;
  for (int64_t j = 0; j < V && next < S; ++j) {
    const Acc v = eb[j];
    if (v >= thr && v > 0) {
      cum += static_cast<double>(v);
      while (next < S && targets[next].first < cum) ids[targets[next++].second] = j;
    }
  }
  for (; next < S; ++next) ids[targets[next].second] = last;  // rounding ran out of mass
  if (lp) {
    for (int64_t d = 0; d < S; ++d) lp[d] = lp_of(ids[d]);
  }
}

// Per-thread buffers of row(), made once per OpenMP thread.
template <typename Acc>
struct Scratch {
  explicit Scratch(int64_t v) : e(static_cast<size_t>(v)), work(static_cast<size_t>(v)) {}
  std::vector<Acc> e, work;
  std::vector<std::pair<double, int64_t>> targets;
  Hist hist;
};

template <typename T, typename Acc>
void rows(Types<T, Acc>, const SampleArgs& a) {
  parallel_rows(
      a.b, a.num_threads, [&] { return Scratch<Acc>(a.v); },
      [&](int64_t r, Scratch<Acc>& s) { row<T, Acc>(a, r, s.e, s.work, s.targets, s.hist); });
}

}  // namespace

void sample_rows_cpu(DType dtype, const SampleArgs& a) {
  dispatch_dtype(dtype, [&](auto types) { rows(types, a); });
}

}  // namespace rk
