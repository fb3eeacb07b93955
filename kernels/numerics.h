// Scalar building blocks of the fastvae CPU kernels, written so that GCC and
// Clang vectorize the loops that call them (-O3, no -ffast-math):
//   - storage types: bf16 and fp16 are converted with integer bit tricks
//     (round to nearest even, NaN kept NaN) instead of libcalls;
//   - float math: exp, expm1, exp of non-positive arguments, log1p on [0, 1], log, cos
//     and sin of 2*pi*u as branch-free polynomials (selects, not branches), accurate to
//     a few float ulps; libm's scalar calls would stop vectorization and make the
//     kernels compute-bound;
//   - double math uses libm (std::exp, ...): float64 is the accuracy path.
// The Philox noise that uses the log, cos and sin here lives in noise.h.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__)
#define FV_INLINE inline __attribute__((always_inline))
#else
#define FV_INLINE inline
#endif

namespace fastvae {

// 16-bit storage types: only the bits; all math happens in float.
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

// The type math runs in for a storage type: double for double, float otherwise.
template <class T> struct Compute { using type = float; };
template <> struct Compute<double> { using type = double; };

FV_INLINE float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
FV_INLINE uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// ---------------------------------------------------------------- conversions
FV_INLINE float widen(float v) { return v; }
FV_INLINE double widen(double v) { return v; }
FV_INLINE float widen(bf16_t v) { return bits_to_float(uint32_t(v.bits) << 16); }

// fp16 -> fp32, exact. Normal halves rebias the exponent (15 -> 127);
// subnormals are m * 2^-24 computed through an exact int -> float conversion
// (no float subnormal arithmetic, so a denormals-are-zero FPU mode is harmless).
FV_INLINE float widen(f16_t v) {
    const uint32_t h = v.bits;
    const uint32_t sign = (h & 0x8000u) << 16;
    const uint32_t em = h & 0x7fffu;  // exponent and mantissa
    const uint32_t normal = (em << 13) + (112u << 23);
    const uint32_t special = (em << 13) | 0x7f800000u;  // inf, nan
    const uint32_t subnormal = float_to_bits(float(int32_t(em)) * 0x1p-24f);
    const uint32_t mag = em >= 0x7c00u ? special : (em >= 0x0400u ? normal : subnormal);
    return bits_to_float(sign | mag);
}

template <class T> FV_INLINE T narrow(typename Compute<T>::type v);
template <> FV_INLINE float narrow<float>(float v) { return v; }
template <> FV_INLINE double narrow<double>(double v) { return v; }

// fp32 -> bf16, round to nearest even; NaN -> the quiet NaN torch writes.
template <> FV_INLINE bf16_t narrow<bf16_t>(float v) {
    const uint32_t u = float_to_bits(v);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    return bf16_t{uint16_t(nan ? 0x7fc0u : rounded)};
}

// fp32 -> fp16, round to nearest even, overflow to inf, NaN -> quiet NaN.
// Half normals: drop 13 mantissa bits with a rounding add whose carry may
// ripple into the exponent (that is the correct result). Half subnormals: adding
// 0.5f makes the FPU round |v| to a multiple of 2^-24 (the ulp of floats in
// [0.5, 1)), and the integer m of that multiple is the subnormal encoding
// (m = 1024 is the smallest normal, also correct).
template <> FV_INLINE f16_t narrow<f16_t>(float v) {
    const uint32_t u = float_to_bits(v);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7fffffffu;
    const uint32_t rebased = a - (112u << 23);
    const uint32_t normal = (rebased + 0x0fffu + ((rebased >> 13) & 1u)) >> 13;
    const uint32_t subnormal = float_to_bits(std::fabs(v) + 0.5f) - 0x3f000000u;
    uint32_t mag = a >= 0x38800000u ? normal : subnormal;  // 2^-14: smallest half normal
    mag = a >= 0x477ff000u ? 0x7c00u : mag;                // >= 65520 rounds to inf
    mag = a > 0x7f800000u ? 0x7e00u : mag;
    return f16_t{uint16_t(sign | mag)};
}

// ---------------------------------------------------------------- float math
// exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln2 / 2 (Cody-Waite split
// of ln 2 so that n * LN2_HI is exact). Returns q = exp(r) - 1 and half = 2^(n-1);
// the callers scale by half and then by 2 so that n = 128 (x near 88.7) does not
// overflow the exponent field. Valid for x in [EXP_LO, EXP_HI]; callers select
// the results outside.
constexpr float EXP_LO = -86.6f;  // 2^(n-1) >= 2^-126: stays a normal float
constexpr float EXP_HI = 88.72283f;  // ln(FLT_MAX)
constexpr float LOG2E = 1.44269504088896341f;
constexpr float LN2_HI = 0.693145751953125f;
constexpr float LN2_LO = 1.42860682030941723212e-6f;

FV_INLINE float exp_core(float x, float& half) {
    const float shifter = 0x1.8p23f;  // adding it rounds to an integer held in the low mantissa bits
    const float xc = (x >= EXP_LO) ? ((x <= EXP_HI) ? x : EXP_HI) : EXP_LO;  // NaN -> EXP_LO
    const float t = xc * LOG2E + shifter;
    const float n = t - shifter;
    const float r = (xc - n * LN2_HI) - n * LN2_LO;
    const uint32_t n_int = float_to_bits(t) - float_to_bits(shifter);  // two's complement n
    half = bits_to_float((n_int + 126u) << 23);
    // Taylor series of exp(r) - 1 to r^7: truncation < 6e-9 on |r| <= 0.347.
    return r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120
           + r * (1.0f / 720 + r * (1.0f / 5040)))))));
}

// exp(x) and expm1(x) from exp_core's q and half, with the values outside
// [EXP_LO, EXP_HI] and NaN selected in. expm1 has no cancellation of exp(x) - 1 near 0
// (where half = 0.5, the result is q).
FV_INLINE float exp_from_core(float x, float q, float half) {
    float e = 2.0f * (half * q + half);
    e = x > EXP_HI ? INFINITY : e;
    e = x < EXP_LO ? 0.0f : e;  // true value < 2.4e-38: below anything the losses resolve
    return x != x ? x : e;
}

FV_INLINE float expm1_from_core(float x, float q, float half) {
    float e = 2.0f * (half * q + (half - 0.5f));
    e = x > EXP_HI ? INFINITY : e;
    e = x < EXP_LO ? -1.0f : e;
    return x != x ? x : e;
}

FV_INLINE float fv_exp(float x) {
    float half;
    const float q = exp_core(x, half);
    return exp_from_core(x, q, half);
}

FV_INLINE float fv_expm1(float x) {
    float half;
    const float q = exp_core(x, half);
    return expm1_from_core(x, q, half);
}

// exp(x) for x <= 0 (or NaN): the softplus tail and sigmoid take exp(-|l|). Knowing the
// sign drops fv_exp's overflow clamp and selects, and the minimax polynomial (relative
// error 3.1e-9 on |r| <= ln2 / 2, fitted by iteratively reweighted least squares) is
// one degree shorter than the Taylor series: together with fv_log1p_unit's polynomial
// and the 16-lane row sum, the Bernoulli forward with gradient went from 1.11 to 0.63
// ns per element on one Zen 4 core (2048 x 784, median of 40 interleaved runs). Below
// EXP_LO the result is 0 (true value < 2.4e-38); NaN stays NaN through the clamp.
FV_INLINE float fv_exp_nonpos(float x) {
    const float shifter = 0x1.8p23f;
    const float xc = x < EXP_LO ? EXP_LO : x;
    const float t = xc * LOG2E + shifter;
    const float n = t - shifter;
    const float r = (xc - n * LN2_HI) - n * LN2_LO;
    const uint32_t n_int = float_to_bits(t) - float_to_bits(shifter);  // n in [-125, 0]
    const float scale = bits_to_float((n_int + 127u) << 23);
    const float q = 0.49999994f + r * (0.166665211f + r * (0.041668389f + r * (0.00836871006f
                    + r * 0.00138146128f)));
    const float e = (1.0f + (r + (r * r) * q)) * scale;
    return x < EXP_LO ? 0.0f : e;
}

// exp(v / 2) (the posterior's std) and expm1(v) (the KL's exp(v) - 1) from one range
// reduction: expm1(v) = h (h + 2) with h = expm1(v / 2). Both factors carry h's relative
// accuracy, so nothing cancels near v = 0; for v -> -inf, h -> -1 and expm1 -> -1; past
// v = 2 * EXP_HI both are inf, and h (h + 2) overflows to inf where expm1(v) does.
FV_INLINE void fv_exp_half_expm1(float v, float& exp_half, float& expm1_v) {
    float half;
    const float x = 0.5f * v;
    const float q = exp_core(x, half);
    exp_half = exp_from_core(x, q, half);
    const float h = expm1_from_core(x, q, half);
    expm1_v = h * (h + 2.0f);
}

// 2 * atanh(s) / (2 s) - 1 = s^2/3 + s^4/5 + ...: log1p(f) = 2 atanh(f / (2 + f)).
// Truncated after s^12/13; the error is below 2e-9 relative for |s| <= 1/3.
FV_INLINE float atanh_tail(float s2) {
    return s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9
           + s2 * (1.0f / 11 + s2 * (1.0f / 13))))));
}

// log1p(y) for y in [0, 1] (the softplus tail log1p(exp(-|l|))) as y * p(y), p a
// degree-8 minimax polynomial (relative error 3e-8; 2.1e-7 evaluated in float): no
// division, and relative accuracy down to y -> 0 since y carries the leading term.
FV_INLINE float fv_log1p_unit(float y) {
    return y * (0.99999994f + y * (-0.499994934f + y * (0.333190978f + y * (-0.248429805f
           + y * (0.191060007f + y * (-0.136632323f + y * (0.078225784f + y * (-0.0295051374f
           + y * 0.00523266895f))))))));
}

// ln(u) for a positive normal float u: u = 2^k * m with m in [sqrt(1/2), sqrt(2)),
// found by subtracting the bits of sqrt(1/2); ln(m) = log1p(m - 1), m - 1 exact.
FV_INLINE float fv_log(float u) {
    const uint32_t bits = float_to_bits(u);
    const int32_t k = int32_t(bits - 0x3f3504f3u) >> 23;
    const float m = bits_to_float(bits - (uint32_t(k) << 23));
    const float f = m - 1.0f;
    const float s = f / (2.0f + f);  // |s| <= 0.172
    const float two_s = 2.0f * s;
    const float kf = float(k);
    return kf * LN2_HI + (kf * LN2_LO + (two_s + two_s * atanh_tail(s * s)));
}

// sin(2*pi*b) for |b| <= 1/4, Taylor series in b to b^15 (coefficients in double,
// rounded once): truncation < 1e-10.
FV_INLINE float sin_2pi(float b) {
    constexpr double w = 6.283185307179586476925;
    constexpr float c1 = float(w);
    constexpr float c3 = float(-w * w * w / 6);
    constexpr float c5 = float(w * w * w * w * w / 120);
    constexpr float c7 = float(-w * w * w * w * w * w * w / 5040);
    constexpr float c9 = float(w * w * w * w * w * w * w * w * w / 362880);
    constexpr float c11 = float(-w * w * w * w * w * w * w * w * w * w * w / 39916800);
    constexpr float c13 = float(w * w * w * w * w * w * w * w * w * w * w * w * w / 6227020800.0);
    constexpr float c15 = float(-w * w * w * w * w * w * w * w * w * w * w * w * w * w * w
                                / 1307674368000.0);
    const float b2 = b * b;
    return b * (c1 + b2 * (c3 + b2 * (c5 + b2 * (c7 + b2 * (c9 + b2 * (c11 + b2 * (c13 + b2 * c15)))))));
}

// cos(2*pi*u) for u in [0, 1]: cos is even and 1-periodic in u, so with
// v = min(u, 1 - u) in [0, 1/2], cos(2 pi v) = sin(2 pi (1/4 - v)); both steps
// are exact in float for the u the noise produces (multiples of 2^-25).
FV_INLINE float fv_cos_2pi_unit(float u) {
    const float v = u < 1.0f - u ? u : 1.0f - u;
    return sin_2pi(0.25f - v);
}

// sin(2*pi*u) for u in [0, 1]: sin(2 pi u) = -sin(2 pi (u - 1/2)), and for w in
// [0, 1/2], sin(2 pi w) = sin(2 pi min(w, 1/2 - w)); u - 1/2 and 1/2 - w are exact
// (Sterbenz), so the polynomial sees the argument without rounding.
FV_INLINE float fv_sin_2pi_unit(float u) {
    const float w = u < 0.5f ? u : u - 0.5f;
    const float b = w < 0.25f ? w : 0.5f - w;
    const float s = sin_2pi(b);
    return u < 0.5f ? s : -s;
}

// exp(x) - 1 - x, the KL's exp(logvar) - 1 - logvar, which is about x^2 / 2 near 0: there
// expm1(x) - x would cancel to noise (at x = 1e-4, 0.2% in float32), so below |x| = 1/2 its
// Taylor series x^2 (1/2 + x/6 + ...) is used (to x^10: truncation < 3e-9 relative), and
// above, expm1(x) - x, which loses at most a few ulps. expm1_x is expm1(x), already computed.
FV_INLINE float fv_expm1_minus_x(float x, float expm1_x) {
    const float series = x * x * (0.5f + x * (1.0f / 6 + x * (1.0f / 24 + x * (1.0f / 120 + x * (1.0f / 720
                         + x * (1.0f / 5040 + x * (1.0f / 40320 + x * (1.0f / 362880 + x * (1.0f / 3628800)))))))));
    return std::fabs(x) < 0.5f ? series : expm1_x - x;
}

// The same in double: the series to x^18 (truncation < 1e-20 relative below |x| = 1/2).
constexpr double inverse_factorial(int k) { return k <= 1 ? 1.0 : inverse_factorial(k - 1) / k; }

FV_INLINE double fv_expm1_minus_x(double x, double expm1_x) {
    double p = inverse_factorial(18);
    for (int k = 17; k >= 2; --k) p = inverse_factorial(k) + x * p;  // constants folded at compile time
    return std::fabs(x) < 0.5 ? x * x * p : expm1_x - x;
}

// ---------------------------------------------------------------- math by compute type
FV_INLINE float exp_c(float x) { return fv_exp(x); }
FV_INLINE double exp_c(double x) { return std::exp(x); }
FV_INLINE float expm1_c(float x) { return fv_expm1(x); }
FV_INLINE double expm1_c(double x) { return std::expm1(x); }
FV_INLINE void exp_half_expm1_c(float v, float& exp_half, float& expm1_v) { fv_exp_half_expm1(v, exp_half, expm1_v); }
FV_INLINE void exp_half_expm1_c(double v, double& exp_half, double& expm1_v) {
    exp_half = std::exp(0.5 * v);
    expm1_v = std::expm1(v);
}
FV_INLINE float exp_nonpos_c(float x) { return fv_exp_nonpos(x); }
FV_INLINE double exp_nonpos_c(double x) { return std::exp(x); }
FV_INLINE float log1p_unit_c(float y) { return fv_log1p_unit(y); }
FV_INLINE double log1p_unit_c(double y) { return std::log1p(y); }
FV_INLINE float log_c(float u) { return fv_log(u); }  // u a positive normal float
FV_INLINE double log_c(double u) { return std::log(u); }

}  // namespace fastvae
