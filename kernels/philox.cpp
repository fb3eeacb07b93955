// philox_block (noise.h): the words of 16 Philox groups, with explicit SIMD where the
// CPU has it, chosen once per process. Every version gives the same bits.
//
// Each group's state lives in the low half of a 64-bit lane, so one unsigned
// 32 x 32 -> 64 multiply (vpmuludq) per lane gives both halves of the product with no
// shuffles: the high half is a shift, and the low half is used in place (vpmuludq
// reads only the low 32 bits of a lane, and the words are truncated at the end, so
// the don't-care high bits never matter). Rounds are bound by the multiplies: on a
// Zen 4 core the AVX-512 block takes about 0.5 ns per normal, against about 1.1 ns for
// GCC's vectorization of the scalar loop (vpmullq and permutes).
#include "fastvae_native.h"
#include "noise.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FV_X86_SIMD 1
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12's own avx512fintrin.h trips -Wuninitialized (its _mm512_undefined_* idiom;
// GCC bug 105593, fixed in 13). The warning is about the header, not this file.
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#else
#define FV_X86_SIMD 0
#endif

namespace fastvae {
namespace {

void philox_block_portable(uint64_t seed, uint64_t g0, uint32_t w[4][PHILOX_BLOCK]) {
    for (int64_t i = 0; i < PHILOX_BLOCK; ++i) {
        uint32_t out[4];
        philox_4x32(seed, g0 + uint64_t(i), out);
        for (int k = 0; k < 4; ++k) w[k][i] = out[k];
    }
}

#if FV_X86_SIMD
// Two registers of 8 groups each, their rounds interleaved so that the multiplies of
// one hide the latency of the other's.
__attribute__((target("avx512f"))) void philox_block_avx512(uint64_t seed, uint64_t g0,
                                                             uint32_t w[4][PHILOX_BLOCK]) {
    const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i ga = _mm512_add_epi64(_mm512_set1_epi64(int64_t(g0)), lane);
    const __m512i gb = _mm512_add_epi64(_mm512_set1_epi64(int64_t(g0 + 8)), lane);
    __m512i a0 = ga, a1 = _mm512_srli_epi64(ga, 32), a2 = _mm512_setzero_si512(), a3 = a2;
    __m512i b0 = gb, b1 = _mm512_srli_epi64(gb, 32), b2 = a2, b3 = a2;
    const __m512i mul_a = _mm512_set1_epi64(PHILOX_MUL_A), mul_b = _mm512_set1_epi64(PHILOX_MUL_B);
    uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
    for (int round = 0; round < PHILOX_ROUNDS; ++round) {
        const __m512i key0 = _mm512_set1_epi64(k0), key1 = _mm512_set1_epi64(k1);
        const __m512i pa = _mm512_mul_epu32(a0, mul_a), pb = _mm512_mul_epu32(a2, mul_b);
        const __m512i qa = _mm512_mul_epu32(b0, mul_a), qb = _mm512_mul_epu32(b2, mul_b);
        a0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb, 32), a1, key0, 0x96);  // xor of three
        a2 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa, 32), a3, key1, 0x96);
        a1 = pb;
        a3 = pa;
        b0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(qb, 32), b1, key0, 0x96);
        b2 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(qa, 32), b3, key1, 0x96);
        b1 = qb;
        b3 = qa;
        k0 += PHILOX_KEY_A;
        k1 += PHILOX_KEY_B;
    }
    const __m512i words[4][2] = {{a0, b0}, {a1, b1}, {a2, b2}, {a3, b3}};
    for (int k = 0; k < 4; ++k)
        for (int h = 0; h < 2; ++h)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[k] + 8 * h), _mm512_cvtepi64_epi32(words[k][h]));
}

// Four registers of 4 groups each.
__attribute__((target("avx2"))) void philox_block_avx2(uint64_t seed, uint64_t g0,
                                                       uint32_t w[4][PHILOX_BLOCK]) {
    constexpr int R = 4;
    const __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
    __m256i c0[R], c1[R], c2[R], c3[R];
    for (int r = 0; r < R; ++r) {
        const __m256i g = _mm256_add_epi64(_mm256_set1_epi64x(int64_t(g0 + 4 * uint64_t(r))), lane);
        c0[r] = g;
        c1[r] = _mm256_srli_epi64(g, 32);
        c2[r] = c3[r] = _mm256_setzero_si256();
    }
    const __m256i mul_a = _mm256_set1_epi64x(PHILOX_MUL_A), mul_b = _mm256_set1_epi64x(PHILOX_MUL_B);
    uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
    for (int round = 0; round < PHILOX_ROUNDS; ++round) {
        const __m256i key0 = _mm256_set1_epi64x(k0), key1 = _mm256_set1_epi64x(k1);
        for (int r = 0; r < R; ++r) {
            const __m256i pa = _mm256_mul_epu32(c0[r], mul_a), pb = _mm256_mul_epu32(c2[r], mul_b);
            c0[r] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb, 32), c1[r]), key0);
            c2[r] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa, 32), c3[r]), key1);
            c1[r] = pb;
            c3[r] = pa;
        }
        k0 += PHILOX_KEY_A;
        k1 += PHILOX_KEY_B;
    }
    // The low 32 bits of each 64-bit lane: even dwords, gathered into the low 128 bits.
    const __m256i evens = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    const __m256i* state[4] = {c0, c1, c2, c3};
    for (int k = 0; k < 4; ++k)
        for (int r = 0; r < R; ++r)
            _mm_storeu_si128(reinterpret_cast<__m128i*>(w[k] + 4 * r),
                             _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(state[k][r], evens)));
}
#endif

using PhiloxBlockFn = void (*)(uint64_t, uint64_t, uint32_t[4][PHILOX_BLOCK]);

constexpr int PHILOX_PORTABLE = 0, PHILOX_AVX2 = 1, PHILOX_AVX512 = 2;

// The version's function, or null where this CPU (or build) cannot run it.
PhiloxBlockFn philox_version_fn(int version) {
    switch (version) {
        case PHILOX_PORTABLE: return philox_block_portable;
#if FV_X86_SIMD
        case PHILOX_AVX2: return __builtin_cpu_supports("avx2") ? philox_block_avx2 : nullptr;
        case PHILOX_AVX512: return __builtin_cpu_supports("avx512f") ? philox_block_avx512 : nullptr;
#endif
        default: return nullptr;
    }
}

int best_philox_version() {
#if FV_X86_SIMD
    __builtin_cpu_init();  // a static initializer may run before libgcc has detected the CPU
#endif
    int version = PHILOX_AVX512;
    while (philox_version_fn(version) == nullptr) --version;  // the portable one always runs
    return version;
}

const int selected_version = best_philox_version();
const PhiloxBlockFn selected_philox_block = philox_version_fn(selected_version);

}  // namespace

void philox_block(uint64_t seed, uint64_t g0, uint32_t w[4][PHILOX_BLOCK]) {
    selected_philox_block(seed, g0, w);
}

}  // namespace fastvae

// For the tests: the Philox version this CPU runs (0 portable, 1 AVX2, 2 AVX-512), and
// the words of groups g0 .. g0 + 15 from a given version ([4][16], word-major), so that
// each version the CPU can run is checked against the reference's words. Returns
// FASTVAE_ERR_UNSUPPORTED for a version this CPU (or build) cannot run.
extern "C" int fastvae_philox_version(void) { return fastvae::selected_version; }

extern "C" int fastvae_philox_words(int version, uint64_t seed, uint64_t g0, uint32_t* words) {
    const fastvae::PhiloxBlockFn fn = fastvae::philox_version_fn(version);
    if (fn == nullptr) return FASTVAE_ERR_UNSUPPORTED;
    fn(seed, g0, reinterpret_cast<uint32_t(*)[fastvae::PHILOX_BLOCK]>(words));
    return FASTVAE_OK;
}
