// Counter-based RNG shared by the C++ and CUDA samplers: Philox4x32-10 (Salmon et al., SC'11), the
// exact generator of Triton's tl.randint4x(seed, offset): counter (c0, c1, c2, c3) = (offset_lo,
// offset_hi, 0, 0), key (k0, k1) = (seed_lo, seed_hi). The sampler uses offset = (row << 32) | draw,
// so draw d of row r gets the same 32 bits on every backend, whatever the launch shape.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define RK_HD __host__ __device__ __forceinline__
#else
#define RK_HD inline
#endif

namespace rk {

RK_HD uint32_t mulhi_u32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Ten rounds in place on the counter c with key (k0, k1); c[0] is Triton's tl.randint.
RK_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMulA = 0xD2511F53u, kMulB = 0xCD9E8D57u;
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < 10; ++i) {
    const uint32_t a0 = c[0], a2 = c[2];
    c[0] = mulhi_u32(kMulB, a2) ^ c[1] ^ k0;
    c[2] = mulhi_u32(kMulA, a0) ^ c[3] ^ k1;
    c[1] = kMulB * a2;
    c[3] = kMulA * a0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
}

// The 32 random bits of draw `draw` of row `row` under `seed`.
RK_HD uint32_t sample_bits(uint64_t seed, uint32_t row, uint32_t draw) {
  uint32_t c[4] = {draw, row, 0u, 0u};
  philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return c[0];
}

// Uniform in [0, 1) with 24 random bits (exact in float).
RK_HD float bits_to_unit(uint32_t x) { return static_cast<float>(x >> 8) * (1.0f / 16777216.0f); }

}  // namespace rk
