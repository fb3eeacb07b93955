// The importance-weighted bound's latent terms, normalized weights and their backward; the
// likelihood's term log p [K, B] comes from the likelihood family's kernel.
//   a_kb   = 0.5 sum_j [(z - mu)^2 exp(-lv) + lv - z^2]   (log N(z; 0, I) - log N(z; mu, e^lv))
//   log w  = log p + a,  loss_b = log K - logsumexp_k log w_kb,  w~_kb = exp(log w_kb - logsumexp)
// Backward, with c_kb = -g_b w~_kb for the upstream gradient g of loss_b:
//   IWAE: grad_z = c ((z - mu) e^-lv - z), grad_mu = -sum_k c (z - mu) e^-lv,
//         grad_lv = 0.5 (sum_k c - sum_k c (z - mu)^2 e^-lv)
//   DReG: grad_z as IWAE, grad_mu = grad_lv = 0 (iwae_loss then weights z's whole gradient by w~ once
//         more, the decoder's path included; see fastvae/ops/iwae/op.py)
// Sample k of row b is row k * rows + b of z and grad_z; it reads mu and logvar row b (a row
// period: the posterior is never copied K times). Each thread takes whole rows b with all
// their samples, so the sums over k need no atomics and keep a fixed order.
#include <cmath>
#include <limits>
#include <vector>

#include "fastvae_native.h"
#include "numerics.h"
#include "rows.h"

namespace fastvae {
namespace {

// K samples of the posterior's B rows of L latent dims.
struct Latent {
    int64_t samples;      // K >= 1
    int64_t rows;         // B
    int64_t cols;         // L
    const void* z;        // [samples * rows, cols], row stride z_stride
    int64_t z_stride;
    const void* mu;       // [rows, cols], row stride mu_stride
    int64_t mu_stride;
    const void* logvar;   // [rows, cols], row stride logvar_stride
    int64_t logvar_stride;
};

struct ForwardArgs {
    Latent q;
    const void* logp;     // [samples * rows], compute type
    void* loss;           // [rows], compute type
    void* weights;        // [samples * rows], compute type
};

struct BackwardArgs {
    Latent q;
    const void* grad_rows;  // [rows] compute type, element stride grad_rows_stride (0: one value broadcast)
    int64_t grad_rows_stride;
    const void* weights;    // [samples * rows], compute type
    bool dreg;
    void* grad_z;           // [samples * rows, cols] contiguous
    void* grad_mu;          // [rows, cols] contiguous
    void* grad_logvar;      // [rows, cols] contiguous
};

template <class T>
FV_INLINE const T* row_of(const void* base, int64_t stride, int64_t r) {
    return static_cast<const T*>(base) + r * stride;
}

// loss and weights of rows b0 .. b1 from the K log w of each row (held in double).
template <class T>
FV_INLINE void forward_rows(const ForwardArgs& a, int64_t b0, int64_t b1) {
    using C = typename Compute<T>::type;
    const Latent& q = a.q;
    alignas(64) C inv_var[CHUNK], terms[CHUNK];
    std::vector<double> log_w(size_t(q.samples));
    const C* logp = static_cast<const C*>(a.logp);
    C* weights = static_cast<C*>(a.weights);
    const double log_samples = std::log(double(q.samples));
    constexpr double inf = std::numeric_limits<double>::infinity();
    for (int64_t b = b0; b < b1; ++b) {
        const T* __restrict mu = row_of<T>(q.mu, q.mu_stride, b);
        const T* __restrict lv = row_of<T>(q.logvar, q.logvar_stride, b);
        std::fill(log_w.begin(), log_w.end(), 0.0);
        double logvar_sum = 0.0;
        for (int64_t j0 = 0; j0 < q.cols; j0 += CHUNK) {
            const int64_t m = std::min(CHUNK, q.cols - j0);
            for (int64_t j = 0; j < m; ++j) {
                const C v = widen(lv[j0 + j]);
                inv_var[j] = exp_c(-v);
                terms[j] = v;
            }
            logvar_sum += chunk_sum(terms, m);
            for (int64_t k = 0; k < q.samples; ++k) {
                const T* __restrict z = row_of<T>(q.z, q.z_stride, k * q.rows + b) + j0;
                for (int64_t j = 0; j < m; ++j) {
                    const C zv = widen(z[j]), d = zv - widen(mu[j0 + j]);
                    terms[j] = d * d * inv_var[j] - zv * zv;
                }
                log_w[size_t(k)] += chunk_sum(terms, m);
            }
        }
        // A stable logsumexp over the samples. All log w = -inf gives -inf (torch.logsumexp's
        // answer); a NaN anywhere gives NaN.
        double top = -inf;
        bool nan = false;
        for (int64_t k = 0; k < q.samples; ++k) {
            double& lw = log_w[size_t(k)];
            lw = double(logp[k * q.rows + b]) + 0.5 * (lw + logvar_sum);
            nan |= lw != lw;
            top = lw > top ? lw : top;
        }
        double total = 0.0;
        for (int64_t k = 0; k < q.samples; ++k) total += std::exp(log_w[size_t(k)] - top);
        const double lse = nan ? std::numeric_limits<double>::quiet_NaN() : top == -inf ? top : top + std::log(total);
        static_cast<C*>(a.loss)[b] = C(log_samples - lse);
        for (int64_t k = 0; k < q.samples; ++k) weights[k * q.rows + b] = C(std::exp(log_w[size_t(k)] - lse));
    }
}

template <class T, bool DREG>
FV_INLINE void backward_rows(const BackwardArgs& a, int64_t b0, int64_t b1) {
    using C = typename Compute<T>::type;
    const Latent& q = a.q;
    alignas(64) C inv_var[CHUNK], sum_mu[CHUNK], sum_lv[CHUNK];
    std::vector<C> coef(size_t(q.samples));
    const C* weights = static_cast<const C*>(a.weights);
    for (int64_t b = b0; b < b1; ++b) {
        const T* __restrict mu = row_of<T>(q.mu, q.mu_stride, b);
        const T* __restrict lv = row_of<T>(q.logvar, q.logvar_stride, b);
        T* __restrict grad_mu = static_cast<T*>(a.grad_mu) + b * q.cols;
        T* __restrict grad_lv = static_cast<T*>(a.grad_logvar) + b * q.cols;
        const C g = static_cast<const C*>(a.grad_rows)[b * a.grad_rows_stride];
        double coef_sum = 0.0;
        for (int64_t k = 0; k < q.samples; ++k) {
            const C w = weights[k * q.rows + b];
            coef[size_t(k)] = -g * w;
            coef_sum += double(coef[size_t(k)]);
        }
        for (int64_t j0 = 0; j0 < q.cols; j0 += CHUNK) {
            const int64_t m = std::min(CHUNK, q.cols - j0);
            for (int64_t j = 0; j < m; ++j) {
                inv_var[j] = exp_c(-widen(lv[j0 + j]));
                sum_mu[j] = sum_lv[j] = C(0);
            }
            for (int64_t k = 0; k < q.samples; ++k) {
                const int64_t r = k * q.rows + b;
                const T* __restrict z = row_of<T>(q.z, q.z_stride, r) + j0;
                T* __restrict grad_z = static_cast<T*>(a.grad_z) + r * q.cols + j0;
                const C c = coef[size_t(k)];
                for (int64_t j = 0; j < m; ++j) {
                    const C zv = widen(z[j]), d = zv - widen(mu[j0 + j]);
                    const C scaled = d * inv_var[j];  // (z - mu) / var
                    grad_z[j] = narrow<T>(c * (scaled - zv));
                    if constexpr (!DREG) {
                        sum_mu[j] += c * scaled;
                        sum_lv[j] += c * scaled * d;
                    }
                }
            }
            for (int64_t j = 0; j < m; ++j) {
                grad_mu[j0 + j] = narrow<T>(DREG ? C(0) : -sum_mu[j]);
                grad_lv[j0 + j] = narrow<T>(DREG ? C(0) : C(0.5) * (C(coef_sum) - sum_lv[j]));
            }
        }
    }
}

#define FV_IWAE_ENTRIES(T, SUFFIX)                                                        \
    FV_CLONES void forward_##SUFFIX(const ForwardArgs& a, int64_t b0, int64_t b1) {       \
        forward_rows<T>(a, b0, b1);                                                       \
    }                                                                                     \
    FV_CLONES void backward_##SUFFIX(const BackwardArgs& a, int64_t b0, int64_t b1) {     \
        if (a.dreg) backward_rows<T, true>(a, b0, b1);                                    \
        else backward_rows<T, false>(a, b0, b1);                                          \
    }

FV_IWAE_ENTRIES(float, f32)
FV_IWAE_ENTRIES(double, f64)
FV_IWAE_ENTRIES(bf16_t, bf16)
FV_IWAE_ENTRIES(f16_t, f16)

}  // namespace
}  // namespace fastvae

using namespace fastvae;

// loss [rows] = log K - logsumexp_k log w and weights [samples * rows] (row k * rows + b: w~_kb),
// both in the compute type, from logp [samples * rows] (compute type) and z [samples * rows,
// cols], mu, logvar [rows, cols] (dtype).
extern "C" FASTVAE_API int fastvae_iwae_forward(
    int dtype, int64_t samples, int64_t rows, int64_t cols, const void* logp,
    const void* z, int64_t z_stride, const void* mu, int64_t mu_stride, const void* logvar, int64_t logvar_stride,
    void* loss, void* weights, int num_threads) {
    const ForwardArgs a{.q = {samples, rows, cols, z, z_stride, mu, mu_stride, logvar, logvar_stride},
                        .logp = logp, .loss = loss, .weights = weights};
    return run_rows(kernel_for_dtype<ForwardArgs>(dtype, forward_f32, forward_f64, forward_bf16, forward_f16), a,
                    rows, samples * (cols + 1), num_threads);
}

// grad_z [samples * rows, cols], grad_mu and grad_logvar [rows, cols] (dtype; zero for DReG)
// from grad_rows [rows] (compute type, element stride grad_rows_stride) and the forward's
// weights [samples * rows] (compute type).
extern "C" FASTVAE_API int fastvae_iwae_backward(
    int dtype, int64_t samples, int64_t rows, int64_t cols,
    const void* grad_rows, int64_t grad_rows_stride, const void* weights,
    const void* z, int64_t z_stride, const void* mu, int64_t mu_stride, const void* logvar, int64_t logvar_stride,
    int dreg, void* grad_z, void* grad_mu, void* grad_logvar, int num_threads) {
    const BackwardArgs a{.q = {samples, rows, cols, z, z_stride, mu, mu_stride, logvar, logvar_stride},
                         .grad_rows = grad_rows, .grad_rows_stride = grad_rows_stride, .weights = weights,
                         .dreg = dreg != 0, .grad_z = grad_z, .grad_mu = grad_mu, .grad_logvar = grad_logvar};
    return run_rows(kernel_for_dtype<BackwardArgs>(dtype, backward_f32, backward_f64, backward_bf16, backward_f16),
                    a, rows, samples * (cols + 1), num_threads);
}
