// Bernoulli log-likelihood from logits, with its gradient in the same pass.
//   log p = x l - softplus(l) = l x - max(l, 0) - log1p(exp(-|l|))   (no exp can overflow)
//   dlogp/dl = x - sigmoid(l), sigmoid(l) = 1 / (1 + e) for l >= 0, e / (1 + e) otherwise,
//   with e = exp(-|l|) shared by both.
// The gradient is written times weight: a loss that ends in this sum (elbo_loss) passes
// its own weight, and its backward has nothing left to compute. A target outside [0, 1]
// makes its element NaN, value and gradient (x l - softplus(l) is then no log-likelihood).
// Logits and target may have different storage types (bf16 logits from an AMP
// decoder against fp32 data is the common case), so no upcast copy is needed.
// The target may have fewer rows than the logits (target_rows dividing rows): logits
// row r is scored against target row r % target_rows, so K decoder samples per
// datapoint read the data without a K-fold copy (importance-weighted bounds).
#include <limits>

#include "fastvae_native.h"
#include "numerics.h"
#include "rows.h"

namespace fastvae {
namespace {

struct BernoulliArgs {
    int64_t cols;
    const void* logits;  // [rows, cols], row stride logits_stride
    int64_t logits_stride;
    const void* target;  // [target_rows, cols], row stride target_stride
    int64_t target_stride;
    int64_t target_rows;  // divides rows: logits row b reads target row b % target_rows
    void* logp;          // [rows, cols] if elementwise else [rows], compute type
    void* grad;          // [rows, cols] logits' type, or NULL
    double weight;       // grad = weight * dlogp/dlogits
};

template <class TL, class TX, bool ELEMENTWISE, bool GRAD>
FV_INLINE void bernoulli_rows(const BernoulliArgs& a, int64_t b0, int64_t b1) {
    using C = typename Compute<TL>::type;
    alignas(64) C terms[CHUNK];
    const C scale = C(a.weight);
    const C nan = std::numeric_limits<C>::quiet_NaN();
    // t = b % target_rows, stepped rather than divided per row.
    for (int64_t b = b0, t = b0 % a.target_rows; b < b1; ++b, t = t + 1 == a.target_rows ? 0 : t + 1) {
        const TL* __restrict logits = static_cast<const TL*>(a.logits) + b * a.logits_stride;
        const TX* __restrict target = static_cast<const TX*>(a.target) + t * a.target_stride;
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
                const C e = exp_nonpos_c(-std::fabs(l));
                const C logp = l * x - (l > C(0) ? l : C(0)) - log1p_unit_c(e);
                out[j] = valid ? logp : nan;
                if constexpr (GRAD) {
                    const C r = C(1) / (C(1) + e);
                    const C g = scale * (x - (l >= C(0) ? r : e * r));
                    grad[j0 + j] = narrow<TL>(valid ? g : nan);
                }
            }
            if constexpr (!ELEMENTWISE) logp += chunk_sum(terms, m);
        }
        if constexpr (!ELEMENTWISE) static_cast<C*>(a.logp)[b] = C(logp);
    }
}

#define FV_BERNOULLI_ENTRY(TL, TX, NAME)                                                     \
    FV_CLONES void NAME(const BernoulliArgs& a, bool elementwise, int64_t b0, int64_t b1) { \
        const bool grad = a.grad != nullptr;                                                 \
        if (elementwise && grad) bernoulli_rows<TL, TX, true, true>(a, b0, b1);              \
        else if (elementwise) bernoulli_rows<TL, TX, true, false>(a, b0, b1);                \
        else if (grad) bernoulli_rows<TL, TX, false, true>(a, b0, b1);                       \
        else bernoulli_rows<TL, TX, false, false>(a, b0, b1);                                \
    }

FV_BERNOULLI_ENTRY(double, double, rows_f64_f64)
FV_BERNOULLI_ENTRY(float, float, rows_f32_f32)
FV_BERNOULLI_ENTRY(float, bf16_t, rows_f32_bf16)
FV_BERNOULLI_ENTRY(float, f16_t, rows_f32_f16)
FV_BERNOULLI_ENTRY(bf16_t, float, rows_bf16_f32)
FV_BERNOULLI_ENTRY(bf16_t, bf16_t, rows_bf16_bf16)
FV_BERNOULLI_ENTRY(bf16_t, f16_t, rows_bf16_f16)
FV_BERNOULLI_ENTRY(f16_t, float, rows_f16_f32)
FV_BERNOULLI_ENTRY(f16_t, bf16_t, rows_f16_bf16)
FV_BERNOULLI_ENTRY(f16_t, f16_t, rows_f16_f16)

using RowsFn = void (*)(const BernoulliArgs&, bool, int64_t, int64_t);

// The entry for a (logits, target) dtype pair; null for f64 mixed with another
// type (the Python side upcasts those) or an unknown code.
RowsFn entry_for(int logits_dtype, int target_dtype) {
    constexpr int F32 = FASTVAE_F32, BF16 = FASTVAE_BF16, F16 = FASTVAE_F16;
    if (logits_dtype == FASTVAE_F64 || target_dtype == FASTVAE_F64)
        return logits_dtype == target_dtype ? rows_f64_f64 : nullptr;
    const RowsFn table[3][3] = {{rows_f32_f32, rows_f32_bf16, rows_f32_f16},
                                {rows_bf16_f32, rows_bf16_bf16, rows_bf16_f16},
                                {rows_f16_f32, rows_f16_bf16, rows_f16_f16}};
    auto index = [&](int code) { return code == F32 ? 0 : code == BF16 ? 1 : code == F16 ? 2 : -1; };
    const int il = index(logits_dtype), ix = index(target_dtype);
    return il < 0 || ix < 0 ? nullptr : table[il][ix];
}

}  // namespace
}  // namespace fastvae

// logp: [rows, cols] if elementwise else [rows] (compute type); grad_logits [rows, cols]
// (logits_dtype) = weight * (target - sigmoid(logits)) when non-NULL, scaled in the compute
// type before rounding. logits and target may differ in dtype unless one is FASTVAE_F64.
// target is [target_rows, cols] with target_rows dividing rows (row r reads target row
// r % target_rows); target_rows = rows for one target row per logits row.
extern "C" FASTVAE_API int fastvae_bernoulli_forward(
    int logits_dtype, int target_dtype, int64_t rows, int64_t cols,
    const void* logits, int64_t logits_stride, const void* target, int64_t target_stride, int64_t target_rows,
    int elementwise, void* logp, void* grad_logits, double weight, int num_threads) {
    const fastvae::RowsFn fn = fastvae::entry_for(logits_dtype, target_dtype);
    if (fn == nullptr) return FASTVAE_ERR_DTYPE;
    if (rows == 0) return FASTVAE_OK;  // nothing to write (and target_rows may be 0)
    const fastvae::BernoulliArgs a{.cols = cols, .logits = logits, .logits_stride = logits_stride,
                                   .target = target, .target_stride = target_stride, .target_rows = target_rows,
                                   .logp = logp, .grad = grad_logits, .weight = weight};
    fastvae::parallel_rows(rows, cols, num_threads,
                           [&](int64_t b0, int64_t b1) { fn(a, elementwise != 0, b0, b1); });
    return FASTVAE_OK;
}
