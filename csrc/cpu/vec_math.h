// Small scalar helpers the compiler can auto-vectorise (no libm calls in hot loops).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace rk {

// Cephes-style expf: range reduction by ln2 + degree-6 polynomial, ~1-2 ulp. Written branch-free so
// GCC vectorises the loops that call it (std::exp is a libm call and blocks vectorisation without
// -ffast-math, which we avoid because it breaks -inf/NaN handling). NaN in gives NaN out; x < -87.3
// (including -inf) gives 0; x > 88.7 (including +inf) saturates near FLT_MAX (the callers only pass
// x <= 0 or NaN).
inline float exp_f32(float x) {
  const float hi = 88.7f, lo = -87.3f;
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;  // NaN compares false both times and stays NaN
  // n = round(x / ln2) with the 1.5 * 2^23 trick: plain float adds, so every ISA vectorises it
  // (floor() needs SSE4.1, and an int round trip with a compare blocked AVX-512 vectorisation).
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float pow2;
  std::memcpy(&pow2, &bits, sizeof(pow2));
  float out = y * pow2;
  return x < lo ? 0.0f : out;
}

inline double exp_acc(double x) { return std::exp(x); }
inline float exp_acc(float x) { return exp_f32(x); }

// Storage <-> accumulation conversions for the four supported dtypes.
struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  _Float16 h;
};

inline float to_acc(float x) { return x; }
inline double to_acc(double x) { return x; }
inline float to_acc(bf16_t x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline float to_acc(f16_t x) { return static_cast<float>(x.h); }

template <typename T>
inline T from_acc(float x);
template <>
inline float from_acc<float>(float x) {
  return x;
}
template <>
inline bf16_t from_acc<bf16_t>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}
template <>
inline f16_t from_acc<f16_t>(float x) {
  return f16_t{static_cast<_Float16>(x)};
}
template <typename T>
inline T from_acc(double x) {
  return static_cast<T>(x);
}

}  // namespace rk
