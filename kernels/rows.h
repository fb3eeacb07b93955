// Row machinery shared by the kernels: the fixed-order row sum, the OpenMP
// split of rows across threads, CPU-feature clones, and dtype dispatch.
#pragma once

#include <algorithm>
#include <cstdint>

#include "fastvae_native.h"
#include "numerics.h"

#ifdef _OPENMP
#include <omp.h>
#endif

// Each kernel body is compiled three times, for baseline x86-64 (SSE2),
// x86-64-v3 (AVX2 + FMA) and x86-64-v4 (AVX-512), and the loader picks the best
// the CPU has at run time: the shipped library stays portable without
// -march=native. The kernels are bound by vector-instruction count (polynomial
// exp/log), and AVX-512's 32 registers end the AVX2 loop's constant spills: the
// fused Bernoulli forward with gradient at 4096 x 784, one thread, took 4.14 ms
// with the v3 clone and 3.57 ms with v4 on a Zen 4 EPYC (median of 40,
// interleaved). flatten inlines the row templates and math helpers into each
// clone so they get the clone's ISA.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FV_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#elif defined(__GNUC__)
#define FV_CLONES __attribute__((flatten))
#else
#define FV_CLONES
#endif

namespace fastvae {

// Loss terms of a row are produced CHUNK at a time into a stack buffer and
// summed in LANES interleaved partial sums: the order is fixed by the row alone
// (not by threads or vector width), and the lanes let the sum vectorize
// without -ffast-math. Chunk totals add up in double, so long rows lose nothing.
// LANES is one AVX-512 register of floats (two AVX2, four SSE): with 8 lanes the
// AVX-512 clone shuffled pairs of half registers into scalar adds, and the sum
// cost about as much as the Bernoulli math.
constexpr int64_t CHUNK = 256;
constexpr int64_t LANES = 16;

template <class C>
FV_INLINE double chunk_sum(C* terms, int64_t m) {
    const int64_t padded = (m + LANES - 1) / LANES * LANES;  // terms has CHUNK >= padded slots
    for (int64_t j = m; j < padded; ++j) terms[j] = C(0);
    C lane[LANES] = {};
    for (int64_t j = 0; j < padded; j += LANES)
        for (int64_t k = 0; k < LANES; ++k) lane[k] += terms[j + k];
    for (int64_t k = 0; k < LANES / 2; ++k) lane[k] += lane[k + LANES / 2];
    return double(((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7])));
}

// Below this many elements a call runs on the calling thread: waking the pool
// costs more than it saves. Results are identical either way.
constexpr int64_t MIN_PARALLEL_ELEMENTS = 1 << 15;

// Calls rows_fn(b0, b1) on contiguous row blocks, one per thread.
template <class RowsFn>
void parallel_rows(int64_t rows, int64_t cols, int num_threads, RowsFn rows_fn) {
    int64_t threads = std::min<int64_t>(std::max(num_threads, 1), rows);
    if (rows * cols < MIN_PARALLEL_ELEMENTS) threads = 1;
#ifdef _OPENMP
    if (threads > 1) {
#pragma omp parallel num_threads(int(threads))
        {
            const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
            rows_fn(rows * t / n, rows * (t + 1) / n);
        }
        return;
    }
#endif
    rows_fn(int64_t(0), rows);
}

// A kernel's body for one storage type: fn(args, b0, b1) handles rows b0 .. b1.
template <class Args>
using RowKernel = void (*)(const Args&, int64_t, int64_t);

// The body for a dtype code, among one per storage type; null for an unknown code.
template <class Args>
RowKernel<Args> kernel_for_dtype(int dtype, RowKernel<Args> f32, RowKernel<Args> f64, RowKernel<Args> bf16,
                                 RowKernel<Args> f16) {
    switch (dtype) {
        case FASTVAE_F32: return f32;
        case FASTVAE_F64: return f64;
        case FASTVAE_BF16: return bf16;
        case FASTVAE_F16: return f16;
        default: return nullptr;
    }
}

// Runs fn over `rows` rows split across threads, each row touching `row_elements` elements
// (which decides whether threads pay off); FASTVAE_ERR_DTYPE for a null fn.
template <class Args>
int run_rows(RowKernel<Args> fn, const Args& a, int64_t rows, int64_t row_elements, int num_threads) {
    if (fn == nullptr) return FASTVAE_ERR_DTYPE;
    parallel_rows(rows, row_elements, num_threads, [&](int64_t b0, int64_t b1) { fn(a, b0, b1); });
    return FASTVAE_OK;
}

}  // namespace fastvae
