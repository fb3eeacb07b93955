// Diagonal Gaussian posterior kernels: reparameterized sample + KL to N(0, I)
// (forward and backward) and the KL alone.
//   z   = mu + exp(0.5 lv) * eps
//   kl  = 0.5 * (mu^2 + exp(lv) - lv - 1), with exp(lv) - 1 - lv from fv_expm1_minus_x
//         so that lv near 0 loses no digits
//   dz/dmu = 1, dz/dlv = 0.5 exp(0.5 lv) eps, dkl/dmu = mu, dkl/dlv = 0.5 expm1(lv)
// K samples per posterior row (importance-weighted bounds): z row k * rows + b is sample k
// of row b and reads mu, logvar row b (the posterior is never copied K times); its noise
// is the Philox stream at flat index (k * rows + b) * cols + j. Backward sums the K
// samples' grad_z into grad_mu and grad_logvar inside the kernel, in the compute type.
#include <vector>

#include "fastvae_native.h"
#include "noise.h"
#include "numerics.h"
#include "rows.h"

namespace fastvae {
namespace {

// The posterior's rows, read by every entry point.
struct Posterior {
    int64_t cols;
    const void* mu;       // [rows, cols], row stride mu_stride
    int64_t mu_stride;
    const void* logvar;   // [rows, cols], row stride logvar_stride
    int64_t logvar_stride;
};

// The noise: the caller's eps, or (eps NULL) the Philox stream of seed.
struct Noise {
    const void* eps;      // [rows, cols], row stride eps_stride, or NULL
    int64_t eps_stride;
    uint64_t seed;
};

// K samples of each of the posterior's rows: sample k of row b is row k * rows + b of
// z, eps and grad_z.
struct Samples {
    int64_t rows;         // the posterior's rows (B)
    int64_t count;        // K >= 1
};

struct ForwardArgs {
    Posterior q;
    Samples samples;
    Noise noise;          // eps [K * rows, cols]
    void* z;              // [K * rows, cols] contiguous
    void* kl;             // [rows], compute type
};

struct BackwardArgs {
    Posterior q;
    Samples samples;
    Noise noise;          // eps [K * rows, cols]
    const void* grad_z;   // [K * rows, cols], row stride grad_z_stride, or NULL
    int64_t grad_z_stride;
    const void* grad_kl;  // [rows] compute type, element stride grad_kl_stride, or NULL
    int64_t grad_kl_stride;
    void* grad_mu;        // [rows, cols] contiguous
    void* grad_logvar;    // [rows, cols] contiguous
};

struct KLArgs {
    Posterior q;
    bool elementwise;     // kl [rows, cols] instead of [rows]
    void* kl;             // compute type
    void* grad_mu;        // [rows, cols] contiguous, or NULL (then grad_logvar is NULL too)
    void* grad_logvar;
};

template <class T>
FV_INLINE const T* row_of(const void* base, int64_t stride, int64_t b) {
    return static_cast<const T*>(base) + b * stride;
}

// The noise of a chunk: the caller's eps row from j0 on, or the next m normals of a
// Philox cursor (each cursor's chunks are visited in flat index order).
template <class T, bool NOISE>
struct ChunkNoise {
    using C = typename Compute<T>::type;
    const T* __restrict eps;
    const C* __restrict drawn;
    FV_INLINE C operator[](int64_t j) const {
        if constexpr (NOISE) return drawn[j];
        else return widen(eps[j]);
    }
};

static_assert(CHUNK <= NoiseCursor<float>::MAX_TAKE, "a chunk's noise must fit one cursor run");

// One Philox cursor per sample for posterior rows b0 .. b1 (a thread's rows): sample k's
// rows are consecutive in its stream, from flat index (k * rows + b0) * cols on. Empty
// when the caller gave eps.
template <class T, bool NOISE>
std::vector<NoiseCursor<typename Compute<T>::type>> sample_cursors(const Samples& samples, int64_t cols,
                                                                   uint64_t seed, int64_t b0) {
    std::vector<NoiseCursor<typename Compute<T>::type>> cursors;
    if constexpr (NOISE) {
        cursors.reserve(size_t(samples.count));
        for (int64_t k = 0; k < samples.count; ++k)
            cursors.emplace_back(seed, uint64_t(k * samples.rows + b0) * uint64_t(cols));
    }
    return cursors;
}

// The noise of columns j0 .. j0 + m of sample k of row b (z row r = k * rows + b).
template <class T, bool NOISE>
FV_INLINE ChunkNoise<T, NOISE> chunk_noise(const Noise& noise, std::vector<NoiseCursor<typename Compute<T>::type>>& cursors,
                                           int64_t k, int64_t r, int64_t j0, int64_t m) {
    if constexpr (NOISE) return {nullptr, cursors[size_t(k)].take(m)};
    else return {row_of<T>(noise.eps, noise.eps_stride, r) + j0, nullptr};
}

// Posterior rows b0 .. b1: each chunk of a row computes the std and the KL once, then
// writes the chunk of each of the K samples.
template <class T, bool NOISE>
FV_INLINE void reparameterize_kl_forward_rows(const ForwardArgs& a, int64_t b0, int64_t b1) {
    using C = typename Compute<T>::type;
    const int64_t cols = a.q.cols, rows = a.samples.rows, samples = a.samples.count;
    auto cursors = sample_cursors<T, NOISE>(a.samples, cols, a.noise.seed, b0);
    alignas(64) C terms[CHUNK], std_dev[CHUNK];
    for (int64_t b = b0; b < b1; ++b) {
        const T* __restrict mu = row_of<T>(a.q.mu, a.q.mu_stride, b);
        const T* __restrict lv = row_of<T>(a.q.logvar, a.q.logvar_stride, b);
        double kl = 0.0;
        for (int64_t j0 = 0; j0 < cols; j0 += CHUNK) {
            const int64_t m = std::min(CHUNK, cols - j0);
            for (int64_t j = 0; j < m; ++j) {
                const C mv = widen(mu[j0 + j]), v = widen(lv[j0 + j]);
                C expm1_v;
                exp_half_expm1_c(v, std_dev[j], expm1_v);
                terms[j] = C(0.5) * (mv * mv + fv_expm1_minus_x(v, expm1_v));
            }
            kl += chunk_sum(terms, m);
            for (int64_t k = 0; k < samples; ++k) {
                const int64_t r = k * rows + b;
                const ChunkNoise<T, NOISE> noise = chunk_noise<T, NOISE>(a.noise, cursors, k, r, j0, m);
                T* __restrict z = static_cast<T*>(a.z) + r * cols + j0;
                for (int64_t j = 0; j < m; ++j) z[j] = narrow<T>(widen(mu[j0 + j]) + std_dev[j] * noise[j]);
            }
        }
        static_cast<C*>(a.kl)[b] = C(kl);
    }
}

// Posterior rows b0 .. b1. Each chunk of a row first sums grad_z and grad_z * eps over the
// K samples, then applies the chain rule once.
template <class T, bool GRAD_Z, bool GRAD_KL, bool NOISE>
FV_INLINE void reparameterize_kl_backward_rows(const BackwardArgs& a, int64_t b0, int64_t b1) {
    using C = typename Compute<T>::type;
    const int64_t cols = a.q.cols, rows = a.samples.rows, samples = a.samples.count;
    auto cursors = sample_cursors<T, GRAD_Z && NOISE>(a.samples, cols, a.noise.seed, b0);
    alignas(64) C sum_g[CHUNK], sum_g_eps[CHUNK];
    for (int64_t b = b0; b < b1; ++b) {
        const T* __restrict mu = row_of<T>(a.q.mu, a.q.mu_stride, b);
        const T* __restrict lv = row_of<T>(a.q.logvar, a.q.logvar_stride, b);
        const C gkl = GRAD_KL ? static_cast<const C*>(a.grad_kl)[b * a.grad_kl_stride] : C(0);
        T* __restrict grad_mu = static_cast<T*>(a.grad_mu) + b * cols;
        T* __restrict grad_lv = static_cast<T*>(a.grad_logvar) + b * cols;
        for (int64_t j0 = 0; j0 < cols; j0 += CHUNK) {
            const int64_t m = std::min(CHUNK, cols - j0);
            if constexpr (GRAD_Z) {
                for (int64_t j = 0; j < m; ++j) sum_g[j] = sum_g_eps[j] = C(0);
                for (int64_t k = 0; k < samples; ++k) {
                    const int64_t r = k * rows + b;
                    const T* __restrict gz = row_of<T>(a.grad_z, a.grad_z_stride, r) + j0;
                    const ChunkNoise<T, NOISE> noise = chunk_noise<T, NOISE>(a.noise, cursors, k, r, j0, m);
                    for (int64_t j = 0; j < m; ++j) {
                        const C g = widen(gz[j]);
                        sum_g[j] += g;
                        sum_g_eps[j] += g * noise[j];
                    }
                }
            }
            for (int64_t j = 0; j < m; ++j) {
                const C mv = widen(mu[j0 + j]), v = widen(lv[j0 + j]);
                C gm = C(0), gv = C(0), std_dev, expm1_v;
                if constexpr (GRAD_Z && GRAD_KL) exp_half_expm1_c(v, std_dev, expm1_v);
                else if constexpr (GRAD_Z) std_dev = exp_c(C(0.5) * v);
                else if constexpr (GRAD_KL) expm1_v = expm1_c(v);
                if constexpr (GRAD_Z) {
                    gm = sum_g[j];
                    gv = C(0.5) * std_dev * sum_g_eps[j];
                }
                // Added only when grad_kl exists: 0 * expm1(lv) is NaN for lv = +inf.
                if constexpr (GRAD_KL) {
                    gm += gkl * mv;
                    gv += gkl * C(0.5) * expm1_v;
                }
                grad_mu[j0 + j] = narrow<T>(gm);
                grad_lv[j0 + j] = narrow<T>(gv);
            }
        }
    }
}

template <class T, bool ELEMENTWISE, bool GRAD>
FV_INLINE void gaussian_kl_rows(const KLArgs& a, int64_t b0, int64_t b1) {
    using C = typename Compute<T>::type;
    alignas(64) C terms[CHUNK];
    const int64_t cols = a.q.cols;
    for (int64_t b = b0; b < b1; ++b) {
        const T* __restrict mu = row_of<T>(a.q.mu, a.q.mu_stride, b);
        const T* __restrict lv = row_of<T>(a.q.logvar, a.q.logvar_stride, b);
        C* __restrict kl_el = static_cast<C*>(a.kl) + b * cols;
        T* __restrict grad_mu = GRAD ? static_cast<T*>(a.grad_mu) + b * cols : nullptr;
        T* __restrict grad_lv = GRAD ? static_cast<T*>(a.grad_logvar) + b * cols : nullptr;
        double kl = 0.0;
        for (int64_t j0 = 0; j0 < cols; j0 += CHUNK) {
            const int64_t m = std::min(CHUNK, cols - j0);
            C* __restrict out = ELEMENTWISE ? kl_el + j0 : terms;
            for (int64_t j = 0; j < m; ++j) {
                const C mv = widen(mu[j0 + j]), v = widen(lv[j0 + j]);
                const C em1 = expm1_c(v);
                out[j] = C(0.5) * (mv * mv + fv_expm1_minus_x(v, em1));
                if constexpr (GRAD) {
                    grad_mu[j0 + j] = mu[j0 + j];  // dkl/dmu = mu, bit for bit
                    grad_lv[j0 + j] = narrow<T>(C(0.5) * em1);
                }
            }
            if constexpr (!ELEMENTWISE) kl += chunk_sum(terms, m);
        }
        if constexpr (!ELEMENTWISE) static_cast<C*>(a.kl)[b] = C(kl);
    }
}

// One entry per storage type, compiled per CPU-feature clone; runtime flags pick
// the template instance inside, so each clone holds every variant.
#define FV_GAUSSIAN_ENTRIES(T, SUFFIX)                                                              \
    FV_CLONES void forward_##SUFFIX(const ForwardArgs& a, int64_t b0, int64_t b1) {                 \
        if (a.noise.eps == nullptr) reparameterize_kl_forward_rows<T, true>(a, b0, b1);             \
        else reparameterize_kl_forward_rows<T, false>(a, b0, b1);                                   \
    }                                                                                               \
    FV_CLONES void backward_##SUFFIX(const BackwardArgs& a, int64_t b0, int64_t b1) {               \
        const bool gz = a.grad_z != nullptr, gkl = a.grad_kl != nullptr;                            \
        const bool noise = a.noise.eps == nullptr;                                                  \
        if (gz && gkl && noise) reparameterize_kl_backward_rows<T, true, true, true>(a, b0, b1);    \
        else if (gz && gkl) reparameterize_kl_backward_rows<T, true, true, false>(a, b0, b1);       \
        else if (gz && noise) reparameterize_kl_backward_rows<T, true, false, true>(a, b0, b1);     \
        else if (gz) reparameterize_kl_backward_rows<T, true, false, false>(a, b0, b1);             \
        else if (gkl) reparameterize_kl_backward_rows<T, false, true, false>(a, b0, b1);            \
        else reparameterize_kl_backward_rows<T, false, false, false>(a, b0, b1); /* zeros */        \
    }                                                                                               \
    FV_CLONES void kl_##SUFFIX(const KLArgs& a, int64_t b0, int64_t b1) {                           \
        const bool grad = a.grad_mu != nullptr && a.grad_logvar != nullptr;                         \
        if (a.elementwise && grad) gaussian_kl_rows<T, true, true>(a, b0, b1);                      \
        else if (a.elementwise) gaussian_kl_rows<T, true, false>(a, b0, b1);                        \
        else if (grad) gaussian_kl_rows<T, false, true>(a, b0, b1);                                 \
        else gaussian_kl_rows<T, false, false>(a, b0, b1);                                          \
    }

FV_GAUSSIAN_ENTRIES(float, f32)
FV_GAUSSIAN_ENTRIES(double, f64)
FV_GAUSSIAN_ENTRIES(bf16_t, bf16)
FV_GAUSSIAN_ENTRIES(f16_t, f16)

}  // namespace
}  // namespace fastvae

using namespace fastvae;

// z [samples * rows, cols] (dtype): row k * rows + b = mu[b] + exp(0.5 logvar[b]) * eps[k * rows + b];
// kl [rows] (compute type) = sum_j KL. eps may be NULL: then eps[r, j] is the Philox normal
// at flat index r * cols + j under seed.
extern "C" FASTVAE_API int fastvae_reparameterize_kl_forward(
    int dtype, int64_t rows, int64_t cols, int64_t samples,
    const void* mu, int64_t mu_stride, const void* logvar, int64_t logvar_stride,
    const void* eps, int64_t eps_stride, uint64_t seed,
    void* z, void* kl, int num_threads) {
    const ForwardArgs a{.q = {cols, mu, mu_stride, logvar, logvar_stride}, .samples = {rows, samples},
                        .noise = {eps, eps_stride, seed}, .z = z, .kl = kl};
    return run_rows(kernel_for_dtype<ForwardArgs>(dtype, forward_f32, forward_f64, forward_bf16, forward_f16), a,
                    rows, samples * cols, num_threads);
}

// grad_mu, grad_logvar [rows, cols] (dtype) from grad_z [samples * rows, cols] (dtype, or
// NULL; summed over the samples) and grad_kl [rows] (compute type, element stride
// grad_kl_stride: 0 broadcasts one value, as the backward of a sum gives it; or NULL);
// eps NULL regenerates the noise from seed.
extern "C" FASTVAE_API int fastvae_reparameterize_kl_backward(
    int dtype, int64_t rows, int64_t cols, int64_t samples,
    const void* grad_z, int64_t grad_z_stride, const void* grad_kl, int64_t grad_kl_stride,
    const void* mu, int64_t mu_stride, const void* logvar, int64_t logvar_stride,
    const void* eps, int64_t eps_stride, uint64_t seed,
    void* grad_mu, void* grad_logvar, int num_threads) {
    const BackwardArgs a{.q = {cols, mu, mu_stride, logvar, logvar_stride}, .samples = {rows, samples},
                         .noise = {eps, eps_stride, seed},
                         .grad_z = grad_z, .grad_z_stride = grad_z_stride,
                         .grad_kl = grad_kl, .grad_kl_stride = grad_kl_stride,
                         .grad_mu = grad_mu, .grad_logvar = grad_logvar};
    return run_rows(kernel_for_dtype<BackwardArgs>(dtype, backward_f32, backward_f64, backward_bf16, backward_f16),
                    a, rows, samples * cols, num_threads);
}

// kl: [rows, cols] if elementwise else [rows] (compute type); grad_mu, grad_logvar
// [rows, cols] (dtype) are written when both are non-NULL.
extern "C" FASTVAE_API int fastvae_gaussian_kl_forward(
    int dtype, int64_t rows, int64_t cols,
    const void* mu, int64_t mu_stride, const void* logvar, int64_t logvar_stride,
    int elementwise, void* kl, void* grad_mu, void* grad_logvar, int num_threads) {
    const KLArgs a{.q = {cols, mu, mu_stride, logvar, logvar_stride}, .elementwise = elementwise != 0,
                   .kl = kl, .grad_mu = grad_mu, .grad_logvar = grad_logvar};
    return run_rows(kernel_for_dtype<KLArgs>(dtype, kl_f32, kl_f64, kl_bf16, kl_f16), a, rows, cols, num_threads);
}
