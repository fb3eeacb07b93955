// The in-kernel noise: Philox4x32-10 counters turned into standard normals by
// Box-Muller, the stream documented in fastvae/reference.py. Normal i of a call
// (its flat element index) is output i % 4 of Philox group i / 4, whose counter
// is (g lo, g hi, 0, 0) and key (seed lo, seed hi).
//
// Philox is generated 16 groups (64 normals) at a time, one 32-bit word type per
// vector register (structure of arrays). Its rounds are 32 x 32 -> 64-bit
// multiplies, which GCC's vectorizer writes as vpmullq plus permutes when it sees
// one group at a time; philox.cpp holds explicit AVX-512 and AVX2 versions picked
// at run time. Each thread walks its rows' flat indices in order, so a cursor
// hands out the normals of consecutive chunks from one buffer, and short rows
// (a latent of 32) do not round every row up to a whole block.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "numerics.h"

namespace fastvae {

constexpr uint32_t PHILOX_MUL_A = 0xD2511F53u;
constexpr uint32_t PHILOX_MUL_B = 0xCD9E8D57u;
constexpr uint32_t PHILOX_KEY_A = 0x9E3779B9u;
constexpr uint32_t PHILOX_KEY_B = 0xBB67AE85u;
constexpr int PHILOX_ROUNDS = 10;
constexpr int64_t PHILOX_BLOCK = 16;  // groups per philox_block call: 64 normals

// Philox4x32-10 of one group: the four words (the portable path and the reference for tests).
FV_INLINE void philox_4x32(uint64_t seed, uint64_t g, uint32_t out[4]) {
    uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
    uint32_t c0 = uint32_t(g), c1 = uint32_t(g >> 32), c2 = 0, c3 = 0;
    for (int round = 0; round < PHILOX_ROUNDS; ++round) {
        const uint64_t pa = uint64_t(PHILOX_MUL_A) * c0;
        const uint64_t pb = uint64_t(PHILOX_MUL_B) * c2;
        const uint32_t n0 = uint32_t(pb >> 32) ^ c1 ^ k0;
        const uint32_t n2 = uint32_t(pa >> 32) ^ c3 ^ k1;
        c1 = uint32_t(pb);
        c3 = uint32_t(pa);
        c0 = n0;
        c2 = n2;
        k0 += PHILOX_KEY_A;
        k1 += PHILOX_KEY_B;
    }
    out[0] = c0;
    out[1] = c1;
    out[2] = c2;
    out[3] = c3;
}

// The words of groups g0 .. g0 + 15: word k of group g0 + i in w[k][i]. Defined in
// philox.cpp (AVX-512, AVX2 or portable, chosen once per process).
void philox_block(uint64_t seed, uint64_t g0, uint32_t w[4][PHILOX_BLOCK]);

// u in (0, 1) from the top 24 bits of a word, rounded exactly as the reference rounds it.
FV_INLINE float unit_uniform(float, uint32_t word) { return (float(int32_t(word >> 8)) + 0.5f) * 0x1p-24f; }
FV_INLINE double unit_uniform(double, uint32_t word) { return (double(word >> 8) + 0.5) * 0x1p-24; }

// Box-Muller on words (0, 1) and (2, 3) of each group, both outputs of each: the four
// normals of group i go to out[4 i .. 4 i + 3].
FV_INLINE void box_muller_block(const uint32_t w[4][PHILOX_BLOCK], float* __restrict out) {
    alignas(64) float n[4][PHILOX_BLOCK];
    for (int64_t i = 0; i < PHILOX_BLOCK; ++i) {
        const float u0 = unit_uniform(0.0f, w[0][i]), u1 = unit_uniform(0.0f, w[1][i]);
        const float u2 = unit_uniform(0.0f, w[2][i]), u3 = unit_uniform(0.0f, w[3][i]);
        const float r0 = std::sqrt(-2.0f * fv_log(u0)), r1 = std::sqrt(-2.0f * fv_log(u2));
        n[0][i] = r0 * fv_cos_2pi_unit(u1);
        n[1][i] = r0 * fv_sin_2pi_unit(u1);
        n[2][i] = r1 * fv_cos_2pi_unit(u3);
        n[3][i] = r1 * fv_sin_2pi_unit(u3);
    }
    for (int64_t i = 0; i < PHILOX_BLOCK; ++i)
        for (int k = 0; k < 4; ++k) out[4 * i + k] = n[k][i];
}

FV_INLINE void box_muller_block(const uint32_t w[4][PHILOX_BLOCK], double* __restrict out) {
    constexpr double two_pi = 6.283185307179586476925;
    for (int64_t i = 0; i < PHILOX_BLOCK; ++i) {
        const double u0 = unit_uniform(0.0, w[0][i]), u1 = unit_uniform(0.0, w[1][i]);
        const double u2 = unit_uniform(0.0, w[2][i]), u3 = unit_uniform(0.0, w[3][i]);
        const double r0 = std::sqrt(-2.0 * std::log(u0)), r1 = std::sqrt(-2.0 * std::log(u2));
        out[4 * i + 0] = r0 * std::cos(two_pi * u1);
        out[4 * i + 1] = r0 * std::sin(two_pi * u1);
        out[4 * i + 2] = r1 * std::cos(two_pi * u3);
        out[4 * i + 3] = r1 * std::sin(two_pi * u3);
    }
}

// The normals of flat indices first, first + 1, ... handed out in consecutive runs of
// at most MAX_TAKE. Every run costs only the blocks it newly needs.
template <class C>
class NoiseCursor {
public:
    static constexpr int64_t MAX_TAKE = 256;

    NoiseCursor(uint64_t seed, uint64_t first)
        : seed_(seed), next_group_(first >> 2), begin_(int64_t(first & 3)), end_(0) {}

    // The next m (<= MAX_TAKE) normals.
    const C* take(int64_t m) {
        if (end_ - begin_ < m) refill(m);
        const C* run = buf_ + begin_;
        begin_ += m;
        return run;
    }

private:
    static constexpr int64_t BLOCK_NORMALS = 4 * PHILOX_BLOCK;

    void refill(int64_t m) {
        const int64_t left = end_ - begin_;  // < m: fewer than MAX_TAKE, moved to the front
        std::memmove(buf_, buf_ + begin_, size_t(left > 0 ? left : 0) * sizeof(C));
        // A fresh cursor starts mid-group: its first block's leading normals are skipped.
        begin_ = left >= 0 ? 0 : begin_;
        end_ = left > 0 ? left : 0;
        alignas(64) uint32_t words[4][PHILOX_BLOCK];
        while (end_ - begin_ < m) {
            philox_block(seed_, next_group_, words);
            box_muller_block(words, buf_ + end_);
            next_group_ += PHILOX_BLOCK;
            end_ += BLOCK_NORMALS;
        }
    }

    uint64_t seed_, next_group_;
    int64_t begin_, end_;  // buf_[begin_, end_) is drawn and not yet handed out
    alignas(64) C buf_[MAX_TAKE + 2 * BLOCK_NORMALS];
};

}  // namespace fastvae
