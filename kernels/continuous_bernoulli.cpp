// Continuous Bernoulli log-likelihood from logits, with its gradient in the same pass.
// fastvae/ops/continuous_bernoulli/reference.py derives the two branches; with a = |l|,
// e = exp(-a) and h(l) = -log(sinh(l/2) / (l/2)):
//   log p    = x l - max(l, 0) + log(a / (1 - e))                        a >= 1
//            = (x - 1/2) l + h(l),  h a series in l^2                     a < 1
//   dlogp/dl = x - [l > 0] + sign(l) ((1 - e) - a e) / (a (1 - e))        a >= 1
//            = x - 1/2 + h'(l)                                            a < 1
// Both branches are computed for every element and one is selected (branch-free, so the
// loop vectorizes), each on an argument patched where it is unused: no lane divides by
// zero or overflows. The gradient is written times weight (see bernoulli.cpp). A target
// outside [0, 1] makes its element NaN, value and gradient. Logits row b is scored
// against target row b % target_rows (a row-periodic target). The (logits, target) storage
// pairs are those of common.LIKELIHOOD_DTYPE_PAIRS.
#include <limits>

#include "fastvae_native.h"
#include "numerics.h"
#include "rows.h"

namespace fastvae {
namespace {

// h(l) / l^2 and h'(l) / l for p = l^2 < 1, c_k = -B_2k / (2k (2k)!) (reference.H_SERIES).
// Float keeps five terms (truncation below 1e-8 relative at |l| = 1), double eleven.
FV_INLINE float h_over_p(float p) {
    return -0.0416666667f + p * (3.47222222e-4f + p * (-5.51146384e-6f + p * (1.03339947e-7f
           + p * -2.08767570e-9f)));
}
FV_INLINE float h_prime_over_l(float p) {
    return -0.0833333333f + p * (1.38888889e-3f + p * (-3.30687831e-5f + p * (8.26719577e-7f
           + p * -2.08767570e-8f)));
}
FV_INLINE double h_over_p(double p) {
    double q = -2.5040921947091955e-19;
    q = 1.087434349279031e-17 + p * q;
    q = -4.770034475709914e-16 + p * q;
    q = 2.1185501852016142e-14 + p * q;
    q = -9.55895466477477e-13 + p * q;
    q = 4.403491782239578e-11 + p * q;
    q = -2.08767569878681e-09 + p * q;
    q = 1.033399470899471e-07 + p * q;
    q = -5.5114638447971785e-06 + p * q;
    q = 0.00034722222222222224 + p * q;
    return -0.041666666666666664 + p * q;
}
FV_INLINE double h_prime_over_l(double p) {
    double q = -5.5090028283602295e-18;
    q = 2.174868698558062e-16 + p * q;
    q = -8.586062056277845e-15 + p * q;
    q = 3.3896802963225827e-13 + p * q;
    q = -1.3382536530684679e-11 + p * q;
    q = 5.284190138687493e-10 + p * q;
    q = -2.08767569878681e-08 + p * q;
    q = 8.267195767195768e-07 + p * q;
    q = -3.306878306878307e-05 + p * q;
    q = 0.001388888888888889 + p * q;
    return -0.08333333333333333 + p * q;
}

struct ContinuousBernoulliArgs {
    int64_t cols;
    const void* logits;  // [rows, cols], row stride logits_stride
    int64_t logits_stride;
    const void* target;  // [target_rows, cols], row stride target_stride
    int64_t target_stride;
    int64_t target_rows;  // divides rows: logits row b reads target row b % target_rows
    void* logp;           // [rows, cols] if elementwise else [rows], compute type
    void* grad;           // [rows, cols] logits' type, or NULL
    double weight;        // grad = weight * dlogp/dlogits
};

template <class TL, class TX, bool ELEMENTWISE, bool GRAD>
FV_INLINE void continuous_bernoulli_rows(const ContinuousBernoulliArgs& a, int64_t b0, int64_t b1) {
    using C = typename Compute<TL>::type;
    alignas(64) C terms[CHUNK];
    const C scale = C(a.weight);
    const C nan = std::numeric_limits<C>::quiet_NaN();
    const C inf = std::numeric_limits<C>::infinity();
    const C series_below = C(1);  // reference.SERIES_BELOW
    for (int64_t b = b0; b < b1; ++b) {
        const TL* __restrict logits = static_cast<const TL*>(a.logits) + b * a.logits_stride;
        const TX* __restrict target = static_cast<const TX*>(a.target) + (b % a.target_rows) * a.target_stride;
        C* __restrict logp_el = static_cast<C*>(a.logp) + b * a.cols;
        TL* __restrict grad = GRAD ? static_cast<TL*>(a.grad) + b * a.cols : nullptr;
        double logp = 0.0;
        for (int64_t j0 = 0; j0 < a.cols; j0 += CHUNK) {
            const int64_t m = std::min(CHUNK, a.cols - j0);
            C* __restrict out = ELEMENTWISE ? logp_el + j0 : terms;
            for (int64_t j = 0; j < m; ++j) {
                const C l = widen(logits[j0 + j]);
                const C x = C(widen(target[j0 + j]));
                const bool valid = x >= C(0) && x <= C(1);  // false for NaN too
                const C abs_l = std::fabs(l);
                const bool small = abs_l < series_below;
                const C l_series = small ? l : C(0);
                const C p = l_series * l_series;
                const C a_closed = small ? series_below : abs_l;
                const C e = exp_nonpos_c(-a_closed);
                const C one_minus_e = C(1) - e;  // >= 1 - exp(-1): no cancellation
                // a / (1 - e) >= 1 is a normal float, as log_c needs, except an infinite logit.
                const C ratio = a_closed / one_minus_e;
                const C log_ratio = ratio < inf ? log_c(ratio) : inf;
                const C series = (x - C(0.5)) * l + p * h_over_p(p);
                const C closed = x * l - (l > C(0) ? l : C(0)) + log_ratio;
                out[j] = valid ? (small ? series : closed) : nan;
                if constexpr (GRAD) {
                    const C grad_series = (x - C(0.5)) + l_series * h_prime_over_l(p);
                    const C tail = (one_minus_e - a_closed * e) / (a_closed * one_minus_e);
                    const C grad_closed = x + (l > C(0) ? tail - C(1) : -tail);
                    grad[j0 + j] = narrow<TL>(valid ? scale * (small ? grad_series : grad_closed) : nan);
                }
            }
            if constexpr (!ELEMENTWISE) logp += chunk_sum(terms, m);
        }
        if constexpr (!ELEMENTWISE) static_cast<C*>(a.logp)[b] = C(logp);
    }
}

#define FV_CONTINUOUS_BERNOULLI_ENTRY(TL, TX, NAME)                                                     \
    FV_CLONES void NAME(const ContinuousBernoulliArgs& a, bool elementwise, int64_t b0, int64_t b1) { \
        const bool grad = a.grad != nullptr;                                                           \
        if (elementwise && grad) continuous_bernoulli_rows<TL, TX, true, true>(a, b0, b1);             \
        else if (elementwise) continuous_bernoulli_rows<TL, TX, true, false>(a, b0, b1);               \
        else if (grad) continuous_bernoulli_rows<TL, TX, false, true>(a, b0, b1);                      \
        else continuous_bernoulli_rows<TL, TX, false, false>(a, b0, b1);                               \
    }

FV_CONTINUOUS_BERNOULLI_ENTRY(double, double, rows_f64_f64)
FV_CONTINUOUS_BERNOULLI_ENTRY(float, float, rows_f32_f32)
FV_CONTINUOUS_BERNOULLI_ENTRY(bf16_t, bf16_t, rows_bf16_bf16)
FV_CONTINUOUS_BERNOULLI_ENTRY(bf16_t, float, rows_bf16_f32)
FV_CONTINUOUS_BERNOULLI_ENTRY(f16_t, f16_t, rows_f16_f16)
FV_CONTINUOUS_BERNOULLI_ENTRY(f16_t, float, rows_f16_f32)

using RowsFn = void (*)(const ContinuousBernoulliArgs&, bool, int64_t, int64_t);

RowsFn entry_for(int logits_dtype, int target_dtype) {
    if (target_dtype != logits_dtype && target_dtype != FASTVAE_F32) return nullptr;
    const bool same = target_dtype == logits_dtype;
    switch (logits_dtype) {
        case FASTVAE_F64: return same ? rows_f64_f64 : nullptr;
        case FASTVAE_F32: return rows_f32_f32;
        case FASTVAE_BF16: return same ? rows_bf16_bf16 : rows_bf16_f32;
        case FASTVAE_F16: return same ? rows_f16_f16 : rows_f16_f32;
        default: return nullptr;
    }
}

}  // namespace
}  // namespace fastvae

// logp: [rows, cols] if elementwise else [rows] (compute type); grad_logits [rows, cols]
// (logits_dtype) = weight * dlogp/dlogits when non-NULL, scaled in the compute type before
// rounding. target: [target_rows, cols], target_rows dividing rows; its dtype is the logits'
// or FASTVAE_F32 (FASTVAE_ERR_DTYPE otherwise).
extern "C" FASTVAE_API int fastvae_continuous_bernoulli_forward(
    int logits_dtype, int target_dtype, int64_t rows, int64_t cols,
    const void* logits, int64_t logits_stride, const void* target, int64_t target_stride, int64_t target_rows,
    int elementwise, void* logp, void* grad_logits, double weight, int num_threads) {
    const fastvae::RowsFn fn = fastvae::entry_for(logits_dtype, target_dtype);
    if (fn == nullptr) return FASTVAE_ERR_DTYPE;
    const fastvae::ContinuousBernoulliArgs a{.cols = cols, .logits = logits, .logits_stride = logits_stride,
                                             .target = target, .target_stride = target_stride,
                                             .target_rows = target_rows, .logp = logp, .grad = grad_logits,
                                             .weight = weight};
    fastvae::parallel_rows(rows, cols, num_threads,
                           [&](int64_t b0, int64_t b1) { fn(a, elementwise != 0, b0, b1); });
    return FASTVAE_OK;
}
