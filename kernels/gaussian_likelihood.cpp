// Gaussian log-likelihood of data under a decoder's mean and log-variance, with its
// gradients in the same pass (fastvae/ops/gaussian_likelihood/reference.py):
//   log p = -0.5 (r^2 + s + log 2pi),  r = (x - m) exp(-s/2)
//   dlogp/dm = r exp(-s/2),  dlogp/ds = 0.5 (r^2 - 1)
// exp(-s/2) rather than exp(-s): finite down to s = -177 in float. Without a log-variance
// (unit variance) s = 0 and r = x - m. Gradients are written times weight (see bernoulli.cpp).
// Mean row b reads target row b % target_rows and log-variance row b % logvar_rows
// (row-periodic inputs: one shared log-variance row, or data scored against K samples).
// Mean and log-variance share one storage type; (param, target) storage pairs are those of
// common.LIKELIHOOD_DTYPE_PAIRS. dlogp/dlogvar is stored in the param type or, for a
// half-precision param whose log-variance has fewer rows than the mean, in float: those
// per-element values are summed over rows afterwards.
#include "fastvae_native.h"
#include "numerics.h"
#include "rows.h"

namespace fastvae {
namespace {

struct GaussianLikelihoodArgs {
    int64_t cols;
    const void* mean;  // [rows, cols], row stride mean_stride
    int64_t mean_stride;
    const void* target;  // [target_rows, cols], row stride target_stride
    int64_t target_stride;
    int64_t target_rows;  // divides rows: mean row b reads target row b % target_rows
    const void* logvar;   // [logvar_rows, cols], row stride logvar_stride; NULL for unit variance
    int64_t logvar_stride;
    int64_t logvar_rows;  // divides rows: mean row b reads log-variance row b % logvar_rows
    void* logp;           // [rows, cols] if elementwise else [rows], compute type
    void* grad_mean;      // [rows, cols] param type, or NULL
    void* grad_logvar;    // [rows, cols] TG, written when grad_mean and logvar are non-NULL
    double weight;        // grads = weight * dlogp/d(mean, logvar)
};

template <class TP, class TX, class TG, bool LOGVAR, bool ELEMENTWISE, bool GRAD>
FV_INLINE void gaussian_likelihood_rows(const GaussianLikelihoodArgs& a, int64_t b0, int64_t b1) {
    using C = typename Compute<TP>::type;
    alignas(64) C terms[CHUNK];
    const C scale = C(a.weight);
    const C log_2pi = C(1.8378770664093453);
    for (int64_t b = b0; b < b1; ++b) {
        const TP* __restrict mean = static_cast<const TP*>(a.mean) + b * a.mean_stride;
        const TX* __restrict target = static_cast<const TX*>(a.target) + (b % a.target_rows) * a.target_stride;
        const TP* __restrict logvar =
            LOGVAR ? static_cast<const TP*>(a.logvar) + (b % a.logvar_rows) * a.logvar_stride : nullptr;
        C* __restrict logp_el = static_cast<C*>(a.logp) + b * a.cols;
        TP* __restrict grad_mean = GRAD ? static_cast<TP*>(a.grad_mean) + b * a.cols : nullptr;
        TG* __restrict grad_logvar = GRAD && LOGVAR ? static_cast<TG*>(a.grad_logvar) + b * a.cols : nullptr;
        double logp = 0.0;
        for (int64_t j0 = 0; j0 < a.cols; j0 += CHUNK) {
            const int64_t m = std::min(CHUNK, a.cols - j0);
            C* __restrict out = ELEMENTWISE ? logp_el + j0 : terms;
            for (int64_t j = 0; j < m; ++j) {
                const C diff = C(widen(target[j0 + j])) - widen(mean[j0 + j]);
                if constexpr (LOGVAR) {
                    const C s = widen(logvar[j0 + j]);
                    const C inv_std = exp_c(C(-0.5) * s);
                    const C r = diff * inv_std;
                    const C q = r * r;
                    out[j] = C(-0.5) * ((q + s) + log_2pi);
                    if constexpr (GRAD) {
                        grad_mean[j0 + j] = narrow<TP>(scale * (r * inv_std));
                        grad_logvar[j0 + j] = narrow<TG>(scale * (C(0.5) * (q - C(1))));
                    }
                } else {
                    out[j] = C(-0.5) * (diff * diff + log_2pi);
                    if constexpr (GRAD) grad_mean[j0 + j] = narrow<TP>(scale * diff);
                }
            }
            if constexpr (!ELEMENTWISE) logp += chunk_sum(terms, m);
        }
        if constexpr (!ELEMENTWISE) static_cast<C*>(a.logp)[b] = C(logp);
    }
}

template <class TP, class TX, class TG, bool LOGVAR>
FV_INLINE void gaussian_likelihood_dispatch(const GaussianLikelihoodArgs& a, bool elementwise, int64_t b0,
                                            int64_t b1) {
    const bool grad = a.grad_mean != nullptr;
    if (elementwise && grad) gaussian_likelihood_rows<TP, TX, TG, LOGVAR, true, true>(a, b0, b1);
    else if (elementwise) gaussian_likelihood_rows<TP, TX, TG, LOGVAR, true, false>(a, b0, b1);
    else if (grad) gaussian_likelihood_rows<TP, TX, TG, LOGVAR, false, true>(a, b0, b1);
    else gaussian_likelihood_rows<TP, TX, TG, LOGVAR, false, false>(a, b0, b1);
}

#define FV_GAUSSIAN_LIKELIHOOD_ENTRY(TP, TX, TG, NAME)                                                    \
    FV_CLONES void NAME(const GaussianLikelihoodArgs& a, bool elementwise, int64_t b0, int64_t b1) {     \
        if (a.logvar != nullptr) gaussian_likelihood_dispatch<TP, TX, TG, true>(a, elementwise, b0, b1); \
        else gaussian_likelihood_dispatch<TP, TX, TG, false>(a, elementwise, b0, b1);                    \
    }

FV_GAUSSIAN_LIKELIHOOD_ENTRY(double, double, double, rows_f64_f64)
FV_GAUSSIAN_LIKELIHOOD_ENTRY(float, float, float, rows_f32_f32)
FV_GAUSSIAN_LIKELIHOOD_ENTRY(bf16_t, bf16_t, bf16_t, rows_bf16_bf16)
FV_GAUSSIAN_LIKELIHOOD_ENTRY(bf16_t, float, bf16_t, rows_bf16_f32)
FV_GAUSSIAN_LIKELIHOOD_ENTRY(f16_t, f16_t, f16_t, rows_f16_f16)
FV_GAUSSIAN_LIKELIHOOD_ENTRY(f16_t, float, f16_t, rows_f16_f32)
// Float dlogp/dlogvar for a half-precision param whose log-variance has fewer rows than the mean.
FV_GAUSSIAN_LIKELIHOOD_ENTRY(bf16_t, bf16_t, float, rows_bf16_bf16_wide)
FV_GAUSSIAN_LIKELIHOOD_ENTRY(bf16_t, float, float, rows_bf16_f32_wide)
FV_GAUSSIAN_LIKELIHOOD_ENTRY(f16_t, f16_t, float, rows_f16_f16_wide)
FV_GAUSSIAN_LIKELIHOOD_ENTRY(f16_t, float, float, rows_f16_f32_wide)

using RowsFn = void (*)(const GaussianLikelihoodArgs&, bool, int64_t, int64_t);

// The entry for (param, target, grad_logvar) dtypes: the target has the param's type or is
// float32; grad_logvar has the param's type, or float32 for a half-precision param.
RowsFn entry_for(int param_dtype, int target_dtype, int grad_logvar_dtype) {
    if (target_dtype != param_dtype && target_dtype != FASTVAE_F32) return nullptr;
    const bool same = target_dtype == param_dtype;
    const bool half = param_dtype == FASTVAE_BF16 || param_dtype == FASTVAE_F16;
    const bool wide = grad_logvar_dtype != param_dtype;
    if (wide && !(half && grad_logvar_dtype == FASTVAE_F32)) return nullptr;
    switch (param_dtype) {
        case FASTVAE_F64: return same ? rows_f64_f64 : nullptr;
        case FASTVAE_F32: return rows_f32_f32;
        case FASTVAE_BF16:
            return same ? (wide ? rows_bf16_bf16_wide : rows_bf16_bf16) : (wide ? rows_bf16_f32_wide : rows_bf16_f32);
        case FASTVAE_F16:
            return same ? (wide ? rows_f16_f16_wide : rows_f16_f16) : (wide ? rows_f16_f32_wide : rows_f16_f32);
        default: return nullptr;
    }
}

}  // namespace
}  // namespace fastvae

// logp: [rows, cols] if elementwise else [rows] (compute type). With grad_mean non-NULL:
// grad_mean [rows, cols] (param_dtype) = weight * dlogp/dmean and, with logvar non-NULL,
// grad_logvar [rows, cols] (grad_logvar_dtype: param_dtype, or FASTVAE_F32 for a bf16/f16
// param) = weight * dlogp/dlogvar, scaled in the compute type before rounding. mean and
// logvar have param_dtype; target has it or FASTVAE_F32. target and logvar have
// target_rows and logvar_rows rows, each dividing rows; logvar NULL means unit variance.
extern "C" FASTVAE_API int fastvae_gaussian_likelihood_forward(
    int param_dtype, int target_dtype, int grad_logvar_dtype, int64_t rows, int64_t cols,
    const void* mean, int64_t mean_stride, const void* target, int64_t target_stride, int64_t target_rows,
    const void* logvar, int64_t logvar_stride, int64_t logvar_rows,
    int elementwise, void* logp, void* grad_mean, void* grad_logvar, double weight, int num_threads) {
    const fastvae::RowsFn fn = fastvae::entry_for(param_dtype, target_dtype, grad_logvar_dtype);
    if (fn == nullptr) return FASTVAE_ERR_DTYPE;
    const fastvae::GaussianLikelihoodArgs a{
        .cols = cols, .mean = mean, .mean_stride = mean_stride,
        .target = target, .target_stride = target_stride, .target_rows = target_rows,
        .logvar = logvar, .logvar_stride = logvar_stride, .logvar_rows = logvar == nullptr ? 1 : logvar_rows,
        .logp = logp, .grad_mean = grad_mean, .grad_logvar = grad_logvar, .weight = weight};
    fastvae::parallel_rows(rows, cols, num_threads,
                           [&](int64_t b0, int64_t b1) { fn(a, elementwise != 0, b0, b1); });
    return FASTVAE_OK;
}
