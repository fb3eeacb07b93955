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
 *   - The ABI version changes whenever a signature does; Python refuses a library
 *     whose version differs, and one that lacks a function it declares.
 */
#ifndef FASTVAE_NATIVE_H
#define FASTVAE_NATIVE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FASTVAE_ABI_VERSION 6

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

/* Each op family's entry points are defined, with their contract, in kernels/<family>.cpp;
 * fastvae/ops/<family>/native.py declares the same prototypes, and tests/test_native_abi.py
 * checks the two against each other. */

/* Test hooks for the Philox noise (kernels/philox.cpp): the version this CPU runs
 * (0 portable, 1 AVX2, 2 AVX-512), and the words [4][16] (word-major) of groups
 * g0 .. g0 + 15 from `version`, or FASTVAE_ERR_UNSUPPORTED where it cannot run. */
FASTVAE_API int fastvae_philox_version(void);
FASTVAE_API int fastvae_philox_words(int version, uint64_t seed, uint64_t g0, uint32_t* words);

#ifdef __cplusplus
}
#endif

#endif /* FASTVAE_NATIVE_H */
