/* C ABI of the fastvae native CPU kernels (loaded from Python with ctypes).
 *
 * Conventions, shared by every entry point:
 *   - Matrices are [rows, cols] with unit column stride and a row stride given
 *     in elements (a chunk of a wider tensor is passed without a copy).
 *   - Outputs are contiguous and allocated by the caller; every element is written.
 *   - dtype codes: FASTVAE_F32, FASTVAE_F64, FASTVAE_BF16, FASTVAE_F16. The
 *     "compute type" is double for FASTVAE_F64 and float otherwise: per-row
 *     losses and elementwise losses are stored in it, and grad_kl is read in it.
 *   - Rows are split across num_threads OpenMP threads; each row is summed in a
 *     fixed order, so results do not depend on num_threads.
 *   - Return 0 on success, FASTVAE_ERR_DTYPE for a dtype (combination) the
 *     library was not built for. Nothing else can fail (the test hook
 *     fastvae_philox_words also returns FASTVAE_ERR_UNSUPPORTED).
 */
#ifndef FASTVAE_NATIVE_H
#define FASTVAE_NATIVE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FASTVAE_ABI_VERSION 4

enum { FASTVAE_F32 = 0, FASTVAE_F64 = 1, FASTVAE_BF16 = 2, FASTVAE_F16 = 3 };
enum { FASTVAE_OK = 0, FASTVAE_ERR_DTYPE = 1, FASTVAE_ERR_UNSUPPORTED = 2 };

#if defined(_WIN32)
#define FASTVAE_API __declspec(dllexport)
#else
#define FASTVAE_API __attribute__((visibility("default")))
#endif

/* FASTVAE_ABI_VERSION of the built library; Python refuses a stale one. */
FASTVAE_API int fastvae_abi_version(void);

/* 1 when built with OpenMP (num_threads is honoured), 0 when built single-threaded. */
FASTVAE_API int fastvae_has_openmp(void);

/* z [rows, cols] (dtype) = mu + exp(0.5 logvar) * eps; kl [rows] (compute type) = sum_j KL.
 * eps may be NULL: then eps[b, j] is the Philox normal at flat index b * cols + j under seed. */
FASTVAE_API int fastvae_reparameterize_kl_forward(
    int dtype, int64_t rows, int64_t cols,
    const void* mu, int64_t mu_stride, const void* logvar, int64_t logvar_stride,
    const void* eps, int64_t eps_stride, uint64_t seed,
    void* z, void* kl, int num_threads);

/* grad_mu, grad_logvar [rows, cols] (dtype) from grad_z [rows, cols] (dtype, or NULL)
 * and grad_kl [rows] (compute type, element stride grad_kl_stride: 0 broadcasts one value, as
 * the backward of a sum gives it; or NULL); eps NULL regenerates the noise. */
FASTVAE_API int fastvae_reparameterize_kl_backward(
    int dtype, int64_t rows, int64_t cols,
    const void* grad_z, int64_t grad_z_stride, const void* grad_kl, int64_t grad_kl_stride,
    const void* mu, int64_t mu_stride, const void* logvar, int64_t logvar_stride,
    const void* eps, int64_t eps_stride, uint64_t seed,
    void* grad_mu, void* grad_logvar, int num_threads);

/* kl: [rows, cols] if elementwise else [rows] (compute type); grad_mu, grad_logvar
 * [rows, cols] (dtype) are written when both are non-NULL. */
FASTVAE_API int fastvae_gaussian_kl_forward(
    int dtype, int64_t rows, int64_t cols,
    const void* mu, int64_t mu_stride, const void* logvar, int64_t logvar_stride,
    int elementwise, void* kl, void* grad_mu, void* grad_logvar, int num_threads);

/* logp: [rows, cols] if elementwise else [rows] (compute type); grad_logits
 * [rows, cols] (logits_dtype) = grad_scale * (target - sigmoid(logits)) when non-NULL,
 * scaled in the compute type before rounding. logits and target may differ in
 * dtype unless one of them is FASTVAE_F64. */
FASTVAE_API int fastvae_bernoulli_log_likelihood_forward(
    int logits_dtype, int target_dtype, int64_t rows, int64_t cols,
    const void* logits, int64_t logits_stride, const void* target, int64_t target_stride,
    int elementwise, void* logp, void* grad_logits, double grad_scale, int num_threads);

/* Test hooks for the Philox noise (kernels/philox.cpp): the version this CPU runs
 * (0 portable, 1 AVX2, 2 AVX-512), and the words [4][16] (word-major) of groups
 * g0 .. g0 + 15 from `version`, or FASTVAE_ERR_UNSUPPORTED where it cannot run. */
FASTVAE_API int fastvae_philox_version(void);
FASTVAE_API int fastvae_philox_words(int version, uint64_t seed, uint64_t g0, uint32_t* words);

#ifdef __cplusplus
}
#endif

#endif /* FASTVAE_NATIVE_H */
