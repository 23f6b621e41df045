/* What the native kernels (formats/_cdecode.c, runtime/_kernels.c) share of the compact encoding
 * (docs/FORMAT.md): float16 and bfloat16 to and from float32 (rounding to nearest, ties to even, as torch
 * does), reads of little-endian bit streams, and N:M in-group positions turned into mask bits. */
#ifndef SPARSEGPT_ENCODING_H
#define SPARSEGPT_ENCODING_H
#include <stdint.h>
#include <string.h>

static inline uint32_t float_bits(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
}

static inline float half_to_float(uint16_t half) {
    uint32_t sign = (uint32_t)(half & 0x8000) << 16, exponent = (half >> 10) & 0x1f, mantissa = half & 0x3ff;
    uint32_t bits;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000 | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else { /* subnormal: mantissa · 2^-24, exact in float32 */
        float value = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -value : value;
    }
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline uint16_t float_to_bfloat16(float value) {
    uint32_t bits = float_bits(value);
    if ((bits & 0x7fffffff) > 0x7f800000) return 0x7fc0;
    return (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

static inline uint16_t float_to_half(float value) {
    uint32_t bits = float_bits(value), sign = (bits >> 16) & 0x8000, magnitude = bits & 0x7fffffff;
    if (magnitude > 0x7f800000) return (uint16_t)(sign | 0x7e00);
    if (magnitude >= 0x477ff000) return (uint16_t)(sign | 0x7c00); /* at or above 65520: infinity */
    if (magnitude >= 0x38800000) {                                  /* a normal float16 */
        uint32_t rebiased = magnitude - 0x38000000;
        return (uint16_t)(sign | ((rebiased + 0xfff + ((rebiased >> 13) & 1)) >> 13));
    }
    uint32_t exponent = magnitude >> 23;
    if (exponent < 102) return (uint16_t)sign; /* below 2^-25: rounds to zero */
    uint32_t mantissa = (magnitude & 0x7fffff) | 0x800000, shift = 126 - exponent;
    uint32_t quotient = mantissa >> shift, rest = mantissa & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (quotient & 1))) quotient++;
    return (uint16_t)(sign | quotient);
}

/* The `bits` (<= 8) bits from bit `position` of a little-endian bit stream `size` bytes long, as an
 * integer; bytes past the end read as zeros. */
static inline uint32_t bits_at(const uint8_t *stream, int64_t size, int64_t position, int64_t bits) {
    int64_t byte = position >> 3;
    uint32_t word = byte < size ? stream[byte] : 0;
    if (byte + 1 < size) word |= (uint32_t)stream[byte + 1] << 8;
    return (word >> (position & 7)) & ((1u << bits) - 1);
}

/* The `width` (<= 32) bits from bit `position` of a little-endian bit stream `size` bytes long. */
static inline uint32_t mask_bits(const uint8_t *stream, int64_t size, int64_t position, int64_t width) {
    int64_t byte = position >> 3;
    uint64_t word = 0;
    if (byte + 8 <= size) {
        memcpy(&word, stream + byte, sizeof word);
    } else {
        for (int64_t i = 0; byte + i < size && i < 8; i++) word |= (uint64_t)stream[byte + i] << (8 * i);
    }
    return (uint32_t)((word >> (position & 7)) & ((width < 32 ? (1ull << width) : 0x100000000ull) - 1));
}

static inline int popcount64(uint64_t word) { /* without a library call where popcnt is not assumed */
    word -= (word >> 1) & 0x5555555555555555ull;
    word = (word & 0x3333333333333333ull) + ((word >> 2) & 0x3333333333333333ull);
    word = (word + (word >> 4)) & 0x0f0f0f0f0f0f0f0full;
    return (int)((word * 0x0101010101010101ull) >> 56);
}

enum { ERROR_POSITIONS = -1 };

/* Sets the mask bits of row `row` of an N:M tensor (bit `first + c` of `out` for each kept column c; the
 * caller zeroes `out`) from its in-group positions: 0, or ERROR_POSITIONS where they are out of range or
 * not strictly increasing. */
static int64_t nm_row(int64_t row, int64_t cols, const uint8_t *positions, int64_t positions_size, int64_t m,
                      int64_t keep, uint8_t *out, int64_t first) {
    int64_t bits = 1;
    while ((1 << bits) < m) bits++;
    int64_t start = row * (cols / m) * keep;
    for (int64_t group = 0; group < cols / m; group++) {
        int64_t previous = -1;
        for (int64_t j = 0; j < keep; j++) {
            int64_t place = bits_at(positions, positions_size, (start + group * keep + j) * bits, bits);
            if (place >= m || place <= previous) return ERROR_POSITIONS;
            int64_t bit = first + group * m + place;
            out[bit >> 3] |= (uint8_t)(1u << (bit & 7));
            previous = place;
        }
    }
    return 0;
}

#endif
